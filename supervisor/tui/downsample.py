"""Reduce long series to what a widget of a given width can show."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def minmax(
    xs: Sequence[float], ys: Sequence[float], buckets: int
) -> tuple[list[float], list[float]]:
    """Keep each bucket's lowest and highest finite y (in order), so spikes survive."""
    n = len(ys)
    if buckets <= 0 or n == 0:
        return [], []
    if n <= 2 * buckets:
        pairs = [(x, y) for x, y in zip(xs, ys, strict=False) if math.isfinite(y)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    out_x: list[float] = []
    out_y: list[float] = []
    for b in range(buckets):
        lo, hi = n * b // buckets, n * (b + 1) // buckets
        seg = [(ys[i], i) for i in range(lo, hi) if math.isfinite(ys[i])]
        if not seg:
            continue
        (_ymin, imin), (_ymax, imax) = min(seg), max(seg)
        for i in sorted({imin, imax}):
            out_x.append(xs[i])
            out_y.append(ys[i])
    return out_x, out_y


def stride(
    xs: Sequence[float], ys: Sequence[float], points: int
) -> tuple[list[float], list[float]]:
    """Every k-th finite point (and the last), for smooth series such as an EMA."""
    n = len(ys)
    if points <= 0 or n == 0:
        return [], []
    k = max(1, math.ceil(n / points))
    idx = list(range(0, n, k))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    pairs = [(xs[i], ys[i]) for i in idx if math.isfinite(ys[i])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def reduce_buckets(ys: Sequence[float], cells: int, reduce: Callable[[Sequence[float]], float]) -> list[float]:
    """At most `cells` values: `reduce` of each of `cells` consecutive, never empty buckets."""
    n = len(ys)
    if cells <= 0 or n == 0:
        return []
    if n <= cells:
        return list(ys)
    return [reduce(ys[n * b // cells : max(n * (b + 1) // cells, n * b // cells + 1)])
            for b in range(cells)]


def bucket_max(ys: Sequence[float], cells: int) -> list[float]:
    """Each the max of its bucket (a sparkline shows peaks)."""
    return reduce_buckets(ys, cells, max)


def bucket_min(ys: Sequence[float], cells: int) -> list[float]:
    """Each the min of its bucket (a sparkline shows dips)."""
    return reduce_buckets(ys, cells, min)


def bucket_mean(ys: Sequence[float], cells: int) -> list[float]:
    """Each the mean of its bucket."""
    return reduce_buckets(ys, cells, lambda seg: sum(seg) / len(seg))
