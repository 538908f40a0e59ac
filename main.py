#!/usr/bin/env python3
"""The protocol node: ``python3 main.py`` reads JSON messages on stdin, replies on stdout.

Runs from a checkout with nothing installed (the seeds' judge runs it so); an
installed sagakit is used when there is one.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from sagakit.node.runner import main

if __name__ == "__main__":
    sys.exit(main())
