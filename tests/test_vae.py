"""The two VAEs (neon_scale.models.vae).

MAR KL-16: the state-dict layout and parameter count written from the official definitions
(xAR/models/vae.py: LDM's KL autoencoder with ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks,
encoder attention at resolution 16 of 256, embed_dim 16); a checkpoint in the official format
({"model": state dict}) through load_mar_vae; encode/decode against a float64 reference written
here from the formulas; the official uint8 conversion. SD KL-f8: a diffusers folder and an
original-layout single file through load_sd_vae, equal to diffusers' own calls x 0.18215. Errors.
"""
import importlib.util
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from neon_scale.errors import NeonError
from neon_scale.models.vae import (
    MAR_KL16,
    MAR_TINY,
    KLConfig,
    MarVAE,
    build_vae,
    load_mar_vae,
    load_sd_vae,
    random_mar_vae,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# found without importing it (diffusers takes seconds to import)
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers not installed (extra 'sd-vae')")


# ---------------------------------------------------------------------------------------------
# The official layout, written from xAR/models/vae.py


def official_layout(ch=128, mult=(1, 1, 2, 2, 4), nres=2, z=16, attn_last=True):
    """(key, shape) in the official module order."""
    out = []

    def conv(name, cin, cout, k):
        out.extend([(f"{name}.weight", (cout, cin, k, k)), (f"{name}.bias", (cout,))])

    def norm(name, c):
        out.extend([(f"{name}.weight", (c,)), (f"{name}.bias", (c,))])

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(name, c):
        res(f"{name}.block_1", c, c)
        attn(f"{name}.attn_1", c)
        res(f"{name}.block_2", c, c)

    widths = [ch * m for m in mult]
    conv("encoder.conv_in", 3, ch, 3)
    c = ch
    for i, w in enumerate(widths):
        for j in range(nres):
            res(f"encoder.down.{i}.block.{j}", c, w)
            c = w
        if attn_last and i == len(widths) - 1:
            for j in range(nres):
                attn(f"encoder.down.{i}.attn.{j}", c)
        if i < len(widths) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder.mid", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", c, 2 * z, 3)

    conv("decoder.conv_in", z, widths[-1], 3)
    mid("decoder.mid", widths[-1])
    ins = {}  # the decoder's up[i] takes its input width from the level below it (built top-down)
    c = widths[-1]
    for i in reversed(range(len(widths))):
        ins[i] = c
        c = widths[i]
    for i in range(len(widths)):  # registration order: up.0, up.1, ...
        c = ins[i]
        for j in range(nres + 1):
            res(f"decoder.up.{i}.block.{j}", c, widths[i])
            c = widths[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", ch * mult[0])
    conv("decoder.conv_out", ch * mult[0], 3, 3)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    return out


def kl16_parameter_count() -> int:
    """KL-16's parameter count, by hand from the architecture."""
    def conv(i, o, k):
        return i * o * k * k + o

    def gn(c):
        return 2 * c

    def res(i, o):
        return gn(i) + conv(i, o, 3) + gn(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    def attn(c):
        return gn(c) + 4 * conv(c, c, 1)

    mid = 2 * res(512, 512) + attn(512)
    encoder = (conv(3, 128, 3)
               + 2 * res(128, 128) + conv(128, 128, 3)                         # 256 px
               + 2 * res(128, 128) + conv(128, 128, 3)                         # 128
               + res(128, 256) + res(256, 256) + conv(256, 256, 3)             # 64
               + 2 * res(256, 256) + conv(256, 256, 3)                         # 32
               + res(256, 512) + res(512, 512) + 2 * attn(512)                 # 16, with attention
               + mid + gn(512) + conv(512, 32, 3))
    decoder = (conv(16, 512, 3) + mid
               + 3 * res(512, 512) + conv(512, 512, 3)                         # 16 -> 32
               + res(512, 256) + 2 * res(256, 256) + conv(256, 256, 3)         # 32 -> 64
               + 3 * res(256, 256) + conv(256, 256, 3)                         # 64 -> 128
               + res(256, 128) + 2 * res(128, 128) + conv(128, 128, 3)         # 128 -> 256
               + 3 * res(128, 128) + gn(128) + conv(128, 3, 3))
    return encoder + decoder + conv(32, 32, 1) + conv(16, 16, 1)


def test_mar_kl16_layout_matches_official():
    with torch.device("meta"):
        model = MarVAE(MAR_KL16)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == official_layout()
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    total = sum(p.numel() for p in model.parameters())
    assert total == kl16_parameter_count() == 66_456_019
    assert (model.scale, model.latent_channels, model.stride) == (0.2325, 16, 16)
    # the tiny family member: same layout rules with its own sizes
    with torch.device("meta"):
        tiny = MarVAE(MAR_TINY)
    assert [(k, tuple(v.shape)) for k, v in tiny.state_dict().items()] == official_layout(ch=16, nres=1)


# ---------------------------------------------------------------------------------------------
# A float64 reference from the formulas


def random_state(layout, seed):
    """Random float32 weights with sane scales: kernels N(0, 1/fan_in), biases N(0, 0.05), norm
    scales 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout:
        t = torch.randn(shape, generator=g)
        if len(shape) == 4:
            t /= math.sqrt(shape[1] * shape[2] * shape[3])
        elif ".norm" in k and k.endswith(".weight"):
            t = 1 + 0.1 * t
        else:
            t *= 0.05
        sd[k] = t
    return sd


class Ref:
    """LDM KL autoencoder in float64, written from the formulas (module names as in the checkpoint)."""

    def __init__(self, sd, cfg: KLConfig):
        self.sd = {k: v.double() for k, v in sd.items()}
        self.cfg = cfg

    def conv(self, x, name, stride=1, pad=None):
        w = self.sd[name + ".weight"]
        pad = w.shape[-1] // 2 if pad is None else pad
        return F.conv2d(x, w, self.sd[name + ".bias"], stride=stride, padding=pad)

    def norm(self, x, name):  # GroupNorm: per sample and group, zero mean / unit (biased) variance
        n, c, h, w = x.shape
        g = x.reshape(n, self.cfg.norm_groups, -1)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
        return g.reshape(n, c, h, w) * self.sd[name + ".weight"][:, None, None] + self.sd[name + ".bias"][:, None, None]

    @staticmethod
    def act(x):
        return x / (1 + torch.exp(-x))

    def res(self, x, name):
        h = self.conv(self.act(self.norm(x, name + ".norm1")), name + ".conv1")
        h = self.conv(self.act(self.norm(h, name + ".norm2")), name + ".conv2")
        if name + ".nin_shortcut.weight" in self.sd:
            x = self.conv(x, name + ".nin_shortcut")
        return x + h

    def attn(self, x, name):
        n, c, hh, ww = x.shape
        h = self.norm(x, name + ".norm")
        q, k, v = (self.conv(h, f"{name}.{p}").reshape(n, c, -1) for p in "qkv")
        a = torch.softmax(torch.einsum("nci,ncj->nij", q, k) / math.sqrt(c), dim=-1)  # query i, key j
        out = torch.einsum("nij,ncj->nci", a, v).reshape(n, c, hh, ww)
        return x + self.conv(out, name + ".proj_out")

    def mid(self, h, name):
        return self.res(self.attn(self.res(h, name + ".block_1"), name + ".attn_1"), name + ".block_2")

    def posterior(self, x):
        levels, nres = len(self.cfg.ch_mult), self.cfg.num_res_blocks
        h = self.conv(x.double(), "encoder.conv_in")
        for i in range(levels):
            for j in range(nres):
                h = self.res(h, f"encoder.down.{i}.block.{j}")
                if self.cfg.encoder_attn and i == levels - 1:
                    h = self.attn(h, f"encoder.down.{i}.attn.{j}")
            if i < levels - 1:  # pad right and bottom by one zero, 3x3 stride-2 conv
                h = self.conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", stride=2, pad=0)
        h = self.mid(h, "encoder.mid")
        h = self.conv(self.act(self.norm(h, "encoder.norm_out")), "encoder.conv_out")
        mean, logvar = self.conv(h, "quant_conv").chunk(2, dim=1)
        return mean, torch.exp(logvar.clamp(-30, 20) / 2)

    def decode(self, z):
        levels, nres = len(self.cfg.ch_mult), self.cfg.num_res_blocks
        h = self.conv(self.conv(z.double(), "post_quant_conv"), "decoder.conv_in")
        h = self.mid(h, "decoder.mid")
        for i in reversed(range(levels)):
            for j in range(nres + 1):
                h = self.res(h, f"decoder.up.{i}.block.{j}")
            if i != 0:  # nearest x2: every pixel repeated in a 2x2 square
                h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
                h = self.conv(h, f"decoder.up.{i}.upsample.conv")
        return self.conv(self.act(self.norm(h, "decoder.norm_out")), "decoder.conv_out")


def tiny_layout():
    return official_layout(ch=MAR_TINY.ch, nres=MAR_TINY.num_res_blocks)


def test_mar_numerics_equal_the_float64_reference():
    sd = random_state(tiny_layout(), seed=1)
    model = MarVAE(MAR_TINY).eval()
    model.load_state_dict(sd, strict=True)
    ref = Ref(sd, MAR_TINY)
    images = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    x = images.double() / 255 * 2 - 1
    mean, std = ref.posterior(x)

    lat = model.encode(images)                        # the posterior mean, x 0.2325
    assert lat.shape == (3, 16, 4, 4) and lat.dtype == torch.float32
    torch.testing.assert_close(lat.double(), mean * 0.2325, atol=2e-5, rtol=1e-4)
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7)).double()
    torch.testing.assert_close(model.encode(images, gen).double(), (mean + std * noise) * 0.2325, atol=2e-5, rtol=1e-4)
    assert torch.equal(model.encode((images.float() / 255 - 0.5) / 0.5), lat)  # floats in [-1, 1]: as they are

    z = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    out = ref.decode(z.double() / 0.2325)
    torch.testing.assert_close(model.decode_float(z).double(), out, atol=1e-4, rtol=1e-4)
    img = model.decode(z)
    assert img.shape == (3, 3, 64, 64) and img.dtype == torch.uint8
    expect = ((out + 1) / 2 * 255).clamp(0, 255).floor()
    assert (img.double() - expect).abs().max() <= 1 and (img.double() == expect).float().mean() > 0.99

    # in float64 the module equals the reference to rounding
    model.double()
    m64, s64 = model.posterior(x)
    torch.testing.assert_close(m64, mean, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(s64, std, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(model.decode_unscaled(z.double() / 0.2325), out, atol=1e-12, rtol=1e-10)


def test_mar_logvar_is_clamped():
    sd = random_state(tiny_layout(), seed=4)
    for bias, std in ((100.0, math.exp(10)), (-100.0, math.exp(-15))):
        sd["quant_conv.weight"][16:] = 0
        sd["quant_conv.bias"][16:] = bias
        model = MarVAE(MAR_TINY)
        model.load_state_dict(sd)
        _, s = model.posterior(torch.zeros(1, 3, 32, 32))
        torch.testing.assert_close(s, torch.full_like(s, std))


def test_uint8_conversions_are_the_official_ones():
    from neon_scale.models.vae import SDVAE, images_to_model_input

    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.999, 1.0, 2.0])
    # xAR generate_dataset.py / generate_and_fid_sims.py: ((x + 1) / 2) * 255, clamp, truncate
    assert MarVAE.to_uint8(x).tolist() == [0, 0, 0, 127, 254, 255, 255]
    # DiT sample_ddp.py: clamp(127.5 x + 128, 0, 255), truncate = round half up
    assert SDVAE.to_uint8(x).tolist() == [0, 0, 0, 128, 255, 255, 255]
    u = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert images_to_model_input(u)[0, 0, 0].tolist() == pytest.approx([-1.0, (128 / 255 - 0.5) / 0.5, 1.0], abs=1e-7)


# ---------------------------------------------------------------------------------------------
# kl16.ckpt through load_mar_vae


@pytest.fixture(scope="module")
def kl16_file(tmp_path_factory):
    """A full-size random state dict in the official checkpoint format."""
    path = tmp_path_factory.mktemp("mar") / "kl16.ckpt"
    sd = random_state(official_layout(), seed=5)
    torch.save({"model": sd}, path)
    return path, sd


def test_load_mar_vae_official_format(kl16_file):
    path, sd = kl16_file
    vae = load_mar_vae(path)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    own = vae.state_dict()
    assert list(own) == list(sd) and all(torch.equal(own[k], sd[k]) for k in sd)
    # the full-size network against its float64 reference (32 px -> 2 x 2 latents: 4 attention positions)
    images = torch.randint(0, 256, (1, 3, 32, 32), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    ref = Ref(sd, MAR_KL16)
    mean, _ = ref.posterior(images.double() / 255 * 2 - 1)
    lat = vae.encode(images)
    assert lat.shape == (1, 16, 2, 2)
    torch.testing.assert_close(lat.double(), mean * 0.2325, atol=5e-5, rtol=1e-3)
    torch.testing.assert_close(vae.decode_float(lat).double(), ref.decode(lat.double() / 0.2325), atol=2e-4, rtol=1e-3)
    assert isinstance(build_vae("mar", str(path)), MarVAE)


def test_mar_shapes_256_and_64():
    vae = random_mar_vae(0)
    lat = vae.encode(torch.zeros(2, 3, 256, 256, dtype=torch.uint8))
    assert lat.shape == (2, 16, 16, 16)
    assert vae.decode(lat).shape == (2, 3, 256, 256)
    assert vae.encode(torch.zeros(2, 3, 64, 64)).shape == (2, 16, 4, 4)
    with pytest.raises(ValueError, match="multiple of the VAE stride 16"):
        vae.encode(torch.zeros(1, 3, 40, 40))


def one_line_error(fn, *args) -> str:
    with pytest.raises(NeonError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def zeros_state(layout):
    return {k: torch.zeros(shape) for k, shape in layout}


class NotAllowed:  # a pickled instance of this is refused by torch.load(weights_only=True)
    pass


def test_mar_errors(tmp_path):
    msg = one_line_error(load_mar_vae, tmp_path / "kl16.ckpt")
    assert str(tmp_path / "kl16.ckpt") in msg and "MAR KL-16 VAE weights (kl16.ckpt) not found" in msg

    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert "cannot read" in one_line_error(load_mar_vae, tmp_path / "junk.ckpt")

    torch.save({"model": NotAllowed()}, tmp_path / "pickled.ckpt")
    msg = one_line_error(load_mar_vae, tmp_path / "pickled.ckpt")
    assert "NotAllowed" in msg and "allow-list" in msg and "--trust-pickles" in msg

    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "nomodel.ckpt")
    msg = one_line_error(load_mar_vae, tmp_path / "nomodel.ckpt")
    assert "no 'model' entry" in msg and "state_dict" in msg

    torch.save({"model": {"w": 1}}, tmp_path / "notensors.ckpt")
    assert "not a state dict of tensors" in one_line_error(load_mar_vae, tmp_path / "notensors.ckpt")

    # a narrower network: same keys, the first mismatching shape and both shapes
    torch.save({"model": zeros_state(official_layout(ch=32))}, tmp_path / "narrow.ckpt")
    msg = one_line_error(load_mar_vae, tmp_path / "narrow.ckpt")
    assert "key 'encoder.conv_in.weight' has shape (32, 3, 3, 3), the model expects (128, 3, 3, 3)" in msg

    # fewer res blocks: the first missing key
    torch.save({"model": zeros_state(official_layout(nres=1))}, tmp_path / "shallow.ckpt")
    msg = one_line_error(load_mar_vae, tmp_path / "shallow.ckpt")
    assert "missing key 'encoder.down.0.block.1.norm1.weight' (and" in msg


# ---------------------------------------------------------------------------------------------
# Tiny random VAEs and build_vae


def test_tiny_vaes_are_deterministic_and_fast():
    a, b, c = random_mar_vae(3), build_vae("mar", None, tiny=True, seed=3), random_mar_vae(4)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.decoder.conv_in.weight, c.decoder.conv_in.weight)
    assert (a.kind, a.scale, a.latent_channels, a.stride, a.cfg.ch) == ("mar", 0.2325, 16, 16, 16)
    z = torch.randn(8, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    # one thread: with 2 OpenMP threads on a busy 2-core machine a 0.06 s decode can take 2 s
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a.decode(z)
        t = time.perf_counter()
        img = a.decode(z)
        elapsed = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    assert img.shape == (8, 3, 64, 64) and img.dtype == torch.uint8 and elapsed < 1.0
    assert img.float().std() > 10  # not a constant image


def test_build_vae_errors():
    assert "unknown VAE kind 'vq'" in one_line_error(build_vae, "vq", None)
    assert "needs a weights path" in one_line_error(build_vae, "mar", None)
    with pytest.raises(NeonError, match="give no path"):
        build_vae("mar", "kl16.ckpt", tiny=True)


# ---------------------------------------------------------------------------------------------
# Stable Diffusion KL-f8 (diffusers)


@needs_diffusers
def test_sd_folder_equals_diffusers_calls(tmp_path):
    from neon_scale.models.vae import SDVAE

    tiny = build_vae("sd", None, tiny=True, seed=1)
    assert (tiny.kind, tiny.scale, tiny.latent_channels, tiny.stride) == ("sd", 0.18215, 4, 8)
    again = build_vae("sd", None, tiny=True, seed=1).net.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in tiny.net.state_dict().items())
    tiny.net.save_pretrained(tmp_path / "vae")
    # the folder's weights file on its own is not an original-layout file: say where it belongs
    msg = one_line_error(load_sd_vae, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert "original (LDM) layout" in msg and "folder with its config.json" in msg
    vae = load_sd_vae(tmp_path / "vae")
    assert isinstance(vae, SDVAE) and (vae.scale, vae.latent_channels, vae.stride) == (0.18215, 4, 8)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert all(torch.equal(v, vae.net.state_dict()[k]) for k, v in tiny.net.state_dict().items())

    net = vae.net
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = images.float() / 255 * 2 - 1
    with torch.no_grad():
        dist = net.encode(x).latent_dist
        sample = dist.sample(generator=torch.Generator().manual_seed(9))
        lat = vae.encode(images)
        assert lat.shape == (2, 4, 8, 8)
        assert torch.equal(lat, dist.mean * 0.18215)
        assert torch.equal(vae.encode(images, torch.Generator().manual_seed(9)), sample * 0.18215)
        z = sample * 0.18215
        out = net.decode(z / 0.18215).sample
        assert torch.equal(vae.decode(z), torch.clamp(127.5 * out + 128.0, 0, 255).to(torch.uint8))
        assert vae.decode(z).shape == (2, 3, 64, 64)


@needs_diffusers
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_sd_single_file_equals_our_ldm_network(tmp_path, fmt):
    """An original-layout (LDM) file: diffusers converts it; our LDM network with the same weights
    (SD's configuration: no encoder attention) computes the same thing."""
    from safetensors.torch import save_file

    cfg = KLConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, encoder_attn=False)
    sd = random_state(official_layout(ch=32, mult=(1, 2, 2), nres=1, z=4, attn_last=False), seed=8)
    path = tmp_path / f"vae.{fmt}"
    if fmt == "safetensors":
        save_file({"first_stage_model." + k: v for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1}, path)
    vae = load_sd_vae(path)
    assert (vae.latent_channels, vae.stride) == (4, 4)
    ours = MarVAE(cfg).eval()
    ours.load_state_dict(sd)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        m1, s1 = ours.posterior(x)
        m2, s2 = vae.posterior(x)
        torch.testing.assert_close(m2, m1, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(s2, s1, atol=2e-5, rtol=1e-4)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(vae.decode_unscaled(z), ours.decode_unscaled(z), atol=2e-5, rtol=1e-4)


@needs_diffusers
def test_sd_errors(tmp_path):
    msg = one_line_error(load_sd_vae, tmp_path / "sd-vae-ft-ema")
    assert str(tmp_path / "sd-vae-ft-ema") in msg and "not found" in msg
    (tmp_path / "empty").mkdir()
    assert "no config.json" in one_line_error(load_sd_vae, tmp_path / "empty")
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    assert "cannot load" in one_line_error(load_sd_vae, tmp_path / "x.safetensors")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    assert "original (LDM) layout" in one_line_error(load_sd_vae, tmp_path / "other.ckpt")


def test_without_diffusers_one_clear_line(tmp_path):
    """diffusers blocked: the SD VAE says how to install it; MAR works without it."""
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "from neon_scale.errors import NeonError\n"
        "from neon_scale.models.vae import build_vae, load_sd_vae\n"
        "import torch\n"
        "v = build_vae('mar', None, tiny=True)\n"
        "assert v.decode(torch.zeros(1, 16, 2, 2)).shape == (1, 3, 32, 32)\n"
        "for call in (lambda: load_sd_vae(sys.argv[1]), lambda: build_vae('sd', None, tiny=True)):\n"
        "    try:\n"
        "        call()\n"
        "    except NeonError as e:\n"
        "        print('ERR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("ERR ") for line in lines)
    assert all("diffusers" in line and "pip install diffusers" in line and "sd-vae" in line for line in lines)
