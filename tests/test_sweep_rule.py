"""The selection rules (early stop + refine, grid, race) on functions with known minima."""
import math

import numpy as np
import pytest

from neon_scale.selection import race, search

GRID = [round(-2 + 0.25 * i, 6) for i in range(17)]


def counting(fn):
    calls = []

    def ev(w, g):
        calls.append((w, g))
        return fn(w, g)
    return ev, calls


@pytest.mark.parametrize("w_star", [1.1, -0.9])
def test_early_stop_finds_minimum_both_sides_with_fewer_points(w_star):
    ev, calls = counting(lambda w, g: (w - w_star) ** 2 + 0.01)
    (bw, bg), best, seen = search(ev, GRID, [], tol=0.0, refine_w=0.1)
    assert bg is None and abs(bw - w_star) < 1e-9 and abs(best - 0.01) < 1e-12
    assert (0.0, None) in seen                       # the baseline is always evaluated
    assert len(calls) == len(set(calls)) < len(GRID)  # no point twice, fewer than the grid


def test_outer_loop_stops_each_direction_after_a_rise_above_tol():
    ev, calls = counting(lambda w, g: abs(w - 0.5))
    search(ev, GRID, [], tol=0.2, refine_w=0.0)
    # +: 0.25 (0.25), 0.5 (0.0), 0.75 (0.25 > 0.0 + 0.2: stop); -: -0.25 (0.75 > 0.5 + 0.2: stop)
    assert sorted(w for w, _ in calls) == [-0.25, 0.0, 0.25, 0.5, 0.75]


def test_inner_guidance_loop_and_refine_grid():
    guidance = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]

    def f(w, g):
        return (w - 1.0) ** 2 + (g - 2.0) ** 2
    ev, calls = counting(f)
    (bw, bg), best, _ = search(ev, GRID, guidance, tol=0.1, refine_w=0.1, refine_guidance=0.1)
    assert (bw, bg) == (1.0, 2.0) and best == 0.0
    assert (1.0, 3.5) not in calls  # inner loop stopped once the metric rose by more than tol
    assert {(0.9, 1.9), (1.1, 2.1), (0.9, 2.1), (1.1, 1.9)} <= set(calls)  # 3 x 3 refine


def test_refine_stays_inside_the_w_range():
    ev, calls = counting(lambda w, g: -w)  # best at the upper edge
    (bw, _), _, _ = search(ev, GRID, [], tol=0.0, refine_w=0.1)
    assert bw == 2.0 and max(w for w, _ in calls) == 2.0 and (1.9, None) in calls


def test_grid_mode_evaluates_everything_without_refine():
    ev, calls = counting(lambda w, g: (w - 1.1) ** 2)
    (bw, _), _, seen = search(ev, GRID, [], mode="grid", refine_w=0.1)
    assert len(calls) == len(GRID) and bw == 1.0


# ------------------------------------------------------------------ race

class Est:
    def __init__(self, metric, replicates):
        self.metric, self.replicates = metric, replicates


def noisy(f, sd=1.0, blocks=20):
    """Estimates of f(w) at n samples: noise of SD sd / sqrt(n) of its own per point, plus a noise
    shared by every point (common random numbers), with jackknife replicates to match."""
    calls = []

    def est(w, g, n):
        calls.append((w, g, n))
        gen = np.random.default_rng([round(w * 1000) + 10_000, n])
        shared = np.random.default_rng([n]).normal(size=blocks) * sd / math.sqrt(n) / math.sqrt(blocks - 1)
        own = gen.normal(size=blocks) * 0.3 * sd / math.sqrt(n) / math.sqrt(blocks - 1)
        reps = f(w) + shared + own
        return Est(float(reps.mean()), tuple(reps))
    return est, calls


def test_race_finds_the_minimum_spending_samples_only_on_contenders():
    est, calls = noisy(lambda w: (w - 0.5) ** 2)
    grid = [round(-2 + 0.25 * i, 6) for i in range(17)]
    (bw, bg), best, last, rounds = race(est, grid, [], n0=100, n_max=6400, z=2.0)
    assert bw == 0.5 and bg is None
    assert [r["n"] for r in rounds] == [100 * 2 ** i for i in range(len(rounds))]
    assert rounds[0]["points"] == 17
    assert rounds[-1]["kept"] == 1 or rounds[-1]["n"] == 6400
    assert sum(n for _w, _g, n in calls) < 17 * 6400 / 5  # far less than every point at n_max
    far = [w for w, _g, n in calls if abs(w - 0.5) >= 1.0]
    assert all(n == 100 for w, _g, n in calls if w in far)  # clear losers: dropped in round 1
    assert last[(0.5, None)] is best


def test_race_stops_when_survivors_are_equivalent_within_tol_and_never_drops_without_an_se():
    est, _ = noisy(lambda w: 0.0 if abs(w) <= 0.25 else 1.0)
    _b, _e, _l, rounds = race(est, [-1.0, -0.25, 0.0, 0.25, 1.0], [], n0=100, n_max=10 ** 6, z=2.0, tol=0.05)
    assert rounds[-1]["n"] < 10 ** 6 and rounds[-1]["kept"] == 3  # the flat bottom: settled, not raced to n_max
    calls = []

    def no_se(w, g, n):
        calls.append(n)
        return Est((w - 0.5) ** 2, None)
    (bw, _), _e, _l, rounds = race(no_se, [0.0, 0.5, 1.0], [1.0, 2.0], n0=10, n_max=40, z=2.0)
    assert bw == 0.5 and [r["kept"] for r in rounds] == [6, 6, 6] and max(calls) == 40


def test_race_refines_around_the_grid_winner_reusing_its_samples():
    est, calls = noisy(lambda w: (w - 0.6) ** 2)
    (bw, _), _best, last, rounds = race(est, GRID, [], n0=100, n_max=6400, z=2.0, refine_w=0.1)
    assert bw == 0.6  # off the grid: 0.5 + 0.1
    refine = [r for r in rounds if r.get("refine")]
    assert refine and refine[0]["points"] == 3 and {(0.4, None), (0.6, None)} <= set(last)
    assert len(calls) == len(set(calls))  # nothing evaluated twice at the same n


def test_race_stops_for_futility_on_a_tie_it_could_not_resolve_at_n_max_and_not_on_a_real_gap():
    tie, _ = noisy(lambda w: 0.0 if abs(w) <= 0.25 else 1.0)
    grid = [-1.0, -0.25, 0.0, 0.25, 1.0]
    _b, _e, _l, rounds = race(tie, grid, [], n0=100, n_max=6400, z=2.0)
    assert rounds[-1]["stop"] == "futility" and 1600 <= rounds[-1]["n"] < 6400 and rounds[-1]["kept"] == 3
    assert all("stop" not in r for r in rounds[:-1]) and all(r["n"] >= 1600 for r in rounds if r.get("stop"))
    _b, _e, _l, rounds = race(tie, grid, [], n0=100, n_max=6400, z=2.0, futility=False)
    assert rounds[-1]["stop"] == "n_max" and rounds[-1]["n"] == 6400
    # a gap of about 2 paired se at n_max / 4 (4 at n_max): raced on until it is resolved
    gap, _ = noisy(lambda w: 0.0 if w == 0 else 0.025 if w == 0.25 else 1.0)
    (bw, _), _e, _l, rounds = race(gap, grid, [], n0=100, n_max=6400, z=2.0)
    assert bw == 0.0 and rounds[-1]["stop"] == "one point"


def test_race_tolerance_drops_a_point_not_better_by_more_than_half_of_it():
    grid = [-1.0, 0.0, 0.25, 1.0]
    # w = 0.25 is 0.02 worse than w = 0: resolving that takes n ~ 6400 (the gap test above)
    near, calls = noisy(lambda w: 0.0 if w == 0 else 0.02 if w == 0.25 else 1.0)
    _b, _e, _l, exact = race(near, grid, [], n0=100, n_max=6400, z=2.0)
    spent = sum(n for _w, _g, n in calls)
    calls.clear()
    (bw, _), _e, _l, rounds = race(near, grid, [], n0=100, n_max=6400, z=2.0, tol=0.08)
    assert bw in (0.0, 0.25) and rounds[-1]["stop"] == "one point"  # either is within tol / 2 = 0.04
    assert rounds[-1]["n"] < exact[-1]["n"] and sum(n for _w, _g, n in calls) < spent / 2
    # a point better by more than tol / 2 is not given up: the race resolves it
    far, _ = noisy(lambda w: 0.1 if w == 0 else 0.0 if w == 0.25 else 1.0)
    (bw, _), _e, _l, rounds = race(far, grid, [], n0=100, n_max=6400, z=2.0, tol=0.08)
    assert bw == 0.25
