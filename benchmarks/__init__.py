"""sagakit's benchmark harness: ``python -m benchmarks`` (see BENCHMARKS.md).

Every figure is a ratio against a baseline measured in the same run, because
the absolute speed of the machines this runs on varies up to 2x over minutes.
"""
