"""The selection rule (early stop + refine) on functions with known minima."""
import pytest

from neon_scale.selection import search

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
