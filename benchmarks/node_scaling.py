"""How the node's cost grows: with a line's length, a saga's steps, and the requests served.

``node-lines``: bytes/s decoding and serving lines of 1 KB, 1 MB and 10 MB (the
same total bytes each), against 1 KB lines: linear decoding keeps the ratio
near 1 (a quadratic one fell to a few percent at 1 MB).

``node-steps``: steps/s of one ``execute`` of 1k to 300k steps, completing and
failing at its last step (every step compensated), against 1k steps.

``node-memory``: resident memory and rate of one node process after 100k and
1M requests of each kind (execute, reserve_inventory, init to a new unknown
dest each time, an unknown type to a new dest each time), with ``--max-sagas``
at 10,000: beyond the cap the memory stays flat.

The node runs in process (``runner.serve`` over in-memory streams) for lines
and steps, so the figures are the request's cost without start-up; and in a
child process of its own for memory, fed by a generator.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.timing import BenchmarkError, Comparison, Config, Series, Stopwatch, Timing

__all__ = ["run_lines", "run_memory", "run_steps"]

ROOT = Path(__file__).resolve().parent.parent
KB = 1024
MB = 1024 * KB


def _serve(data: bytes) -> tuple[Timing, bytes]:
    from sagakit.node.runner import serve

    out = io.BytesIO()
    watch = Stopwatch()
    served = asyncio.run(serve(io.BytesIO(data), out))
    timing = watch.stop()
    if not served:
        raise BenchmarkError("the node stopped before the end of its input")
    return timing, out.getvalue()


def _line(n: int, size: int) -> bytes:
    """One execute line of about ``size`` bytes: a saga with some structure to parse."""
    body: dict[str, Any] = {"type": "execute", "msg_id": n, "saga_id": f"s{n}", "steps": ["a"]}
    head = json.dumps({"src": "c", "dest": "saga", "body": body}, separators=(",", ":"))
    items = max(0, (size - len(head)) // 12)
    body["meta"] = [f"item-{i % 10000:05d}" for i in range(items)]
    return json.dumps({"src": "c", "dest": "saga", "body": body}, separators=(",", ":")).encode()


def _lines_input(size: int, total: int) -> tuple[bytes, int]:
    count = max(1, total // size)
    return b"".join(_line(n, size) + b"\n" for n in range(count)), count


def _check_replies(output: bytes, count: int) -> None:
    replies = output.splitlines()
    if len(replies) != count or any(b"saga_completed" not in r for r in replies):
        raise BenchmarkError(f"expected {count} saga_completed replies, got {len(replies)}")


def run_lines(config: Config) -> list[Comparison]:
    total = config.size(40 * MB, 4 * MB)
    sizes = [("1 MB", MB), ("10 MB", 10 * MB)] if not config.quick else [("1 MB", MB)]
    small, small_count = _lines_input(KB, total)
    comparisons = []
    for label, size in sizes:
        big, big_count = _lines_input(size, max(total, size))
        subject, baseline = Series(f"{label} lines"), Series("1 KB lines")
        for _ in range(config.repeats):
            for series, data, count in ((baseline, small, small_count), (subject, big, big_count)):
                timing, output = _serve(data)
                _check_replies(output, count)
                series.add(len(data), timing)
            print(
                f"  node-lines {label}: {subject.rates[-1] / MB:.1f} MB/s "
                f"vs 1 KB: {baseline.rates[-1] / MB:.1f} MB/s",
                file=sys.stderr,
                flush=True,
            )
        comparisons.append(
            Comparison(
                f"node-lines-{size // MB}mb",
                f"node decoding, {label} lines",
                "bytes/s",
                len(big),
                subject,
                baseline,
                goal=0.5,
            )
        )
    return comparisons


def _execute(steps: int, fail: bool) -> bytes:
    names = [f"step-{i}" for i in range(steps)]
    body: dict[str, Any] = {"type": "execute", "msg_id": 1, "saga_id": "s", "steps": names}
    if fail:
        body["fail_step"] = names[-1]
    return json.dumps({"src": "c", "dest": "saga", "body": body}).encode() + b"\n"


def run_steps(config: Config) -> list[Comparison]:
    sizes = [10_000, 100_000, 300_000] if not config.quick else [10_000]
    base = 1_000
    comparisons = []
    for fail in (False, True):
        kind = "failing at the last step" if fail else "completing"
        expected = b"saga_compensated" if fail else b"saga_completed"
        small = _execute(base, fail)
        for steps in sizes:
            big = _execute(steps, fail)
            subject, baseline = Series(f"{steps:,} steps"), Series(f"{base:,} steps")
            for _ in range(config.repeats):
                for series, data, n in ((baseline, small, base), (subject, big, steps)):
                    timing, output = _serve(data)
                    if expected not in output:
                        raise BenchmarkError(f"execute of {n} steps: {output[:300]!r}")
                    series.add(n, timing)
                print(
                    f"  node-steps {kind} {steps:,}: {subject.rates[-1]:,.0f} steps/s "
                    f"vs {base:,}: {baseline.rates[-1]:,.0f} steps/s",
                    file=sys.stderr,
                    flush=True,
                )
            comparisons.append(
                Comparison(
                    f"node-steps-{'fail' if fail else 'ok'}-{steps // 1000}k",
                    f"execute of {steps:,} steps, {kind}",
                    "steps/s",
                    steps,
                    subject,
                    baseline,
                    goal=0.5,
                )
            )
    return comparisons


# The child: one node fed requests from a generator, sampling its resident set.
_CHILD = r"""
import asyncio, io, json, os, sys
from sagakit.node.host import NodeSettings
from sagakit.node.runner import serve

kind, total, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
checkpoints = {int(c) for c in sys.argv[4].split(",")}
PAGE = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

def request(n):
    if kind == "execute":
        body = {"type": "execute", "msg_id": n, "saga_id": f"s{n}", "steps": ["a", "b", "c"]}
        if n % 3 == 0:
            body["fail_step"] = "b"
        return {"src": "c", "dest": "saga", "body": body}
    if kind == "reserve":
        body = {"type": "reserve_inventory", "msg_id": n, "saga_id": f"s{n}", "sku": "abc",
                "quantity": 1, "fail_payment": n % 3 == 0}
        return {"src": "c", "dest": "inventory", "body": body}
    if kind == "init-unknown":
        return {"src": "c", "dest": f"node-{n}", "body": {"type": "init", "msg_id": n}}
    return {"src": "c", "dest": f"node-{n}", "body": {"type": "frobnicate", "msg_id": n}}

class Requests(io.RawIOBase):
    def __init__(self):
        self.n = 0
        self.samples = []
        self.pending = b""
        if kind == "reserve":
            init = {"src": "c", "dest": "event_bus", "body": {"type": "init", "msg_id": 0}}
            self.pending = json.dumps(init).encode() + b"\n"
    def readable(self):
        return True
    def read1(self, size=-1):
        lines = [self.pending] if self.pending else []
        self.pending = b""
        while self.n < total and len(lines) < 200:
            self.n += 1
            lines.append(json.dumps(request(self.n), separators=(",", ":")).encode() + b"\n")
            if self.n in checkpoints:
                self.samples.append({"done": self.n, "rss": rss(), "t": time.perf_counter()})
        return b"".join(lines)
    read = read1

class Sink(io.RawIOBase):
    def writable(self):
        return True
    def write(self, data):
        return len(data)

import time
requests = Requests()
started = time.perf_counter()
ok = asyncio.run(serve(requests, Sink(), settings=NodeSettings(max_sagas=cap)))
end = {"done": total, "rss": rss(), "t": time.perf_counter()}
samples = [s for s in requests.samples if s["done"] != total] + [end]
print(json.dumps({"ok": ok, "started": started, "samples": samples}))
"""


def _memory_child(kind: str, total: int, cap: int, checkpoints: list[int]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SAGAKIT_LOG": "ERROR"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, str(total), str(cap), ",".join(map(str, checkpoints))],
        env=env,
        capture_output=True,
        text=True,
        timeout=3 * 3600,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise BenchmarkError(f"node-memory {kind} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["ok"]:
        raise BenchmarkError(f"node-memory {kind}: the node stopped early")
    return result


def run_memory(config: Config) -> list[Comparison]:
    total = config.size(1_000_000, 100_000)
    cap = 10_000
    first = total // 10
    checkpoints = sorted({first, total // 2, total})
    comparisons = []
    for kind in ("execute", "reserve", "init-unknown", "unknown-type"):
        result = _memory_child(kind, total, cap, checkpoints)
        samples = result["samples"]
        young, old = samples[0], samples[-1]
        subject = Series(f"after {old['done']:,} requests")
        baseline = Series(f"after {young['done']:,} requests")
        # Rates: requests/s over the first stretch and over the last one.
        young_rate = young["done"] / (young["t"] - result["started"])
        prev = samples[-2] if len(samples) > 1 else young
        old_rate = (old["done"] - prev["done"]) / max(1e-9, old["t"] - prev["t"])
        for series, rate, sample in ((subject, old_rate, old), (baseline, young_rate, young)):
            series.rates.append(rate)
            series.cpu_rates.append(rate)
            series.per_unit.append({"rss MB": sample["rss"] / 1e6})
        trail = ", ".join(f"{s['done'] // 1000}k: {s['rss'] / 1e6:.0f} MB" for s in samples)
        print(f"  node-memory {kind} (cap {cap:,}) rss: {trail}", file=sys.stderr, flush=True)
        comparisons.append(
            Comparison(
                f"node-memory-{kind}",
                f"node memory, {kind}, {total:,} requests, --max-sagas {cap:,}",
                "requests/s",
                total,
                subject,
                baseline,
                # No goal on the rate: the figure this suite is for is the
                # resident memory beside it, which must stay flat.
                goal=None,
            )
        )
    return comparisons
