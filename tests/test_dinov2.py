"""DINOv2 features (FD_DINOv2): the official checkpoint layout of ViT-L/14, edm2's pre-processing and
dinov2's position-embedding resampling against float64 formulas written here, strict loading with
one-line errors, and `neon fid --features dinov2` end to end (random ViT-S/14 weights)."""
import json
import math

import numpy as np
import pytest
import torch

from neon_scale.errors import NeonError
from neon_scale.metrics import dinov2
from neon_scale.metrics.dinov2 import DINOv2Features, random_dinov2_weights

from .conftest import assert_one_line_error, neon

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vits_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / "dinov2-vits14-random.pth"
    random_dinov2_weights(path, "S/14", seed=0)
    return path


@pytest.fixture(scope="module")
def vits(vits_weights):
    return DINOv2Features(str(vits_weights), CPU, batch_size=2)


# ----------------------------------------------------------------------------- layout

def official_vit_keys(dim: int, depth: int) -> dict[str, tuple]:
    """facebookresearch/dinov2's released ViT-*/14 state dict (hub models: img 518, patch 14,
    layer scale, unchunked blocks, no registers), written out by hand."""
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + 37 * 37, dim), "mask_token": (1, dim),
            "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                     b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                     b + "ls1.gamma": (dim,),
                     b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                     b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                     b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,),
                     b + "ls2.gamma": (dim,)})
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return keys


def test_vitl14_has_the_official_layout():
    with torch.device("meta"):
        model = dinov2.DINOv2(dinov2.Arch.of(*dinov2.ARCHS["L/14"]))
    state = model.state_dict()
    official = official_vit_keys(1024, 24)
    assert list(state) == list(official)
    assert {k: tuple(v.shape) for k, v in state.items()} == official
    assert tuple(state["pos_embed"].shape) == (1, 1370, 1024)
    assert len(model.blocks) == 24 and model.arch.heads == 16
    n_params = sum(v.numel() for v in state.values())
    assert n_params == sum(math.prod(s) for s in official.values()) == 304_368_640  # "ViT-L/14, 300M"
    # the architecture is read back from the shapes alone
    arch = dinov2.arch_from_state(state, "meta")
    assert (arch.dim, arch.depth, arch.heads, arch.hidden, arch.swiglu, arch.grid) == (1024, 24, 16, 4096, False, 37)


def test_vitg14_swiglu_layout_is_inferred():
    with torch.device("meta"):
        state = dinov2.DINOv2(dinov2.Arch.of(1536, 40, swiglu=True)).state_dict()
    assert tuple(state["blocks.39.mlp.w12.weight"].shape) == (8192, 1536)
    assert tuple(state["blocks.39.mlp.w3.weight"].shape) == (1536, 4096)
    arch = dinov2.arch_from_state(state, "meta")
    assert (arch.dim, arch.depth, arch.heads, arch.hidden, arch.swiglu) == (1536, 40, 24, 4096, True)


# ----------------------------------------------------------------------------- numerics

def keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, a * (((x - 5) * x + 8) * x - 4), 0.0))


def antialiased_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 weights of a PIL-style resize: Keys cubic (a = -0.5) stretched by the
    downscale factor, taps inside the image only, each row normalised to 1."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - 2 * stretch + 0.5), 0)
        hi = min(int(center + 2 * stretch + 0.5), n_in)
        j = np.arange(lo, hi)
        w = keys_cubic((j + 0.5 - center) / stretch, -0.5)
        m[i, lo:hi] = w / w.sum()
    return m


def edm2_preprocess_float64(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 3, H, W] -> resize to 224 (float64, above) -> / 255 -> ImageNet mean / std."""
    rows = antialiased_bicubic_matrix(images.shape[2], 224)
    cols = antialiased_bicubic_matrix(images.shape[3], 224)
    x = rows @ images.astype(np.float64) @ cols.T / 255
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("shape", [(2, 3, 40, 48), (1, 3, 300, 250), (2, 1, 8, 8)])
def test_preprocess_matches_float64_formula(shape):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = dinov2.preprocess(images)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (shape[0], 3, 224, 224)
    rgb = images.repeat_interleave(3, dim=1) if shape[1] == 1 else images
    ref = edm2_preprocess_float64(rgb.numpy())
    # float32 weights and sums: ~1e-5 of the 0..255 range; a wrong kernel or no antialias is >= 1e-2
    assert np.abs(ours.double().numpy() - ref).max() < 2e-4
    nhwc = dinov2.preprocess(images.permute(0, 2, 3, 1).contiguous(), layout="nhwc")
    assert torch.allclose(nhwc, ours, atol=1e-5)


def test_position_embedding_matches_dinov2_resampling():
    """37 x 37 -> 16 x 16 as dinov2's interpolate_pos_encoding: bicubic (a = -0.75, edge taps
    clamped) sampled at (i + 0.5) * 37 / 16.1 - 0.5, i.e. with the 0.1 offset in the scale factor."""
    model = dinov2.DINOv2(dinov2.Arch.of(64, 1))
    with torch.no_grad():
        model.pos_embed.normal_(generator=torch.Generator().manual_seed(0))
    pos = model.pos_embed.detach().double().numpy()[0]
    grid = pos[1:].reshape(37, 37, 64)

    def taps(n_out, offset=0.1):
        m = np.zeros((n_out, 37))
        for i in range(n_out):
            src = (i + 0.5) * 37 / (n_out + offset) - 0.5
            base = math.floor(src)
            for k in range(-1, 3):
                m[i, min(max(base + k, 0), 36)] += keys_cubic(np.array(src - (base + k)), -0.75)
        return m

    rows, cols = taps(16), taps(12)
    ref = np.einsum("ia,abd,jb->ijd", rows, grid, cols, optimize=True).reshape(16 * 12, 64)
    ours = model.position_embedding(16, 12).detach().double().numpy()[0]
    assert ours.shape == (1 + 16 * 12, 64)
    assert np.abs(ours[0] - pos[0]).max() == 0
    assert np.abs(ours[1:] - ref).max() < 1e-4  # float32 arithmetic
    no_offset = np.einsum("ia,abd,jb->ijd", taps(16, 0.0), grid, taps(12, 0.0), optimize=True).reshape(16 * 12, 64)
    assert np.abs(ours[1:] - no_offset).max() > 1e-1  # the offset matters
    assert model.position_embedding(37, 37) is model.pos_embed  # the training grid: unchanged


@pytest.mark.slow  # DINOv2 features of whole folders (about 10-45 s)
def test_random_weights_give_features_for_grey_and_rgb(vits):
    assert (vits.dim, vits.logits_dim) == (384, None)
    g = torch.Generator().manual_seed(1)
    grey = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=g)
    rgb = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8, generator=g)
    feats, logits = vits(grey)
    assert logits is None and feats.dtype == torch.float32 and feats.device == CPU
    assert tuple(feats.shape) == (3, 384) and torch.isfinite(feats).all()
    assert torch.equal(feats, vits(grey.repeat(1, 3, 1, 1))[0])  # grey is repeated to RGB
    assert (feats[0] - feats[1]).abs().max() > 1e-3  # the features depend on the image
    feats, _ = vits(rgb)
    assert tuple(feats.shape) == (2, 384) and torch.isfinite(feats).all()
    nhwc, _ = vits(rgb.permute(0, 2, 3, 1), layout="nhwc")
    assert torch.allclose(nhwc, feats, atol=1e-4)
    assert vits.seconds["preprocess"] > 0 and vits.seconds["network"] > 0


# ----------------------------------------------------------------------------- errors and the CLI

def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_weights_files_are_one_line(vits_weights, tmp_path):
    state = torch.load(vits_weights, weights_only=True)
    for key in ("blocks.5.ls2.gamma", "cls_token", "blocks.0.mlp.fc1.weight"):
        broken = {k: v for k, v in state.items() if k != key}
        torch.save(broken, tmp_path / "broken.pth")
        with pytest.raises(NeonError) as e:
            DINOv2Features(str(tmp_path / "broken.pth"), CPU)
        assert f"missing key '{key}'" in one_line(e) and "broken.pth" in one_line(e)
    torch.save({**state, "blocks.2.ls1.gamma": torch.ones(10)}, tmp_path / "shape.pth")
    with pytest.raises(NeonError) as e:
        DINOv2Features(str(tmp_path / "shape.pth"), CPU)
    assert "key 'blocks.2.ls1.gamma' has shape (10,)" in one_line(e)
    torch.save({**state, "register_tokens": torch.zeros(1, 4, 384)}, tmp_path / "reg.pth")
    with pytest.raises(NeonError) as e:
        DINOv2Features(str(tmp_path / "reg.pth"), CPU)
    assert "register tokens" in one_line(e)


@pytest.mark.slow  # DINOv2 features of whole folders (about 10-45 s)
def test_missing_weights_file_is_one_line(image_sets, tmp_path):
    gen, ref = (str(p) for p in image_sets)
    proc = neon("fid", gen, ref, "--features", "dinov2", "--weights", str(tmp_path / "missing.pth"))
    assert proc.returncode == 2
    assert_one_line_error(proc, "missing.pth: DINOv2 weights not found", "dinov2_vitl14_pretrain.pth",
                          "never downloaded", exit_code=2)


@pytest.mark.slow  # DINOv2 features of whole folders (about 10-45 s)
def test_fd_dinov2_of_two_folders(image_sets, vits_weights, tmp_path):
    gen, ref = (str(p) for p in image_sets)
    out = tmp_path / "fd.json"
    proc = neon("fid", gen, ref, "--features", "dinov2", "--weights", str(vits_weights), "--batch-size", "24",
                "--workers", "0", "--json", str(out), "--save-stats", str(tmp_path / "gen.npz"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["features"] == "dinov2" and "fid" not in result
    assert math.isfinite(result["fd_dinov2"]) and result["fd_dinov2"] >= 0
    assert result["n"] == {"input1": 24, "input2": 20}
    with np.load(tmp_path / "gen.npz") as stats:
        assert stats["mu"].shape == (384,) and stats["sigma"].shape == (384, 384)
