"""Fused guidance + sampler-step kernels (Triton, interpreter mode on CPU) against their torch
references, and the references against the formulas written out independently in float64."""
import math
import os
import re

import numpy as np
import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1"
from neon_scale.kernels import cfg_step  # noqa: E402
from neon_scale.kernels import sampling_reference as ref  # noqa: E402

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
# fp32: the kernels do the reference's operations in its order (no FMA, IEEE division), so they
# differ at most by exp's last bit; 1e-6 is a few ulp at the O(1) magnitudes used here.
TIGHT = dict(rtol=1e-6, atol=1e-6)
TIGHT64 = dict(rtol=1e-12, atol=1e-12)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _schedule(i: int, n: int = 1000) -> dict:
    """DiT's linear schedule at step i (float64 numpy), the quantities the formulas use."""
    betas = np.linspace(1e-4, 0.02, n, dtype=np.float64)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:]))
    return dict(beta=float(betas[i]), ac=float(ac[i]), ac_prev=float(ac_prev[i]),
                log_beta=float(np.log(betas[i])), post_log_var_clipped=float(post_log_var_clipped[i]))


def _ddpm_coefs(i: int, guided_channels: int) -> dict:
    s = _schedule(i)
    b, ac, ac_prev = s["beta"], s["ac"], s["ac_prev"]
    return dict(guided_channels=guided_channels, sqrt_recip_ac=math.sqrt(1 / ac), sqrt_recipm1_ac=math.sqrt(1 / ac - 1),
                mean_coef1=b * math.sqrt(ac_prev) / (1 - ac), mean_coef2=(1 - ac_prev) * math.sqrt(1 - b) / (1 - ac),
                log_var_min=s["post_log_var_clipped"], log_var_max=s["log_beta"])


def _ddim_coefs(i: int, guided_channels: int, eta: float) -> dict:
    s = _schedule(i)
    ac, ac_prev = s["ac"], s["ac_prev"]
    sigma = eta * math.sqrt((1 - ac_prev) / (1 - ac)) * math.sqrt(1 - ac / ac_prev)
    return dict(guided_channels=guided_channels, sqrt_recip_ac=math.sqrt(1 / ac), sqrt_recipm1_ac=math.sqrt(1 / ac - 1),
                sqrt_ac_prev=math.sqrt(ac_prev), dir_coef=math.sqrt(max(1 - ac_prev - sigma**2, 0.0)), sigma=sigma)


def _dit_inputs(shape, out_channels, guided, seed, x_dtype=F32, out_dtype=F32, noise_dtype=F32):
    b = shape[0]
    gen = _gen(seed)
    x = torch.randn(shape, generator=gen).to(x_dtype)
    out = torch.randn((2 * b if guided else b, out_channels, *shape[2:]), generator=gen)
    if out_channels == 2 * shape[1]:  # variance values live in [-1, 1]
        out[:, shape[1]:] = out[:, shape[1]:].tanh()
    noise = torch.randn(shape, generator=gen).to(noise_dtype)
    return x, out.to(out_dtype), noise


def _within_ulps(out, expect, dtype, ulps=1):
    diff = (out.double() - expect.double()).abs()
    ulp = torch.finfo(dtype).eps * expect.double().abs().clamp_min(torch.finfo(dtype).tiny)
    assert (diff <= ulps * ulp * 1.01).all(), f"max diff {diff.max().item():.3g}"


# ---- kernel == reference ------------------------------------------------------------------

DIT_SHAPES = [(1, 4, 1, 1), (3, 4, 5, 7), (2, 3, 33, 35), (1, 4, 32, 32)]


@pytest.mark.parametrize("shape", DIT_SHAPES)
@pytest.mark.parametrize("scale", [None, 4.0])
@pytest.mark.parametrize("with_noise", [True, False])
@pytest.mark.parametrize("step", [0, 500, 999])
def test_ddpm_matches_reference(shape, scale, with_noise, step):
    x, out, noise = _dit_inputs(shape, 2 * shape[1], scale is not None, seed=step + shape[2])
    noise = noise if with_noise else None
    coefs = _ddpm_coefs(step, guided_channels=3)
    got = cfg_step.ddpm_step(x, out, noise, scale=scale, use_triton=True, **coefs)
    expect = ref.ddpm_step(x, out, noise, scale=scale, **coefs)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, expect, **TIGHT)


@pytest.mark.parametrize("guided_channels", [0, 1, 4, 6, 99])
def test_ddpm_guided_channels(guided_channels):
    """< C: part of eps; C: all of eps; 6 of 2C = 8: eps and two variance channels (the
    reference guides over the whole model output); more than 2C: everything."""
    x, out, noise = _dit_inputs((2, 4, 9, 11), 8, True, seed=guided_channels)
    coefs = _ddpm_coefs(300, guided_channels=guided_channels)
    got = cfg_step.ddpm_step(x, out, noise, scale=2.5, use_triton=True, **coefs)
    torch.testing.assert_close(got, ref.ddpm_step(x, out, noise, scale=2.5, **coefs), **TIGHT)


@pytest.mark.parametrize("shape", DIT_SHAPES)
@pytest.mark.parametrize("scale", [None, 4.0])
@pytest.mark.parametrize("out_factor", [1, 2])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_reference(shape, scale, out_factor, eta):
    x, out, noise = _dit_inputs(shape, out_factor * shape[1], scale is not None, seed=shape[2] + out_factor)
    for step in (0, 480, 999):
        coefs = _ddim_coefs(step, guided_channels=3, eta=eta)
        for n in (noise, None):
            got = cfg_step.ddim_step(x, out, n, scale=scale, use_triton=True, **coefs)
            expect = ref.ddim_step(x, out, n, scale=scale, **coefs)
            torch.testing.assert_close(got, expect, **TIGHT)


@pytest.mark.parametrize("guided_channels", [0, 2, 4, 99])
def test_ddim_guided_channels(guided_channels):
    x, out, noise = _dit_inputs((3, 4, 7, 5), 8, True, seed=guided_channels)
    coefs = _ddim_coefs(700, guided_channels=guided_channels, eta=1.0)
    got = cfg_step.ddim_step(x, out, noise, scale=3.0, use_triton=True, **coefs)
    torch.testing.assert_close(got, ref.ddim_step(x, out, noise, scale=3.0, **coefs), **TIGHT)


def test_ddim_sigma_zero_ignores_noise():
    x, out, noise = _dit_inputs((2, 4, 6, 6), 8, True, seed=3)
    coefs = _ddim_coefs(400, guided_channels=3, eta=0.0)
    assert coefs["sigma"] == 0
    a = cfg_step.ddim_step(x, out, noise, scale=4.0, use_triton=True, **coefs)
    b = cfg_step.ddim_step(x, out, None, scale=4.0, use_triton=True, **coefs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("x_dtype,out_dtype,noise_dtype", [
    (F32, BF16, F32), (F32, F16, BF16), (F32, F64, F64), (BF16, BF16, BF16), (F16, F32, F16), (F64, F32, F64)])
def test_dit_dtypes(x_dtype, out_dtype, noise_dtype):
    """Any float dtype in, fp32 arithmetic, x's dtype out: equal to the reference given the same
    inputs (to the last bit of x's dtype where the fp32 results round differently)."""
    x, out, noise = _dit_inputs((2, 4, 13, 17), 8, True, seed=7, x_dtype=x_dtype, out_dtype=out_dtype,
                                noise_dtype=noise_dtype)
    for fn, coefs in ((cfg_step.ddpm_step, _ddpm_coefs(200, 3)), (cfg_step.ddim_step, _ddim_coefs(200, 3, 1.0))):
        got = fn(x, out, noise, scale=1.5, use_triton=True, **coefs)
        expect = getattr(ref, fn.__name__)(x, out, noise, scale=1.5, **coefs)
        assert got.dtype == x_dtype
        if x_dtype in (BF16, F16):
            _within_ulps(got, expect, x_dtype)
        else:
            torch.testing.assert_close(got, expect, **TIGHT)


EM_SHAPES = [(1, 1, 1), (3, 5, 7), (2, 64, 16), (1, 33, 47)]


@pytest.mark.parametrize("shape", EM_SHAPES)
@pytest.mark.parametrize("scale", [None, 3.0])
@pytest.mark.parametrize("x_dtype", [F32, F64])
@pytest.mark.parametrize("v_dtype", [F32, F64, BF16, F16])
def test_em_matches_reference(shape, scale, x_dtype, v_dtype):
    gen = _gen(shape[1] + (scale is not None))
    b = shape[0]
    x = torch.randn(shape, generator=gen, dtype=F64).to(x_dtype)
    v = torch.randn((2 * b if scale is not None else b, *shape[1:]), generator=gen, dtype=F64).to(v_dtype)
    noise = torch.randn(shape, generator=gen, dtype=F64).to(x_dtype)
    tol = TIGHT64 if x_dtype == F64 else TIGHT
    for t, dt in ((1.0, -0.02), (0.37, -0.011), (0.02, -0.02)):
        for n in (noise, None):
            got = cfg_step.em_step(x, v, n, scale=scale, t=t, dt=dt, use_triton=True)
            expect = ref.em_step(x, v, n, scale=scale, t=t, dt=dt)
            assert got.dtype == x_dtype and got.shape == x.shape
            torch.testing.assert_close(got, expect, **tol)


def test_em_noise_dtype():
    gen = _gen(5)
    x = torch.randn(2, 9, 13, generator=gen, dtype=F64)
    v = torch.randn(4, 9, 13, generator=gen).bfloat16()
    for nd in (F32, BF16):
        noise = torch.randn(2, 9, 13, generator=gen).to(nd)
        got = cfg_step.em_step(x, v, noise, scale=2.0, t=0.5, dt=-0.01, use_triton=True)
        torch.testing.assert_close(got, ref.em_step(x, v, noise, scale=2.0, t=0.5, dt=-0.01), **TIGHT64)


def test_em_any_rank():
    """x [B] and x [B, T, D, E]: the rows are whatever follows the batch dimension."""
    gen = _gen(6)
    for shape in ((5,), (2, 3, 4, 5)):
        x = torch.randn(shape, generator=gen, dtype=F64)
        v = torch.randn((2 * shape[0], *shape[1:]), generator=gen).bfloat16()
        noise = torch.randn(shape, generator=gen, dtype=F64)
        got = cfg_step.em_step(x, v, noise, scale=2.0, t=0.3, dt=-0.05, use_triton=True)
        torch.testing.assert_close(got, ref.em_step(x, v, noise, scale=2.0, t=0.3, dt=-0.05), **TIGHT64)


# ---- guidance at scale 1 == the conditional rows alone ---------------------------------------

def _ulp_close(a, b, dtype, magnitude, ulps):
    """|a - b| <= ulps * eps(dtype) * magnitude (elementwise magnitude of the terms involved)."""
    diff = (a.double() - b.double()).abs()
    assert (diff <= ulps * torch.finfo(dtype).eps * magnitude.double()).all(), f"max diff {diff.max().item():.3g}"


def test_scale_one_equals_cond_alone():
    x, out, noise = _dit_inputs((3, 4, 11, 9), 8, True, seed=11)
    cond = out[:3]
    # uncond + 1 (cond - uncond) rounds to cond within an ulp of the larger input; the step then
    # scales that by sqrt_recipm1_ac * mean_coef1 (< 1 here), so the results agree to ~1 ulp of
    # the terms of the update.
    coefs = _ddpm_coefs(600, guided_channels=3)
    a = cfg_step.ddpm_step(x, out, noise, scale=1.0, use_triton=True, **coefs)
    b = cfg_step.ddpm_step(x, cond, noise, scale=None, use_triton=True, **coefs)
    mag = x.abs() + out[:, :4].abs().amax(0) + noise.abs() + b.abs()
    _ulp_close(a, b, F32, mag, 2)
    coefs = _ddim_coefs(600, guided_channels=3, eta=1.0)
    a = cfg_step.ddim_step(x, out, noise, scale=1.0, use_triton=True, **coefs)
    b = cfg_step.ddim_step(x, cond, noise, scale=None, use_triton=True, **coefs)
    _ulp_close(a, b, F32, mag, 2)

    gen = _gen(12)
    x = torch.randn(2, 64, 16, generator=gen, dtype=F64)
    v = torch.randn(4, 64, 16, generator=gen, dtype=F64)
    noise = torch.randn(2, 64, 16, generator=gen, dtype=F64)
    a = cfg_step.em_step(x, v, noise, scale=1.0, t=0.6, dt=-0.01, use_triton=True)
    b = cfg_step.em_step(x, v[:2], noise, scale=None, t=0.6, dt=-0.01, use_triton=True)
    _ulp_close(a, b, F64, x.abs() + v.abs().amax(0) + noise.abs(), 2)


# ---- layout, shapes, dispatch ---------------------------------------------------------------

def test_non_contiguous_inputs():
    gen = _gen(21)
    x = torch.randn(2, 9, 7, 4, generator=gen).permute(0, 3, 1, 2)  # [2, 4, 9, 7], channels last
    big = torch.randn(4, 12, 9, 7, generator=gen)
    out = big[:, 2:10]  # [4, 8, 9, 7] channel slice
    noise = torch.randn(2, 4, 7, 9, generator=gen).transpose(2, 3)
    assert not (x.is_contiguous() or out.is_contiguous() or noise.is_contiguous())
    coefs = _ddpm_coefs(100, guided_channels=3)
    torch.testing.assert_close(cfg_step.ddpm_step(x, out, noise, scale=2.0, use_triton=True, **coefs),
                               ref.ddpm_step(x, out, noise, scale=2.0, **coefs), **TIGHT)
    coefs = _ddim_coefs(100, guided_channels=3, eta=1.0)
    torch.testing.assert_close(cfg_step.ddim_step(x, out[:, :4], noise, scale=2.0, use_triton=True, **coefs),
                               ref.ddim_step(x, out[:, :4], noise, scale=2.0, **coefs), **TIGHT)
    xe = torch.randn(3, 16, 64, generator=gen, dtype=F64).transpose(1, 2)
    ve = torch.randn(6, 16, 64, generator=gen).bfloat16().transpose(1, 2)
    ne = torch.randn(3, 16, 64, generator=gen, dtype=F64).transpose(1, 2)
    torch.testing.assert_close(cfg_step.em_step(xe, ve, ne, scale=2.0, t=0.5, dt=-0.01, use_triton=True),
                               ref.em_step(xe, ve, ne, scale=2.0, t=0.5, dt=-0.01), **TIGHT64)


@pytest.mark.parametrize("use_triton", [True, False])
def test_shape_errors_name_both_shapes(use_triton):
    x = torch.randn(2, 4, 8, 8)
    coefs = _ddpm_coefs(10, guided_channels=3)
    dcoefs = _ddim_coefs(10, guided_channels=3, eta=0.0)
    cases = [
        (cfg_step.ddpm_step, x, torch.randn(2, 8, 8, 8), None, 4.0, coefs),  # B rows with a scale
        (cfg_step.ddpm_step, x, torch.randn(4, 8, 8, 8), None, None, coefs),  # 2B rows without
        (cfg_step.ddpm_step, x, torch.randn(4, 4, 8, 8), None, 4.0, coefs),  # C channels, 2C needed
        (cfg_step.ddpm_step, x, torch.randn(4, 8, 8, 9), None, 4.0, coefs),  # spatial size
        (cfg_step.ddpm_step, x, torch.randn(4, 8, 8, 8), torch.randn(2, 4, 8, 7), 4.0, coefs),  # noise
        (cfg_step.ddim_step, x, torch.randn(4, 6, 8, 8), None, 4.0, dcoefs),  # neither C nor 2C
    ]
    for fn, xx, out, noise, scale, c in cases:
        bad = noise if noise is not None else out
        with pytest.raises(ValueError, match=re.escape(str(tuple(bad.shape))) + ".*" + re.escape(str(tuple(xx.shape)))):
            fn(xx, out, noise, scale=scale, use_triton=use_triton, **c)
    xe = torch.randn(2, 64, 16, dtype=F64)
    for v, noise, scale in ((torch.randn(2, 64, 16), None, 3.0), (torch.randn(4, 64, 16), None, None),
                            (torch.randn(4, 64, 15), None, 3.0), (torch.randn(4, 64, 16), torch.randn(2, 64), 3.0)):
        bad = noise if noise is not None else v
        with pytest.raises(ValueError, match=re.escape(str(tuple(bad.shape))) + ".*" + re.escape(str(tuple(xe.shape)))):
            cfg_step.em_step(xe, v, noise, scale=scale, t=0.5, dt=-0.1, use_triton=use_triton)


def test_empty_batch():
    x = torch.randn(0, 4, 8, 8)
    out = torch.randn(0, 8, 8, 8)
    y = cfg_step.ddpm_step(x, out, None, scale=4.0, use_triton=True, **_ddpm_coefs(5, 3))
    assert y.shape == x.shape
    y = cfg_step.em_step(torch.randn(0, 64, 16, dtype=F64), torch.randn(0, 64, 16), None, scale=3.0, t=0.5,
                         dt=-0.1, use_triton=True)
    assert y.shape == (0, 64, 16)


def test_default_dispatch_on_cpu_is_the_reference():
    x, out, noise = _dit_inputs((2, 4, 8, 8), 8, True, seed=1)
    coefs = _ddpm_coefs(50, guided_channels=3)
    assert torch.equal(cfg_step.ddpm_step(x, out, noise, scale=4.0, **coefs),
                       ref.ddpm_step(x, out, noise, scale=4.0, **coefs))


def test_one_pass_one_launch(monkeypatch):
    """Each step is one kernel launch (guidance fused into the update), no torch fallback."""
    calls = []
    for name in ("_ddpm_kernel", "_ddim_kernel", "_em_kernel_f32", "_em_kernel_f64"):
        kernel = getattr(cfg_step, name)

        class Spy:
            def __init__(self, k, n):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                calls.append(self.n)
                return self.k[grid]

        monkeypatch.setattr(cfg_step, name, Spy(kernel, name))
    monkeypatch.setattr(ref, "ddpm_step", None)
    monkeypatch.setattr(ref, "ddim_step", None)
    monkeypatch.setattr(ref, "em_step", None)
    x, out, noise = _dit_inputs((2, 4, 8, 8), 8, True, seed=1)
    cfg_step.ddpm_step(x, out, noise, scale=4.0, use_triton=True, **_ddpm_coefs(50, 3))
    cfg_step.ddim_step(x, out, noise, scale=4.0, use_triton=True, **_ddim_coefs(50, 3, 1.0))
    xe = torch.randn(2, 8, 4, dtype=F64)
    cfg_step.em_step(xe, torch.randn(4, 8, 4), xe, scale=3.0, t=0.5, dt=-0.1, use_triton=True)
    cfg_step.em_step(xe.float(), torch.randn(2, 8, 4), None, scale=None, t=0.5, dt=-0.1, use_triton=True)
    assert calls == ["_ddpm_kernel", "_ddim_kernel", "_em_kernel_f64", "_em_kernel_f32"]


# ---- the references against the formulas, float64 -----------------------------------------

def _guided64(out, b, scale, guided_channels):
    """Written per channel: channel k of the cond half, guided when k < guided_channels."""
    chans = []
    for k in range(out.shape[1]):
        c, u = out[:b, k], out[b:, k]
        chans.append(u + scale * (c - u) if k < guided_channels else c)
    return torch.stack(chans, dim=1)


@pytest.mark.parametrize("step", [0, 1, 250, 999])
@pytest.mark.parametrize("scale", [None, 4.0])
def test_ddpm_reference_equals_formulas(step, scale):
    b, c = 2, 4
    x, out, noise = _dit_inputs((b, c, 6, 5), 2 * c, scale is not None, seed=step)
    s = _schedule(step)
    beta, ac, ac_prev = s["beta"], s["ac"], s["ac_prev"]
    o = out.double()
    o = _guided64(o, b, scale, 3) if scale is not None else o
    eps, v = o[:, :c], o[:, c:]
    xd = x.double()
    x0 = math.sqrt(1 / ac) * xd - math.sqrt(1 / ac - 1) * eps
    mean = beta * math.sqrt(ac_prev) / (1 - ac) * x0 + (1 - ac_prev) * math.sqrt(1 - beta) / (1 - ac) * xd
    # the same mean as Ho et al. write it: (x - beta / sqrt(1 - ac) eps) / sqrt(alpha)
    torch.testing.assert_close(mean, (xd - beta / math.sqrt(1 - ac) * eps) / math.sqrt(1 - beta),
                               rtol=1e-9, atol=1e-9)
    # posterior variance beta (1 - ac_prev) / (1 - ac), its log clipped at step 0 to step 1's
    post_var = (lambda j: _schedule(j)["beta"] * (1 - _schedule(j)["ac_prev"]) / (1 - _schedule(j)["ac"]))
    log_post = math.log(post_var(max(step, 1)))
    frac = (v + 1) / 2
    log_var = frac * math.log(beta) + (1 - frac) * log_post
    coefs = _ddpm_coefs(step, guided_channels=3)
    got_mean = ref.ddpm_step(x, out, None, scale=scale, **coefs).double()
    got = ref.ddpm_step(x, out, noise, scale=scale, **coefs).double()
    # fp32 arithmetic: compare with a tolerance relative to the terms (x0 grows as 1/sqrt(ac))
    mag = (math.sqrt(1 / ac) * xd.abs() + math.sqrt(1 / ac - 1) * eps.abs()) + xd.abs()
    assert ((got_mean - mean).abs() <= 4e-7 * mag + 1e-7).all()
    expect = mean + torch.exp(0.5 * log_var) * noise.double()
    assert ((got - expect).abs() <= 4e-7 * (mag + noise.double().abs()) + 1e-7).all()


@pytest.mark.parametrize("step", [0, 480, 999])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_reference_equals_formulas(step, eta):
    b, c = 3, 4
    x, out, noise = _dit_inputs((b, c, 5, 5), 2 * c, True, seed=step)
    s = _schedule(step)
    ac, ac_prev = s["ac"], s["ac_prev"]
    sigma = eta * math.sqrt((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev))
    eps = _guided64(out[:, :c].double(), b, 2.0, 3)
    xd = x.double()
    x0 = (xd - math.sqrt(1 - ac) * eps) / math.sqrt(ac)
    expect = math.sqrt(ac_prev) * x0 + math.sqrt(1 - ac_prev - sigma**2) * eps + sigma * noise.double()
    got = ref.ddim_step(x, out, noise, scale=2.0, **_ddim_coefs(step, 3, eta)).double()
    mag = (xd.abs() + eps.abs()) / math.sqrt(ac) + noise.double().abs()
    assert ((got - expect).abs() <= 1e-6 * mag + 1e-7).all()


@pytest.mark.parametrize("t,dt", [(1.0, -0.02), (0.5, -0.01), (0.02, -0.02)])
@pytest.mark.parametrize("scale", [None, 3.0])
def test_em_reference_equals_formulas(t, dt, scale):
    gen = _gen(int(t * 100))
    b = 3
    x = torch.randn(b, 64, 16, generator=gen, dtype=F64)
    v = torch.randn(2 * b if scale is not None else b, 64, 16, generator=gen, dtype=F64)
    noise = torch.randn(b, 64, 16, generator=gen, dtype=F64)
    # linear path x_t = (1 - t) x0 + t eps: score = ((t - 1) v - x) / t, drift = v - t score
    drift = lambda vel: (2 - t) * vel + x  # noqa: E731
    d = drift(v) if scale is None else drift(v[b:]) + scale * (drift(v[:b]) - drift(v[b:]))
    expect_mean = x + d * dt
    expect = expect_mean + math.sqrt(2 * t) * math.sqrt(abs(dt)) * noise
    torch.testing.assert_close(ref.em_step(x, v, None, scale=scale, t=t, dt=dt), expect_mean, **TIGHT64)
    torch.testing.assert_close(ref.em_step(x, v, noise, scale=scale, t=t, dt=dt), expect, **TIGHT64)
    # and that score is the linear path's (v = eps - x0): E[x0 | x] = x - t v, E[eps | x] = -t score
    # = x + (1 - t) v, and (1 - t) E[x0 | x] + t E[eps | x] gives back x
    score = ((t - 1) * v[:b] - x) / t
    torch.testing.assert_close(-t * score, x + (1 - t) * v[:b], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((1 - t) * (x - t * v[:b]) + t * (-t * score), x, rtol=1e-12, atol=1e-12)
