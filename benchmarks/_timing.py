"""Timing helper shared by the benchmark scripts: warm up, then report median / p10 / p90."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def measure(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 15) -> dict[str, float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times; milliseconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    q = statistics.quantiles(times, n=10)
    return {"median": statistics.median(times), "p10": q[0], "p90": q[-1]}


def fmt(name: str, r: dict[str, float]) -> str:
    return f"{name:<52} median {r['median']:9.2f} ms   p10 {r['p10']:9.2f}   p90 {r['p90']:9.2f}"
