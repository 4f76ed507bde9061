"""The selection rule over (w, guidance) for one fine-tune checkpoint, independent of models.

`early_stop` (the authors' rule, as the paper describes its selection): the outer loop walks the w grid outwards
from w = 0 (the baseline, always evaluated), in both directions, and stops a direction when the
best metric of a w is more than `tol` worse than that of the previous w; the inner loop walks
the guidance values in order and stops when the metric rises more than `tol` above the best of
that w. Then a 3 x 3 refine grid of +-refine_w, +-refine_guidance around the best point
(w kept inside the grid's range).
The authors swept w > 0 only (mode-seeking samplers); walking both ways from 0 lets the same
rule find w < 0 for diversity-seeking samplers.
`grid`: every (w, guidance) of the grid, no refine.
`race`: every (w, guidance) of the grid starts at n0 samples; each round drops the points whose
difference to the round's best exceeds z standard errors of that difference (paired: the same
noise) less tol / 2, and doubles n for the survivors (a point at 2n reuses its n samples), until
one point is left, or every survivor is within `tol` of the best with confidence (difference +
z se <= tol), or (futility) no survivor could be told apart from the best even at n_max: each
one's difference is at most z standard errors projected to n_max (se * sqrt(n / n_max), the
1/sqrt(n) law), so the last doublings would end in the same tie; the projection takes the
observed difference for the true one, so it is trusted over a factor of 4 in n at most (n >=
n_max / 4); or n reaches n_max. The winner is the point with the lowest metric in the last round
(ties: the smaller |w|, the smaller extrapolation). `tol` is early_stop's: the difference not
worth samples. A point is dropped once the data say, at z standard errors, that it is not better
than the best by more than tol / 2 (difference > z se - tol / 2), so a drop costs about tol / 2
at most; the shift by half the indifference zone is that of the sequential selection procedures
(Paulson 1964; Kim & Nelson 2001: lambda = delta / 2). With tol = 0, a plain z test. Then, as
early_stop, the 3 x 3 refine grid around the winner races the same way (the winner's samples
reused): the grid alone missed the best w by 0.1 on the toy (bench/selection.py).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Protocol

from .metrics.uncertainty import paired_se

Point = tuple[float, Optional[float]]


class Estimate(Protocol):
    """A point's metric and its jackknife replicates (stages.evaluate.Estimate)."""
    metric: float
    replicates: Optional[tuple[float, ...]]


def _key(w: float, g: Optional[float]) -> Point:
    return round(w, 6), (None if g is None else round(g, 6))


def search(evaluate: Callable[[float, Optional[float]], float], w_grid: list[float], guidance: list,
           mode: str = "early_stop", tol: float = 0.0, refine_w: float = 0.0, refine_guidance: float = 0.0
           ) -> tuple[Point, float, dict[Point, float]]:
    """Return (best point, best metric, every evaluated point -> metric)."""
    if not w_grid:
        raise ValueError("empty w grid")
    guidance = list(guidance) or [None]
    seen: dict[Point, float] = {}

    def ev(w, g) -> float:
        key = _key(w, g)
        if key not in seen:
            seen[key] = evaluate(*key)
        return seen[key]

    def best_over_guidance(w: float) -> float:
        best = math.inf
        for g in guidance:
            m = ev(w, g)
            if m < best:
                best = m
            elif mode == "early_stop" and m > best + tol:
                break
        return best

    if mode == "grid":
        for w in w_grid:
            best_over_guidance(w)
    else:
        at_zero = best_over_guidance(0.0)
        for side in ([w for w in w_grid if w > 0], [w for w in reversed(w_grid) if w < 0]):
            prev = at_zero
            for w in side:
                b = best_over_guidance(w)
                if b > prev + tol:
                    break
                prev = b
        best, _ = min(seen.items(), key=lambda kv: kv[1])
        for w, g in _refine_grid(best, w_grid, guidance, refine_w, refine_guidance):
            ev(w, g)
    best, metric = min(seen.items(), key=lambda kv: kv[1])
    return best, metric, seen


def _refine_grid(best: Point, w_grid: list[float], guidance: list, refine_w: float,
                 refine_guidance: float) -> list[tuple[float, Optional[float]]]:
    """The 3 x 3 refine grid around `best` (+-refine_w, +-refine_guidance; a zero half-width, or a
    single guidance value, collapses that axis), w kept inside the configured range."""
    bw, bg = best
    dws = (-refine_w, 0.0, refine_w) if refine_w > 0 else (0.0,)
    dgs = (-refine_guidance, 0.0, refine_guidance) if refine_guidance > 0 and len(guidance) > 1 else (0.0,)
    lo, hi = min(w_grid), max(w_grid)
    return [(bw + dw, None if bg is None else bg + dg) for dw in dws for dg in dgs
            if lo - 1e-9 <= bw + dw <= hi + 1e-9]


def race(estimate: Callable[[float, Optional[float], int], Estimate], w_grid: list[float], guidance: list,
         n0: int, n_max: int, z: float, tol: float = 0.0, refine_w: float = 0.0, refine_guidance: float = 0.0,
         futility: bool = True) -> tuple[Point, Estimate, dict[Point, Estimate], list[dict]]:
    """Return (winner, its estimate, every point -> its estimate at the largest n it reached, the
    rounds). `estimate(w, g, n)` gives an object with .metric and .replicates (stages.evaluate.Estimate).
    With refine_w / refine_guidance, a second race over the winner's 3 x 3 neighbourhood (as
    early_stop's refine grid, w kept inside the grid's range), the winner entering with its samples."""
    if not w_grid:
        raise ValueError("empty w grid")
    guidance = list(guidance) or [None]
    memo: dict[tuple, Estimate] = {}  # (w, g, n) -> estimate

    def cached(w, g, n) -> Estimate:  # the refine race meets the winner again at the same n
        if (w, g, n) not in memo:
            memo[(w, g, n)] = estimate(w, g, n)
        return memo[(w, g, n)]

    best, rounds = _race(cached, [_key(w, g) for w in w_grid for g in guidance], n0, n_max, z, tol, futility)
    if refine_w > 0 or (refine_guidance > 0 and len(guidance) > 1):
        near = [_key(w, g) for w, g in _refine_grid(best, w_grid, guidance, refine_w, refine_guidance)]
        best, more = _race(cached, list(dict.fromkeys([best, *near])), n0, n_max, z, tol, futility)
        rounds += [{**r, "refine": True} for r in more]
    last: dict[Point, Estimate] = {}  # each point at the largest n it reached
    for (w, g, _n), e in sorted(memo.items(), key=lambda kv: kv[0][2]):
        last[(w, g)] = e
    return best, last[best], last, rounds


def _race(estimate, alive: list[Point], n0: int, n_max: int, z: float, tol: float,
          futility: bool) -> tuple[Point, list[dict]]:
    rounds, n = [], min(n0, n_max)
    while True:
        est = {p: estimate(*p, n) for p in alive}
        best = min(alive, key=lambda p: (est[p].metric, abs(p[0])))
        gap = {p: (est[p].metric - est[best].metric, paired_se(est[p].replicates, est[best].replicates))
               for p in alive}
        # an unknown SE (too few samples) never drops a point
        keep = [p for p in alive if p == best or gap[p][1] is None or gap[p][0] <= z * gap[p][1] - tol / 2]
        alive = keep
        settled = all(p == best or (gap[p][1] is not None and gap[p][0] + z * gap[p][1] <= tol) for p in alive)
        shrink = math.sqrt(n / n_max)  # the se at n_max over the se now
        futile = futility and 4 * n >= n_max and all(
            p == best or (gap[p][1] is not None and gap[p][0] <= z * gap[p][1] * shrink) for p in alive)
        stop = ("one point" if len(alive) == 1 else "settled" if settled else "futility" if futile
                else "n_max" if n >= n_max else None)
        rounds.append({"n": n, "points": len(est), "kept": len(keep), "best": list(best),
                       "best_metric": est[best].metric, **({"stop": stop} if stop else {})})
        if stop:
            return best, rounds
        n = min(2 * n, n_max)
