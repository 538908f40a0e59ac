"""Coverage-guided fuzzing of the node's decoder and router (atheris, libFuzzer).

    python3 scripts/dev.py fuzz [SECONDS]        # bounded run over fuzz/corpus/node
    .venv/bin/python fuzz/node_fuzz.py fuzz/corpus/node -max_total_time=60

One input is a byte stream and a way to cut it: the stream is decoded whole
and in the pieces the input picks, and every value is routed through a fresh
host. A finding is an exception (the decoder or the router raising, which
would stop the node), a value that depends on the cuts, a printed line that
is not a JSON object, or a request that does not get exactly one reply.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections import Counter
from typing import Any

import atheris

with atheris.instrument_imports(include=["sagakit"]):
    from sagakit.node.framing import BadInput, Decoder, SameLine
    from sagakit.node.host import Host, NodeSettings
    from sagakit.node.kinds import default_registry

_loop = asyncio.new_event_loop()
_SETTINGS = NodeSettings(max_sagas=8, max_records=256, max_plain_nodes=8)


def _refuse(name: str) -> Any:
    raise AssertionError(f"{name} printed: not JSON")


def _decode(pieces: list[str]) -> list[Any]:
    decoder = Decoder()
    out: list[Any] = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    return out + decoder.close()


def _flat(values: list[Any]) -> list[Any]:
    # A line's values come as one SameLine, or one by one where the cuts let a
    # whole object through before its line ended: the same values either way.
    return [v for value in values for v in (value if type(value) is SameLine else [value])]


def _comparable(values: list[Any]) -> list[Any]:
    return ["<bad input>" if type(v) is BadInput else v for v in _flat(values)]


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
    answered: Counter[int] = Counter()
    for line in lines:
        message = json.loads(line, parse_constant=_refuse)
        if type(message) is not dict:
            raise AssertionError(f"printed a line that is not an object: {line!r}")
        in_reply_to = message["body"].get("in_reply_to")
        if type(in_reply_to) is int:
            answered[in_reply_to] += 1
    # Every request (an object with string src and dest, a body with an
    # integer msg_id) gets exactly one reply, an error if nothing else.
    asked = Counter(_request(v)["body"]["msg_id"] for v in _flat(whole) if _is_request(v))
    if asked != answered:
        raise AssertionError(f"requests {dict(asked)} got replies {dict(answered)}")


def _request(value: Any) -> Any:
    # A message holding a number out of range is answered too (error 12).
    return value.message if type(value) is BadInput and value.message is not None else value


def _is_request(value: Any) -> bool:
    value = _request(value)
    if type(value) is not dict:
        return False
    body = value.get("body")
    return (
        type(value.get("src")) is str
        and type(value.get("dest")) is str
        and type(body) is dict
        and type(body.get("msg_id")) is int
    )


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
