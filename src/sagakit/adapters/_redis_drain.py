"""What the Redis bus's drain() asks the server: has every group read and acknowledged all?"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis import exceptions as rexc

from sagakit.adapters._redis_consumer import sid, translate

if TYPE_CHECKING:
    from sagakit.adapters._redis_consumer import Reader

__all__ = ["all_settled"]


async def all_settled(
    redis: Any,
    backend: str,
    readers: list[Reader],
    targets: dict[str, tuple[int, int]],
    published: dict[str, tuple[int, int]],
) -> bool:
    """Has every group here read up to its target and acknowledged all it read?"""
    streams = sorted({r.stream for r in readers})
    if not streams:
        return True
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_groups(stream)
                pipe.xrevrange(stream, "+", "-", count=1)
            replies = await pipe.execute()
    except rexc.ResponseError:
        return False  # a stream gone missing: its consumer recreates it
    except rexc.RedisError as exc:
        raise translate(exc, backend, "draining") from exc
    state: dict[tuple[str, str], tuple[tuple[int, int], int]] = {}
    for i, stream in enumerate(streams):
        last = replies[2 * i + 1]
        # Events published so far: the stream's newest entry when drain began.
        if stream not in targets:
            targets[stream] = sid(last[0][0]) if last else (0, 0)
        targets[stream] = max(targets[stream], published.get(stream, (0, 0)))
        for info in replies[2 * i]:
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            state[stream, name] = (sid(info["last-delivered-id"]), int(info["pending"]))
    for reader in readers:
        delivered, pending = state.get((reader.stream, reader.group), ((0, 0), 1))
        if pending or delivered < targets[reader.stream]:
            return False
    return True
