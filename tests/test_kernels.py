"""Triton merge kernel (interpreter mode on CPU) against its torch reference, fresh random inputs."""
import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1"
# The inputs hold NaN/inf on purpose; the interpreter's numpy warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
from neon_scale.kernels.extrapolate import extrapolate, extrapolate_reference  # noqa: E402


def _inputs(n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen) * 3
    synth = base + 0.01 * torch.randn(n, generator=gen)
    base[::97] = float("-inf")
    base[5::131] = float("nan")
    return base.to(dtype), synth.to(dtype)


@pytest.mark.parametrize("n", [1, 1023, 4099])
@pytest.mark.parametrize("w", [-1.3, 0.7, 2.0])
def test_fp32_matches_reference(n, w):
    base, synth = _inputs(n, torch.float32, n)
    out = extrapolate(base, synth, w)
    ref = extrapolate_reference(base, synth, w)
    torch.testing.assert_close(out, ref, rtol=2e-7, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_within_one_ulp(dtype):
    base, synth = _inputs(2053, dtype, 11)
    out = extrapolate(base, synth, 1.1)
    ref = extrapolate_reference(base, synth, 1.1)
    assert out.dtype == dtype
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite)
    diff = (out[finite].double() - ref[finite].double()).abs()
    ulp = torch.finfo(dtype).eps * ref[finite].double().abs().clamp_min(torch.finfo(dtype).tiny)
    assert (diff <= ulp * 1.01).all()


def test_in_place():
    base, synth = _inputs(777, torch.float32, 5)
    ref = extrapolate_reference(base, synth, 0.5)
    out = extrapolate(base, synth, 0.5, out=base)
    assert out.data_ptr() == base.data_ptr()
    torch.testing.assert_close(base, ref, equal_nan=True)
