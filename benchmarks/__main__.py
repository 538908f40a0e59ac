"""``python -m benchmarks [--quick] [--json PATH] [--repeats N] [--only NAME]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks import (
    bus_amqp,
    bus_nats,
    bus_redis,
    choreography,
    durable,
    growth,
    node,
    node_scaling,
    orchestration,
)
from benchmarks.report import environment, table, write_json
from benchmarks.timing import BenchmarkError, Comparison, Config

SUITES: dict[str, Callable[[Config], list[Comparison]]] = {
    "node": node.run,
    "node-lines": node_scaling.run_lines,
    "node-steps": node_scaling.run_steps,
    "node-memory": node_scaling.run_memory,
    "orchestration": orchestration.run,
    "choreography": choreography.run,
    "durable": durable.run,
    "growth": growth.run,
    "bus_redis": bus_redis.run,
    "bus_amqp": bus_amqp.run,
    "bus_nats": bus_nats.run,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="sagakit's benchmarks, each as a ratio against a baseline of the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--repeats", type=int, default=3, help="measurements per side, interleaved (default 3)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SUITES),
        help="run only this suite (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config(quick=args.quick, repeats=args.repeats)
    env = environment(config)  # dated when the run starts
    comparisons: list[Comparison] = []
    for name in args.only or SUITES:
        print(f"{name}...", file=sys.stderr, flush=True)
        try:
            comparisons.extend(SUITES[name](config))
        except BenchmarkError as exc:
            # A wrong answer is a failure of the subject, not a slow figure.
            print(f"benchmark {name} FAILED: {exc}", file=sys.stderr)
            return 1
    print(table(comparisons, env))
    if args.json is not None:
        write_json(args.json, comparisons, env)
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
