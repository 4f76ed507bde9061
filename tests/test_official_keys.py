"""Official files as released (issue 18): keys the model needs and the file lacks are an error
naming the first; keys the file has and the model does not (a VAE's training loss, an EMA copy) are
one warning line with their count and first names, an error with --strict / `strict_keys: true`.
Every official file we read: DiT and xAR weights through the base stage and `neon export`'s import,
kl16.ckpt, the SD VAE (diffusers folder and original single file), Inception (and its `neon fid`).
Our own files stay strict both ways."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from neon_scale import io
from neon_scale.config import load_config
from neon_scale.errors import NeonError
from neon_scale.merge.export import export
from neon_scale.metrics.inception import InceptionV3, load_inception
from neon_scale.models import vae as vae_mod
from neon_scale.stages import base as base_stage
from neon_scale.stages.common import RunContext

from .conftest import ROOT, assert_one_line_error, neon
from .test_vae import official_layout, random_state

EXTRA = {"loss.discriminator.main.0.weight": torch.zeros(2, 3), "loss.logvar": torch.zeros(()),
         "loss.perceptual_loss.net.slice1.0.weight": torch.zeros(4), "model_ema.decay": torch.tensor(0.999)}
WARNED = ("ignored 4 key(s) the model does not have: 'loss.discriminator.main.0.weight', 'loss.logvar', "
          "'loss.perceptual_loss.net.slice1.0.weight', ...")
REFUSED = "unexpected key 'loss.discriminator.main.0.weight' (and 3 more) the model does not have (refused: --strict"

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")


@pytest.fixture
def strict():
    io.strict_keys(True)
    yield
    io.strict_keys(False)


def with_extra(state: dict) -> dict:
    return {**state, **EXTRA}


def without(state: dict, *drop: str) -> dict:
    return {k: v for k, v in state.items() if k not in drop}


def warning_of(capsys) -> str:
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "ignored" in ln]
    assert len(lines) == 1, out
    assert lines[0].startswith("warning:") and "--strict / strict_keys: true" in lines[0]
    return lines[0]


def one_line(fn, *args, **kw) -> str:
    with pytest.raises(NeonError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# io.load_into itself: official files lenient on extra keys, ours strict


def test_load_into_official_and_ours(capsys, strict):
    io.strict_keys(False)
    net = torch.nn.Linear(2, 3)
    state = {k: torch.ones_like(v) for k, v in net.state_dict().items()}
    loaded = io.load_into(net, with_extra(state), "f.pt", official=True)
    assert list(loaded) == ["weight", "bias"] and bool((net.weight == 1).all())
    assert "f.pt: " + WARNED in warning_of(capsys)
    # ours: an extra key is an error, as before
    assert one_line(io.load_into, net, with_extra(state), "ours.safetensors") == \
        "ours.safetensors: unexpected key 'loss.discriminator.main.0.weight' (and 3 more)"
    assert one_line(io.load_into, net, without(state, "weight", "bias"), "f.pt", official=True) == \
        "f.pt: missing key 'weight' (and 1 more)"
    bad = {**state, "bias": torch.zeros(4)}
    assert "key 'bias' has shape (4,), the model expects (3,)" in one_line(io.load_into, net, bad, "f.pt", official=True)
    io.strict_keys(True)
    assert REFUSED in one_line(io.load_into, net, with_extra(state), "f.pt", official=True)
    assert capsys.readouterr().out == ""  # nothing loaded, nothing said


# ---------------------------------------------------------------------------------------------
# DiT and xAR: base.weights through the base stage (rank 0, in process)


def _base_ctx(name: str, weights, run_dir) -> RunContext:
    cfg = load_config(str(ROOT / "configs" / f"{name}_tiny.yaml"),
                      [f"base.weights={weights}", "base.random_init=false", f"run_dir={run_dir}"], check_files=False)
    return RunContext.from_config(cfg)


@pytest.mark.parametrize("name", ["dit", "xar"])
def test_base_weights_extra_and_missing_keys(name, tmp_path, capsys, strict):
    io.strict_keys(False)
    ctx = _base_ctx(name, tmp_path / "none.pt", tmp_path / "run")
    torch.manual_seed(0)
    state = ctx.spec.build(ctx.model_args()).state_dict()
    keys = list(state)

    # (a) a training checkpoint whose EMA carries keys the network lacks: loaded, one warning, theta_r without them
    torch.save({"ema": with_extra(state), "args": 3}, tmp_path / "extra.pt")
    ctx = _base_ctx(name, tmp_path / "extra.pt", tmp_path / "run-a")
    base_stage.run(ctx)
    assert f"{tmp_path / 'extra.pt'}: {WARNED}" in warning_of(capsys)
    written = load_file(str(ctx.base_weights()))
    assert list(written) == keys or sorted(written) == sorted(keys)
    assert all(torch.equal(written[k], v) for k, v in state.items())

    # (b) two keys removed: the first (in the model's order) named, and how many
    torch.save(without(state, keys[3], keys[1]), tmp_path / "missing.pt")
    ctx = _base_ctx(name, tmp_path / "missing.pt", tmp_path / "run-b")
    msg = one_line(base_stage.run, ctx)
    assert msg == f"{tmp_path / 'missing.pt'}: missing key '{keys[1]}' (and 1 more)"
    assert not ctx.base_weights().exists()

    # (c) strict_keys: (a) refused
    io.strict_keys(True)
    ctx = _base_ctx(name, tmp_path / "extra.pt", tmp_path / "run-c")
    assert REFUSED in one_line(base_stage.run, ctx)
    assert not ctx.base_weights().exists()


def test_strict_keys_is_a_config_key(tmp_path):
    cfg = load_config(str(ROOT / "configs" / "dit_tiny.yaml"), ["strict_keys=true"], check_files=False)
    assert cfg.strict_keys is True
    assert load_config(str(ROOT / "configs" / "dit_tiny.yaml"), [], check_files=False).strict_keys is False


@pytest.mark.parametrize("name", ["dit", "xar"])
def test_export_import_of_an_official_file(name, tmp_path, capsys, strict):
    """`neon export OFFICIAL.pt -o ours.safetensors`: extra keys left out with a warning; missing
    keys an error; --strict refuses extras. The export direction (our files) stays strict."""
    io.strict_keys(False)
    ctx = _base_ctx(name, tmp_path / "none.pt", tmp_path / "run")
    torch.manual_seed(0)
    state = ctx.spec.build(ctx.model_args()).state_dict()
    torch.save(with_extra(state), tmp_path / "official.pth")
    export(tmp_path / "official.pth", tmp_path / "ours.safetensors", name)
    assert WARNED in warning_of(capsys)
    assert sorted(load_file(str(tmp_path / "ours.safetensors"))) == sorted(state)

    save_file(with_extra(state), str(tmp_path / "ours-extra.safetensors"))
    msg = one_line(export, tmp_path / "ours-extra.safetensors", tmp_path / "out.pth", name)
    assert "unexpected key 'loss.discriminator.main.0.weight'" in msg

    key = list(state)[-1]
    torch.save(without(state, key), tmp_path / "missing.pth")
    assert f"missing key '{key}'" in one_line(export, tmp_path / "missing.pth", tmp_path / "m.safetensors", name)

    io.strict_keys(True)
    assert REFUSED in one_line(export, tmp_path / "official.pth", tmp_path / "s.safetensors", name)


# ---------------------------------------------------------------------------------------------
# MAR KL-16 (kl16.ckpt: {"model": ...}, read by the official code with strict=False)


def test_kl16_extra_and_missing_keys(tmp_path, capsys, monkeypatch, strict):
    io.strict_keys(False)
    monkeypatch.setattr(vae_mod, "MAR_KL16", vae_mod.MAR_TINY)  # the real loader, a small network
    state = vae_mod.random_mar_vae(1).state_dict()
    torch.save({"model": with_extra(state), "optimizer": {"step": 3}}, tmp_path / "kl16.ckpt")
    vae = vae_mod.build_vae("mar", tmp_path / "kl16.ckpt")
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in state.items())
    assert f"{tmp_path / 'kl16.ckpt'} (MAR KL-16 VAE weights (kl16.ckpt)): {WARNED}" in warning_of(capsys)

    torch.save({"model": without(state, "decoder.conv_out.bias", "encoder.conv_in.weight")}, tmp_path / "m.ckpt")
    msg = one_line(vae_mod.load_mar_vae, tmp_path / "m.ckpt")
    assert "missing key 'encoder.conv_in.weight' (and 1 more)" in msg and str(tmp_path / "m.ckpt") in msg

    io.strict_keys(True)
    assert REFUSED in one_line(vae_mod.load_mar_vae, tmp_path / "kl16.ckpt")


# ---------------------------------------------------------------------------------------------
# Stable Diffusion VAE: a diffusers folder and an original (LDM) single file


@needs_diffusers
def test_sd_folder_extra_and_missing_keys(tmp_path, capsys, strict):
    io.strict_keys(False)
    tiny = vae_mod.random_sd_vae(2)
    tiny.net.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    order = list(tiny.net.state_dict())

    save_file(with_extra(state), str(weights))
    vae = vae_mod.load_sd_vae(tmp_path / "vae")
    assert all(torch.equal(vae.net.state_dict()[k], v) for k, v in tiny.net.state_dict().items())
    line = warning_of(capsys)
    assert "(Stable Diffusion VAE): ignored 4 key(s) the model does not have: " in line
    assert all(f"'{k}'" in line for k in sorted(EXTRA)[:3])

    io.strict_keys(True)
    assert "unexpected key 'loss.discriminator.main.0.weight' (and 3 more)" in one_line(vae_mod.load_sd_vae, tmp_path / "vae")
    io.strict_keys(False)

    # missing: an error naming the first in the network's order (diffusers alone would initialise it randomly)
    save_file(without(state, order[5], order[2]), str(weights))
    msg = one_line(vae_mod.load_sd_vae, tmp_path / "vae")
    assert f"missing key '{order[2]}' (and 1 more)" in msg and str(tmp_path / "vae") in msg

    save_file({**state, order[0]: torch.zeros(1, 2, 3, 3)}, str(weights))
    assert f"key '{order[0]}' has shape (1, 2, 3, 3), the model expects" in one_line(vae_mod.load_sd_vae, tmp_path / "vae")


@needs_diffusers
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_sd_single_file_extra_and_missing_keys(tmp_path, capsys, fmt, strict):
    io.strict_keys(False)
    sd = random_state(official_layout(ch=32, mult=(1, 2, 2), nres=1, z=4, attn_last=False), seed=8)

    def write(state, name):
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "safetensors":  # a whole SD checkpoint's VAE part: the prefix, other networks left out
            save_file({**{"first_stage_model." + k: v for k, v in state.items()},
                       "model.diffusion_model.w": torch.zeros(2)}, str(path))
        else:
            torch.save({"state_dict": state, "global_step": 1}, path)
        return path

    reference = vae_mod.load_sd_vae(write(sd, "plain"))
    assert "ignored" not in capsys.readouterr().out
    path = write(with_extra(sd), "extra")
    vae = vae_mod.load_sd_vae(path)
    assert all(torch.equal(v, reference.net.state_dict()[k]) for k, v in vae.net.state_dict().items())
    assert f"{path} (Stable Diffusion VAE): {WARNED}" in warning_of(capsys)

    msg = one_line(vae_mod.load_sd_vae, write(without(sd, "decoder.up.1.block.0.conv1.bias", "quant_conv.weight"), "m"))
    assert "missing key 'decoder.up.1.block.0.conv1.bias' (and 1 more)" in msg

    narrow = {**sd, "post_quant_conv.weight": torch.zeros(4, 4, 3, 3)}
    assert "key 'post_quant_conv.weight' has shape (4, 4, 3, 3), the model expects (4, 4, 1, 1)" in \
        one_line(vae_mod.load_sd_vae, write(narrow, "narrow"))

    io.strict_keys(True)
    assert REFUSED in one_line(vae_mod.load_sd_vae, path)


# ---------------------------------------------------------------------------------------------
# Inception: in process, and `neon fid --weights` (with --strict)


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("inception")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = InceptionV3().state_dict()
    torch.save(state, out / "plain.pth")
    torch.save(with_extra(state), out / "extra.pth")
    torch.save(without(state, "Mixed_5b.branch1x1.conv.weight", "fc.bias"), out / "missing.pth")
    images = out / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):  # the Inception Score's 10 splits
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return out, state


def test_inception_extra_and_missing_keys(inception_files, capsys, strict):
    io.strict_keys(False)
    out, state = inception_files
    model = load_inception(out / "extra.pth", fold=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert f"{out / 'extra.pth'} (torch-fidelity's InceptionV3 weights): {WARNED}" in warning_of(capsys)
    assert "missing key 'Mixed_5b.branch1x1.conv.weight' (and 1 more)" in one_line(load_inception, out / "missing.pth")
    io.strict_keys(True)
    assert REFUSED in one_line(load_inception, out / "extra.pth")


@pytest.mark.slow
def test_neon_fid_weights_extra_and_missing_keys(inception_files, tmp_path):
    out, _ = inception_files
    args = ("fid", str(out / "images"), "--metrics", "isc", "--batch-size", "10", "--workers", "0", "--device", "cpu")
    proc = neon(*args, "--weights", str(out / "extra.pth"), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"warning: {out / 'extra.pth'} (torch-fidelity's InceptionV3 weights): {WARNED}" in proc.stdout
    assert (tmp_path / "r.json").is_file()
    assert_one_line_error(neon(*args, "--weights", str(out / "missing.pth")), "missing.pth",
                          "missing key 'Mixed_5b.branch1x1.conv.weight' (and 1 more)")
    assert_one_line_error(neon(*args, "--weights", str(out / "extra.pth"), "--strict"), "extra.pth", REFUSED)
