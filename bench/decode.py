"""Microseconds per decode of typical records: fastavro alone (the codec before the strict pass) against
`Codec.decode` with it, and the strict pass on its own.

``python -m bench.decode [--n 20000]`` prints one line per record; the figures are measurements, not a
pass/fail test.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import fastavro

from plumbing.clock import now_ms
from schemas.codec import HEADER_LEN, Codec
from schemas.records import GenerationRequest, VideoSpec


def _per_call_us(fn: Callable[[], object], n: int) -> float:
    """Microseconds per call of ``fn``: the best of five rounds of ``n`` calls."""
    best = float("inf")
    for _ in range(5):  # the best of five rounds: the least disturbed by a shared machine
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    """Time the three ways to read the same bytes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="decodes per round")
    n = parser.parse_args().n
    codec = Codec()
    image = GenerationRequest(
        request_id="req-1",
        tenant_id="acme",
        kind="IMAGE",
        prompt="a red fox in snow at dawn",
        model="tiny-sd",
        width=512,
        height=512,
        steps=30,
        guidance_scale=7.5,
        created_at=now_ms(),
    )
    samples = {
        "image request": image,
        "video request": replace(
            image,
            request_id="req-2",
            prompt="a red fox in snow " * 10,
            kind="VIDEO",
            video=VideoSpec(num_frames=64, fps=16, prompt_end="at night", seed_end=9),
            negative_prompt="blurry",
            seed=42,
            labels={f"label{i}": "x" * 20 for i in range(8)},
        ),
    }
    for name, request in samples.items():
        data = codec.write(request)
        version = codec.schema("GenerationRequest")

        def fastavro_only(data: bytes = data, parsed: Any = version.parsed) -> object:
            body = io.BytesIO(data)
            body.seek(HEADER_LEN)
            return fastavro.schemaless_reader(body, parsed, None)

        before = _per_call_us(fastavro_only, n)
        after = _per_call_us(partial(codec.decode, data, "GenerationRequest"), n)
        strict = _per_call_us(partial(version.check, data, HEADER_LEN), n)
        print(
            f"{name:14} {len(data):4} B  fastavro alone {before:6.2f} us  "
            f"Codec.decode {after:6.2f} us  strict pass {strict:6.2f} us"
        )


if __name__ == "__main__":
    main()
