"""`neon export`: our safetensors -> the official DiT .pt / xAR .pth files and back.

The official key/shape lists are tests/test_dit.py's and tests/test_xar.py's `official_layout`
(written from facebookresearch/DiT models.py and the authors' xAR models/xar.py, not from our
networks). Every export is read with torch.load(weights_only=True), as the official scripts'
torch.load does on torch >= 2.6, compared with those lists in order and loaded strictly into a
module whose state dict is exactly that list; the round trip through the import direction gives
back the same tensors, bit for bit."""
import os

import pytest
import torch
from torch import nn

from neon_scale import io
from neon_scale.errors import NeonError
from neon_scale.merge import export as ex
from neon_scale.merge.sources import SafetensorsSource, TensorMeta
from neon_scale.merge.writer import write_checkpoint
from neon_scale.models.dit import DiT, dit_config
from neon_scale.models.xar import XAR, xar_config

from . import test_dit, test_xar
from .conftest import assert_one_line_error, neon

DIT_TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
# The official xAR fixes 1000 classes (1001 embedding rows) and a 16 x 16 token grid (RoPE tables):
# a tiny xAR the official code builds is narrow and shallow, not small in those.
XAR_TINY = dict(img_size=256, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=32,
                decoder_depth=2, decoder_num_heads=2, class_num=1000)


def official_dit():
    return test_dit.official_layout(2, 32, 2, in_ch=4, classes=10, input_size=8)


def official_xar(monkeypatch):
    monkeypatch.setitem(test_xar.MLP_HIDDEN, 32, 85)  # int(32 * 4 * 2 / 3.), the official SwiGLU width
    return [(k, s) for k, s, _ in test_xar.official_layout(32, 2, 2, tokens=256)]


def random_state(model: nn.Module, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The model's state with every float tensor random (the xAR mask keeps its -inf)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.clone() if k == "mask" else torch.randn(v.shape, generator=gen).to(dtype)
    return out


def saved(path, model: nn.Module, seed: int):
    """Random weights of `model` as our safetensors at `path` (as `neon base` writes theta_r)."""
    state = random_state(model, seed)
    io.save_state_dict(path, state, {"model": path.stem})
    return path, state


@pytest.fixture
def dit_file(tmp_path):
    return saved(tmp_path / "dit.safetensors", DiT(**DIT_TINY), 1)


@pytest.fixture
def xar_file(tmp_path):
    return saved(tmp_path / "xar.safetensors", XAR(**XAR_TINY), 2)


class Reference(nn.Module):
    """A module whose state dict is exactly `layout` [(key, shape)], in that order: the official
    key/shape layout, to load an export into with strict=True."""

    def __init__(self, layout):
        super().__init__()
        for key, shape in layout:
            *path, name = key.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            mod.register_buffer(name, torch.zeros(shape))


def load_official(path, layout, state_key=None):
    """What an official script does: torch.load (weights only), maybe an entry, strict load."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj if state_key is None else obj[state_key]
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == layout  # keys, order and shapes
    ref = Reference(layout)
    ref.load_state_dict(sd, strict=True)
    return obj, sd


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


# ----------------------------------------------------------------------------- DiT

def test_dit_export_plain_is_the_official_bare_state_dict(dit_file, tmp_path):
    src, state = dit_file
    args = ex.export_official(src, tmp_path / "DiT.pt", "dit")
    _, sd = load_official(tmp_path / "DiT.pt", official_dit())
    assert_same(sd, state)
    assert args["input_size"] == 8 and args["num_classes"] == 10 and args["learn_sigma"]


def test_dit_export_train_is_what_find_model_reads(dit_file, tmp_path):
    src, state = dit_file
    ex.export_official(src, tmp_path / "0001000.pt", "dit", container="train")
    obj = torch.load(tmp_path / "0001000.pt", map_location="cpu", weights_only=True)
    assert sorted(obj) == ["ema", "model"]
    _, ema = load_official(tmp_path / "0001000.pt", official_dit(), "ema")  # find_model takes "ema"
    _, model = load_official(tmp_path / "0001000.pt", official_dit(), "model")
    assert_same(ema, state)
    assert_same(model, state)
    # the same tensors under both: the file is not twice the size of the bare one
    ex.export_official(src, tmp_path / "bare.pt", "dit")
    assert os.path.getsize(tmp_path / "0001000.pt") < 1.2 * os.path.getsize(tmp_path / "bare.pt")


def test_dit_round_trip_is_exact_and_io_reads_the_export(dit_file, tmp_path):
    src, state = dit_file
    ex.export_official(src, tmp_path / "DiT.pt", "dit")
    ex.import_official(tmp_path / "DiT.pt", tmp_path / "back.safetensors", "dit")
    back = io.load_state_dict(tmp_path / "back.safetensors")
    assert_same(back, state)
    # the import path of `neon base` (base.weights) reads the export as it reads released files
    model = DiT(**DIT_TINY)
    io.load_into(model, io.load_state_dict(tmp_path / "DiT.pt"), "DiT.pt")
    assert_same(model.state_dict(), state)
    # a training container comes back through its EMA
    ex.export_official(src, tmp_path / "train.pt", "dit", container="train")
    ex.import_official(tmp_path / "train.pt", tmp_path / "back2.safetensors", "dit")
    assert_same(io.load_state_dict(tmp_path / "back2.safetensors"), state)


def test_dtype_is_kept_or_cast(tmp_path):
    state = random_state(DiT(**DIT_TINY), 3, torch.bfloat16)
    io.save_state_dict(tmp_path / "bf16.safetensors", state)
    ex.export_official(tmp_path / "bf16.safetensors", tmp_path / "kept.pt", "dit")
    _, sd = load_official(tmp_path / "kept.pt", official_dit())
    assert_same(sd, state)
    ex.export_official(tmp_path / "bf16.safetensors", tmp_path / "fp32.pt", "dit", dtype="fp32")
    _, sd = load_official(tmp_path / "fp32.pt", official_dit())
    assert_same(sd, {k: v.float() for k, v in state.items()})
    ex.import_official(tmp_path / "kept.pt", tmp_path / "back.safetensors", "dit")
    assert_same(io.load_state_dict(tmp_path / "back.safetensors"), state)


def test_sharded_and_merge_output_sources(dit_file, tmp_path):
    src, state = dit_file
    with SafetensorsSource(src) as s:
        entries = [(k, s.meta(k)) for k in s.keys()]
        for name, size in (("sharded", 4096), ("merged", 10**9)):  # index + shards; one model.safetensors
            (tmp_path / name).mkdir()
            write_checkpoint(tmp_path / name, entries, s.get, size)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "merged" / "model.safetensors.index.json").exists()
    for name in ("sharded", "merged"):
        ex.export_official(tmp_path / name, tmp_path / f"{name}.pt", "dit")
        _, sd = load_official(tmp_path / f"{name}.pt", official_dit())
        assert_same(sd, state)


# ----------------------------------------------------------------------------- xAR

def test_xar_export_plain_is_the_official_bare_state_dict(xar_file, tmp_path, monkeypatch):
    src, state = xar_file
    ex.export_official(src, tmp_path / "xAR.pth", "xar")
    _, sd = load_official(tmp_path / "xAR.pth", official_xar(monkeypatch))  # eval.py: load_state_dict(checkpoint)
    assert_same(sd, state)
    assert torch.isinf(sd["mask"]).any()


def test_xar_export_train_is_what_main_mar_resumes(xar_file, tmp_path, monkeypatch):
    src, state = xar_file
    ex.export_official(src, tmp_path / "checkpoint-last.pth", "xar", container="train")
    obj, model = load_official(tmp_path / "checkpoint-last.pth", official_xar(monkeypatch), "model")
    assert sorted(obj) == ["model", "model_ema"]
    assert_same(model, state)
    assert_same(obj["model_ema"], state)
    # the Neon authors' calculate_fid.py: ckpt.get('model_ema', ckpt.get('state_dict', ckpt))
    assert_same(obj.get("model_ema", obj.get("state_dict", obj)), state)


def test_xar_round_trip_is_exact(xar_file, tmp_path):
    src, state = xar_file
    ex.export_official(src, tmp_path / "xAR.pth", "xar")
    ex.import_official(tmp_path / "xAR.pth", tmp_path / "back.safetensors", "xar")
    assert_same(io.load_state_dict(tmp_path / "back.safetensors"), state)
    model = XAR(**XAR_TINY)
    io.load_into(model, io.load_state_dict(tmp_path / "xAR.pth"), "xAR.pth")
    assert_same(model.state_dict(), state)


def test_xar_the_official_code_cannot_build_is_refused(tmp_path):
    for name, kw in (("classes", dict(XAR_TINY, class_num=10)), ("size", dict(XAR_TINY, img_size=128))):
        io.save_state_dict(tmp_path / f"{name}.safetensors", random_state(XAR(**kw), 4))
        with pytest.raises(NeonError, match="official xAR"):
            ex.export_official(tmp_path / f"{name}.safetensors", tmp_path / f"{name}.pth", "xar")
        assert not (tmp_path / f"{name}.pth").exists()
        # our own layout has no such limit: the import direction checks ours
        ex.import_official(tmp_path / f"{name}.safetensors", tmp_path / f"{name}-copy.safetensors", "xar")


# ----------------------------------------------------------------------------- layouts at full size

@pytest.mark.parametrize("variant", ["XL/2", "B/4", "S/8"])
def test_dit_layout_check_and_official_flags(variant):
    cfg = dit_config(variant)
    with torch.device("meta"):
        model = DiT(**cfg)
    metas = {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    keys, args = ex.check_layout("dit", metas, "x")
    assert [(k, tuple(metas[k].shape)) for k in keys] == test_dit.official_layout(cfg["depth"], cfg["hidden_size"],
                                                                                cfg["patch_size"])
    usage, warning = ex.official_usage("dit", args)
    assert f"--model DiT-{variant} --image-size 256 --num-classes 1000" in usage and warning is None


@pytest.mark.parametrize("size,name", [("B", "xar_base"), ("L", "xar_large"), ("H", "xar_huge")])
def test_xar_layout_check_and_official_flags(size, name):
    with torch.device("meta"):
        model = XAR(**xar_config(size))
    metas = {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    dim, depth, heads, _ = test_xar.OFFICIAL[size]
    keys, args = ex.check_layout("xar", metas, "x")
    assert [(k, tuple(metas[k].shape)) for k in keys] == [(k, s) for k, s, _ in test_xar.official_layout(dim, depth, heads)]
    usage, warning = ex.official_usage("xar", args)
    assert f"--model {name}" in usage and warning is None


def test_tiny_dit_gets_the_constructor_call_and_a_warning():
    with torch.device("meta"):
        model = DiT(**DIT_TINY)
    metas = {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    usage, warning = ex.official_usage("dit", ex.check_layout("dit", metas, "x")[1])
    assert "models.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2" in usage
    assert "sample.py" in warning


# ----------------------------------------------------------------------------- bad input

def test_wrong_keys_and_shapes_are_one_line(dit_file, tmp_path):
    src, state = dit_file
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}, "missing key 'blocks.1.mlp.fc2.bias'"),
        "extra": (dict(state, **{"blocks.0.extra": torch.zeros(2)}), "unexpected key 'blocks.0.extra'"),
        "shape": (dict(state, **{"blocks.0.attn.proj.bias": torch.zeros(31)}), "key 'blocks.0.attn.proj.bias' has shape (31,)"),
    }
    for name, (bad, message) in cases.items():
        io.save_state_dict(tmp_path / f"{name}.safetensors", bad)
        with pytest.raises(NeonError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ex.export_official(tmp_path / f"{name}.safetensors", tmp_path / f"{name}.pt", "dit")
        assert not (tmp_path / f"{name}.pt").exists()
    (tmp_path / "exists.pt").write_bytes(b"old")
    with pytest.raises(NeonError, match="already exists"):
        ex.export_official(src, tmp_path / "exists.pt", "dit")
    assert (tmp_path / "exists.pt").read_bytes() == b"old"
    ex.export_official(src, tmp_path / "exists.pt", "dit", overwrite=True)
    load_official(tmp_path / "exists.pt", official_dit())


@pytest.mark.slow  # two neon commands in fresh processes
def test_cli_export_and_wrong_kind(dit_file, tmp_path):
    src, state = dit_file
    proc = neon("export", str(src), "--to", "dit", "-o", str(tmp_path / "out" / "DiT.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "models.DiT(input_size=8" in proc.stdout
    _, sd = load_official(tmp_path / "out" / "DiT.pt", official_dit())
    assert_same(sd, state)
    before = sorted(os.listdir(tmp_path))
    proc = neon("export", str(src), "--to", "xar", "-o", str(tmp_path / "new" / "xAR.pth"))
    assert_one_line_error(proc, str(src), "missing key 'encoder_pos_embed_learned'", exit_code=2)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, not even the folder or a lock
