#!/usr/bin/env python3
"""The protocol node: ``python3 main.py`` reads JSON messages on stdin, replies on stdout.

Runs from a checkout with nothing installed (the seeds' judge runs it so); an
installed sagakit is used when there is one.
"""

import gc

# Imports make tens of thousands of objects and no garbage: collecting while
# they run would only scan them again and again.
gc.disable()

import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from sagakit.node.runner import exit_now, main  # noqa: E402

if __name__ == "__main__":
    exit_now(main())
