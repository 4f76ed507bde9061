"""DiT's diffusion: schedule and respacing, DDPM/DDIM samplers with CFG, the MSE + VLB training
loss against a float64 computation written here from the formulas, official checkpoint formats."""
import argparse
import math

import numpy as np
import pytest
import torch

from neon_scale.errors import NeonError
from neon_scale.io import load_into, load_state_dict
from neon_scale.models.dit import DiT
from neon_scale.sampling import diffusion


def _tiny_dit(seed=0, learn_sigma=True) -> DiT:
    torch.manual_seed(seed)
    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                learn_sigma=learn_sigma)
    with torch.no_grad():  # the official init zeroes the output layers: give every weight a value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_respacing_keeps_the_original_cumulative_alphas():
    base = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    for spacing, count in [("250", 250), ("ddim50", 50), ("25", 25), (None, 1000)]:
        s = diffusion.Schedule.respaced(spacing)
        assert s.steps == count and s.timestep_map[0] == 0
        np.testing.assert_allclose(s.ac, base[s.timestep_map], rtol=1e-12)
    assert diffusion.Schedule.respaced("250").timestep_map[-1] == 999
    assert diffusion.Schedule.respaced("ddim50").timestep_map[:3] == [0, 20, 40]


def test_schedule_coefficients_equal_the_posterior_formulas():
    s = diffusion.Schedule.respaced("250")
    ac, ac_prev, b = s.ac, np.append(1.0, s.ac[:-1]), s.betas
    var = b * (1 - ac_prev) / (1 - ac)
    np.testing.assert_allclose(s.post_c1, b * np.sqrt(ac_prev) / (1 - ac), rtol=1e-12)
    np.testing.assert_allclose(s.post_c2, (1 - ac_prev) * np.sqrt(1 - b) / (1 - ac), rtol=1e-12)
    np.testing.assert_allclose(np.exp(s.post_log_var_clipped[1:]), var[1:], rtol=1e-12)
    assert s.post_log_var_clipped[0] == s.post_log_var_clipped[1]  # clipped at t = 0


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_samplers_are_deterministic_under_a_seed(method):
    model = _tiny_dit()
    labels = torch.tensor([0, 3, 9])

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(3, 4, 4, 4, generator=gen)
        return diffusion.sample(model, noise, labels, gen, method=method, steps=8, cfg=2.0, null_class=10, eta=0.5)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == (3, 4, 4, 4) and torch.isfinite(a).all()


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_cfg_scale_one_equals_the_unguided_sampler(method):
    model = _tiny_dit()
    labels = torch.tensor([1, 2, 5, 7])
    noise = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    kw = dict(method=method, steps=6, null_class=10, eta=1.0, guided_channels=4)
    plain = diffusion.sample(model, noise, labels, torch.Generator().manual_seed(9), cfg=1.0, guidance=False, **kw)
    guided = diffusion.sample(model, noise, labels, torch.Generator().manual_seed(9), cfg=1.0, guidance=True, **kw)
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)
    stronger = diffusion.sample(model, noise, labels, torch.Generator().manual_seed(9), cfg=3.0, **kw)
    assert (stronger - plain).abs().max() > 1e-3  # guidance does act


def test_ddpm_step_matches_the_official_forward_with_cfg_cond_half():
    """One DDPM step on x [B] equals the cond half of the official [x_cond; x_uncond] batch, whose
    model output comes from forward_with_cfg (both halves evaluated at x_cond)."""
    model = _tiny_dit()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=gen)
    y = torch.tensor([4, 6])
    t = torch.tensor([40, 40])
    official = model.forward_with_cfg(torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]),
                                      torch.cat([y, torch.tensor([10, 10])]), 2.5)[:2]
    ours_out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.tensor([10, 10])]))
    from neon_scale.kernels.sampling_reference import guided_out

    torch.testing.assert_close(guided_out(ours_out, 2.5, 3), official, rtol=1e-6, atol=1e-6)


def _loss_float64(model, x0, labels, seed):
    """The training loss from the formulas, float64, drawing t and noise as training_loss does."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen).double()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    x0 = x0.double()
    xt = ac[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * noise
    out = model.double()(xt, t, labels).double()
    model.float()
    eps, v = out[:, :4], out[:, 4:]
    total = []
    for i in range(len(t)):
        k = int(t[i])
        b, a, ap = betas[k], ac[k], ac_prev[k]
        post_var = b * (1 - ap) / (1 - a) if k > 0 else betas[1] * (1 - ac[0]) / (1 - ac[1])
        log_min, log_max = math.log(post_var), math.log(b)
        frac = (v[i] + 1) / 2
        log_var = frac * log_max + (1 - frac) * log_min
        c1, c2 = b * ap.sqrt() / (1 - a), (1 - ap) * (1 - b).sqrt() / (1 - a)
        x0_hat = (xt[i] - (1 - a).sqrt() * eps[i]) / a.sqrt()
        mean = c1 * x0_hat + c2 * xt[i]
        true_mean = c1 * x0[i] + c2 * xt[i]
        if k == 0:  # decoder NLL of the 256-bin discretised Gaussian
            def cdf(z):
                return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
            inv = torch.exp(-0.5 * log_var)
            d = x0[i] - mean
            p = cdf(inv * (d + 1 / 255)) - cdf(inv * (d - 1 / 255))
            vb = -torch.log(p.clamp(min=1e-12)).mean() / math.log(2)
        else:  # KL(N(true_mean, post_var) || N(mean, exp(log_var)))
            kl = 0.5 * (-1 + log_var - math.log(post_var) + post_var / torch.exp(log_var)
                        + (true_mean - mean) ** 2 / torch.exp(log_var))
            vb = kl.mean() / math.log(2)
        total.append(((noise[i] - eps[i]) ** 2).mean() + vb)
    return torch.stack(total).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_loss_equals_float64_formulas(seed):
    model = _tiny_dit(seed)
    x0 = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(100 + seed)).clamp(-0.99, 0.99)
    labels = torch.tensor([0, 1, 2, 3, 10, 10])
    ref = _loss_float64(model, x0, labels, seed)
    ours = diffusion.training_loss(model, x0, labels, torch.Generator().manual_seed(seed))
    assert abs(ours.item() - ref.item()) <= 1e-4 * abs(ref.item())


def test_training_loss_with_t0_decoder_nll_equals_float64_formulas():
    """A seed whose batch of 64 draws t = 0, where the VLB term is the decoder NLL."""
    seed = next(s for s in range(1000) if (torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(s))
                                           == 0).any())
    model = _tiny_dit(seed)
    x0 = torch.rand(64, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.arange(64) % 11
    ref = _loss_float64(model, x0, labels, seed)
    ours = diffusion.training_loss(model, x0, labels, torch.Generator().manual_seed(seed))
    assert abs(ours.item() - ref.item()) <= 1e-4 * abs(ref.item())


def test_vlb_trains_only_the_variance_and_mse_only_eps():
    model = _tiny_dit()
    x0 = torch.randn(4, 4, 4, 4)
    loss = diffusion.training_loss(model, x0, torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert model.pos_embed.grad is None


# ---------------------------------------------------------------------- official checkpoint files

def test_official_training_checkpoint_loads_ema_by_default(tmp_path):
    model, ema = _tiny_dit(0), _tiny_dit(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 4, 4, 4), torch.tensor([1, 2]), torch.tensor([0, 1])).sum().backward()
    opt.step()
    path = tmp_path / "0400000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": argparse.Namespace(model="DiT-S/2", image_size=32, num_classes=10)}, path)
    fresh = DiT(input_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    load_into(fresh, load_state_dict(path), str(path))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ema.state_dict().values()))
    load_into(fresh, load_state_dict(path, "model"), str(path))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_bare_official_state_dict_loads(tmp_path):
    model = _tiny_dit(3)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    fresh = DiT(input_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    load_into(fresh, load_state_dict(path), str(path))
    assert torch.equal(fresh.final_layer.linear.weight, model.final_layer.linear.weight)


def test_wrong_model_size_names_first_mismatching_key_and_both_shapes(tmp_path):
    path = tmp_path / "big.pt"
    torch.save(_tiny_dit().state_dict(), path)
    wider = DiT(input_size=4, patch_size=2, hidden_size=48, depth=2, num_heads=2, num_classes=10)
    with pytest.raises(NeonError, match=r"key 'pos_embed' has shape \(1, 4, 32\), the model expects \(1, 4, 48\)"):
        load_into(wider, load_state_dict(path), str(path))


def test_checkpoint_without_weights_is_one_clear_error(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"step": torch.tensor(3), "opt": {"lr": 1.0}}, path)
    with pytest.raises(NeonError, match="no state dict found"):
        load_state_dict(path)
    with pytest.raises(NeonError, match="no sub-dict key 'ema'"):
        load_state_dict(path, "ema")
