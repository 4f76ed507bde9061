"""The merge formula and its edge-case policy, against a float64 reference."""
import pytest
import torch

from neon_scale.errors import NeonError
from neon_scale.merge.extrapolate import MergeReport, extrapolate_state


def _random_state(gen, shapes):
    return {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}


@pytest.mark.parametrize("w", [-2.0, -0.35, 0.0, 1.0, 2.7])
def test_float_tensors_match_float64_reference(w):
    gen = torch.Generator().manual_seed(7)
    shapes = {"a.weight": (17, 9), "a.bias": (17,), "b": (3, 5, 7)}
    base, synth = _random_state(gen, shapes), _random_state(gen, shapes)
    merged = extrapolate_state(base, synth, w)
    for k in shapes:
        ref = base[k].double() + w * (base[k].double() - synth[k].double())
        assert merged[k].dtype == torch.float32
        torch.testing.assert_close(merged[k].double(), ref, rtol=1e-6, atol=1e-6)
    if w == 0.0:
        assert all(torch.equal(merged[k], base[k]) for k in shapes)


def test_half_precision_keeps_dtype_and_rounds_once():
    gen = torch.Generator().manual_seed(3)
    base = {"x": torch.randn(1001, generator=gen).to(torch.bfloat16)}
    synth = {"x": torch.randn(1001, generator=gen).to(torch.bfloat16)}
    out = extrapolate_state(base, synth, 1.5)["x"]
    ref = (base["x"].double() + 1.5 * (base["x"].double() - synth["x"].double())).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    # fp32 arithmetic then one rounding: at most one bf16 ulp from the float64 result
    ulp = torch.finfo(torch.bfloat16).eps * ref.double().abs().clamp_min(1e-30)
    assert ((out.double() - ref.double()).abs() <= ulp * 1.01).all()


def test_policy_non_float_non_finite_and_missing_keys():
    base = {
        "w": torch.tensor([1.0, 2.0, 3.0]),
        "mask": torch.tensor([0.0, float("-inf"), float("inf"), float("nan")]),
        "steps": torch.tensor([5, 6], dtype=torch.int64),
        "only_base": torch.tensor([9.0]),
    }
    synth = {
        "w": torch.tensor([0.5, 2.0, 4.0]),
        "mask": torch.tensor([1.0, float("-inf"), 0.0, 1.0]),
        "steps": torch.tensor([7, 8], dtype=torch.int64),
    }
    report = MergeReport()
    out = extrapolate_state(base, synth, 2.0, report)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 2.0, 1.0]))
    assert out["mask"][0].item() == -2.0
    assert out["mask"][1].item() == float("-inf") and out["mask"][2].item() == float("inf")
    assert torch.isnan(out["mask"][3])
    assert torch.equal(out["steps"], base["steps"]) and out["steps"].dtype == torch.int64
    assert torch.equal(out["only_base"], base["only_base"])
    assert report.copied_non_float == ["steps"] and report.missing_in_theta_s == ["only_base"]
    assert report.non_finite_elements == 3 and report.merged == 2


def test_key_only_in_synth_and_shape_mismatch_are_errors():
    with pytest.raises(NeonError, match="theta_s has key 'extra' that the base lacks"):
        extrapolate_state({"a": torch.zeros(2)}, {"a": torch.zeros(2), "extra": torch.zeros(1)}, 1.0)
    with pytest.raises(NeonError, match=r"key 'a': base shape \(2,\) vs theta_s shape \(3,\)"):
        extrapolate_state({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 1.0)


def test_finite_values_whose_sum_overflows_take_the_exact_path():
    from neon_scale.kernels.reference import has_only_finite

    base = {"x": torch.tensor([3e38, 3e38, 1.0, -2.0])}
    synth = {"x": torch.tensor([3e38, 3e38, 0.0, -1.0])}
    assert not has_only_finite(base["x"]) and bool(torch.isfinite(base["x"]).all())
    out = extrapolate_state(base, synth, 0.5)["x"]
    torch.testing.assert_close(out, torch.tensor([3e38, 3e38, 1.5, -2.5]))
