"""``python -m sagakit.cli``: the ``sagakit`` command without its console script."""

from sagakit.cli import main

main()
