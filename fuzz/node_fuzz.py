"""Coverage-guided fuzzing of the node's decoder and router (atheris, libFuzzer).

    python3 scripts/dev.py fuzz [SECONDS]        # bounded run over fuzz/corpus/node
    .venv/bin/python fuzz/node_fuzz.py fuzz/corpus/node -max_total_time=60

One input is a byte stream and a way to cut it: the stream is decoded whole
and in the pieces the input picks, and every value is routed through a fresh
host. A finding is an exception (the decoder or the router raising, which
would stop the node), a value that depends on the cuts, or a printed line
that is not a JSON object.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["sagakit"]):
    from sagakit.node.framing import BadInput, Decoder
    from sagakit.node.host import Host, NodeSettings
    from sagakit.node.kinds import default_registry

_loop = asyncio.new_event_loop()
_SETTINGS = NodeSettings(max_sagas=8, max_plain_nodes=8)


def _refuse(name: str) -> Any:
    raise AssertionError(f"{name} printed: not JSON")


def _decode(pieces: list[str]) -> list[Any]:
    decoder = Decoder()
    out: list[Any] = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    return out + decoder.close()


def _comparable(values: list[Any]) -> list[Any]:
    return ["<bad input>" if type(v) is BadInput else v for v in values]


async def _route(values: list[Any], lines: list[str]) -> None:
    host = Host(default_registry(), lines.append, _SETTINGS)
    for value in values:
        await host.dispatch(value)
    await host.finish()


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    cuts = provider.ConsumeIntListInRange(provider.ConsumeIntInRange(0, 8), 0, 4096)
    text = provider.ConsumeBytes(sys.maxsize).decode("utf-8", "replace")
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    whole = _decode([text])
    if _comparable(_decode(pieces)) != _comparable(whole):
        raise AssertionError(f"values depend on the cuts {cuts} of {text!r}")
    lines: list[str] = []
    _loop.run_until_complete(_route(whole, lines))
    for line in lines:
        if type(json.loads(line, parse_constant=_refuse)) is not dict:
            raise AssertionError(f"printed a line that is not an object: {line!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
