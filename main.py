#!/usr/bin/env python3
"""The protocol node: ``python3 main.py`` reads JSON messages on stdin, replies on stdout.

Runs from a checkout with nothing installed (the seeds' judge runs it so); an
installed sagakit is used when there is one.
"""

import gc
import os
import sys

if __name__ == "__main__":
    # Imports make tens of thousands of objects and no garbage: collecting
    # while they run would only scan them again and again. main() freezes what
    # they made and turns the collector back on.
    gc.disable()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

    from sagakit.node.runner import exit_now, main

    exit_now(main(sys.argv[1:]))
