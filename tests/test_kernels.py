"""Triton merge kernel (interpreter mode on CPU) against its torch reference, fresh random inputs."""
import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1"
# The inputs hold NaN/inf on purpose; the interpreter's numpy warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
import neon_scale.kernels.extrapolate as ext  # noqa: E402
from neon_scale.kernels.extrapolate import (  # noqa: E402
    extrapolate,
    extrapolate_many,
    extrapolate_reference,
)


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


# ---- extrapolate_many: many tensors of odd sizes per launch ---------------------------------

SHAPES = [(1,), (0,), (17,), (1023,), (4099,), (33, 65)]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _many_inputs(shapes, seed, dtypes=(F32, F32)):
    """Fresh random (base, synth) pairs; about 3% of base elements are NaN, -inf or +inf."""
    gen = torch.Generator().manual_seed(seed)
    bases, synths = [], []
    for shape in shapes:
        base = torch.randn(shape, generator=gen) * 3
        synth = base + 0.05 * torch.randn(shape, generator=gen)
        u = torch.rand(shape, generator=gen)
        base[u < 0.01] = float("nan")
        base[(u >= 0.01) & (u < 0.02)] = float("-inf")
        base[(u >= 0.02) & (u < 0.03)] = float("inf")
        bases.append(base.to(dtypes[0]))
        synths.append(synth.to(dtypes[1]))
    return bases, synths


def _ref32(base, synth, w):
    """The reference at fp32 (exact widening of any input dtype): what the kernel computes before the store."""
    return extrapolate_reference(base.float(), synth.float(), w)


def _assert_matches(out, ref32):
    """fp32 out: equal up to rounding; fp16/bf16 out: non-finite pattern exact, finite within 1 ulp
    of the reference (the interpreter rounds fp32->bf16 toward zero, CUDA to nearest)."""
    assert out.shape == ref32.shape
    if out.dtype == F32:
        torch.testing.assert_close(out, ref32, rtol=2e-7, atol=1e-7, equal_nan=True)
        return
    ref = ref32.to(out.dtype)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite)
    assert torch.equal(out[~finite].isnan(), ref[~finite].isnan())
    assert torch.equal(out[torch.isinf(ref)], ref[torch.isinf(ref)])
    diff = (out[finite].double() - ref[finite].double()).abs()
    ulp = torch.finfo(out.dtype).eps * ref[finite].double().abs().clamp_min(torch.finfo(out.dtype).tiny)
    assert (diff <= ulp * 1.01).all()


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of the multi-tensor kernel."""
    count = []
    kernel = ext._extrapolate_many_kernel

    class Counting:
        def __getitem__(self, grid):
            count.append(grid)
            return kernel[grid]

    monkeypatch.setattr(ext, "_extrapolate_many_kernel", Counting())
    return count


@pytest.mark.parametrize("w,seed", [(-1.3, 101), (0.7, 102), (2.0, 103)])
def test_many_fp32_odd_sizes_one_launch(w, seed, launches):
    bases, synths = _many_inputs(SHAPES, seed)
    before = [b.clone() for b in bases]
    outs = extrapolate_many(bases, synths, w)
    assert len(launches) == 1
    for b, s, o, b0 in zip(bases, synths, outs, before):
        assert o.dtype == F32 and o.is_contiguous() and o is not b
        _assert_matches(o, extrapolate_reference(b, s, w))
        assert torch.equal(b.isnan(), b0.isnan()) and torch.equal(b.nan_to_num(), b0.nan_to_num())


def test_many_tensors_each_block_finds_its_tensor(launches):
    """37 tensors (empty ones first, last and between; sizes on and off the block boundary): every
    program's binary search over the per-tensor table lands on its own tensor."""
    gen = torch.Generator().manual_seed(7)
    sizes = [0] + [int(x) for x in torch.randint(0, 3 * 1024, (35,), generator=gen)] + [0]
    sizes[5], sizes[6], sizes[20] = 0, 1024, 2048
    bases, synths = _many_inputs([(n,) for n in sizes], 301)
    outs = extrapolate_many(bases, synths, 0.9)
    assert len(launches) == 1
    for b, s, o in zip(bases, synths, outs):
        _assert_matches(o, extrapolate_reference(b, s, 0.9))


@pytest.mark.parametrize("dtype,seed", [(F16, 201), (BF16, 202)])
def test_many_half_types_within_one_ulp(dtype, seed, launches):
    bases, synths = _many_inputs(SHAPES, seed, (dtype, dtype))
    outs = extrapolate_many(bases, synths, 1.1)
    assert len(launches) == 1
    for b, s, o in zip(bases, synths, outs):
        assert o.dtype == dtype
        _assert_matches(o, _ref32(b, s, 1.1))


COMBOS = [(BF16, F32, F32), (F16, BF16, F16), (F32, F16, BF16), (F32, F32, F32), (BF16, BF16, F16)]


def test_many_mixed_dtypes_one_launch_per_combo(launches):
    bases, synths, outs = [], [], []
    for k, shape in enumerate(SHAPES * 2):
        bd, sd, od = COMBOS[k % len(COMBOS)]
        (b,), (s,) = _many_inputs([shape], 300 + k, (bd, sd))
        bases.append(b), synths.append(s), outs.append(torch.full(shape, 7.0, dtype=od))
    got = extrapolate_many(bases, synths, -0.6, outs)
    assert len(launches) == len(COMBOS)
    for b, s, o, g in zip(bases, synths, outs, got):
        assert g is o
        _assert_matches(o, _ref32(b, s, -0.6))


def test_many_in_place():
    bases, synths = _many_inputs(SHAPES, 401)
    hb, hs = _many_inputs(SHAPES[2:], 402, (BF16, F16))
    bases += hb
    synths += hs
    bases.append(torch.randn(40, 30, generator=torch.Generator().manual_seed(403)).t())  # strided base
    synths.append(torch.randn(30, 40, generator=torch.Generator().manual_seed(404)))
    refs = [_ref32(b, s, 0.5) for b, s in zip(bases, synths)]
    ptrs = [b.data_ptr() for b in bases]
    outs = extrapolate_many(bases, synths, 0.5, outs=bases)
    assert all(o is b for o, b in zip(outs, bases))
    assert [b.data_ptr() for b in bases] == ptrs
    assert not bases[-1].is_contiguous()
    for b, ref in zip(bases, refs):
        _assert_matches(b, ref)


def test_many_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(501)
    base = torch.randn(64, 48, generator=gen)[:, ::3]  # strided rows
    base[0, 0] = float("nan")
    synth = torch.randn(16, 64, generator=gen).t()
    out = torch.empty(64, 32).t()[:16].t()  # a non-contiguous out is written back
    got = extrapolate_many([base, synth], [synth, base], 1.5)
    _assert_matches(got[0], extrapolate_reference(base, synth, 1.5))
    _assert_matches(got[1], extrapolate_reference(synth, base, 1.5))
    res = extrapolate_many([base], [synth], 1.5, [out])
    assert res[0] is out and not out.is_contiguous()
    _assert_matches(out, extrapolate_reference(base, synth, 1.5))


def test_many_validation_errors():
    a, b = torch.zeros(3), torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"index 1: base \(2, 2\) vs synth \(4,\)"):
        extrapolate_many([a, b], [a, torch.zeros(4)], 1.0)
    with pytest.raises(ValueError, match=r"index 0: .*out \(2,\)"):
        extrapolate_many([a], [a], 1.0, [torch.zeros(2)])
    with pytest.raises(ValueError, match="length mismatch"):
        extrapolate_many([a, a], [a], 1.0)
    with pytest.raises(ValueError, match="float64 not supported"):
        extrapolate_many([a.double()], [a], 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        extrapolate(a, b, 1.0)
    assert extrapolate_many([], [], 1.0) == []


def test_many_writes_nothing_outside_the_outs():
    """Outs are views into one buffer with sentinel gaps: the block masks must spare the gaps."""
    bases, synths = _many_inputs(SHAPES, 601)
    gap, sentinel = 5, 12345.0
    buf = torch.full((sum(b.numel() + gap for b in bases) + gap,), sentinel)
    outs, offset, used = [], gap, torch.zeros_like(buf, dtype=torch.bool)
    for b in bases:
        outs.append(buf[offset:offset + b.numel()].view(b.shape))
        used[offset:offset + b.numel()] = True
        offset += b.numel() + gap
    extrapolate_many(bases, synths, 0.9, outs)
    assert (buf[~used] == sentinel).all()
    for b, s, o in zip(bases, synths, outs):
        _assert_matches(o, extrapolate_reference(b, s, 0.9))
