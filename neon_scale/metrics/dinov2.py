"""DINOv2 ViT features for FD_DINOv2 (the Frechet distance in DINOv2 space, as edm2 and dgm-eval report it).

The network is facebookresearch/dinov2's `DinoVisionTransformer` as its torch.hub entry points build
it (`dinov2_vit{s,b,l,g}14`: patch 14, 518 x 518 training grid so `pos_embed` holds 1 + 37 x 37
rows, layer scale, no register tokens, unchunked blocks), written here with the official parameter
names so the released `dinov2_vitl14_pretrain.pth` loads with `strict=True`:

  cls_token [1, 1, D]   pos_embed [1, 1 + 37*37, D]   mask_token [1, D] (unused at inference)
  patch_embed.proj.{weight,bias}                  Conv2d(3, D, kernel = stride = 14)
  blocks.N.norm1 / norm2.{weight,bias}            LayerNorm(D, eps 1e-6)
  blocks.N.attn.qkv / attn.proj.{weight,bias}     multi-head self-attention, D / 64 heads
  blocks.N.ls1.gamma / ls2.gamma [D]              layer scale on both residual branches
  blocks.N.mlp.fc1 / mlp.fc2.{weight,bias}        GELU MLP, ratio 4 (ViT-g: mlp.w12 / mlp.w3, SwiGLU)
  norm.{weight,bias}                              final LayerNorm
Width, depth and MLP form are read off the file's shapes, so ViT-S/B/L/g 14 all load.

Pre-processing follows edm2's `DINOv2Detector` (calculate_metrics.py, resize_mode='torch'):
uint8 -> float32 -> `interpolate(size=(224, 224), mode='bicubic', antialias=True)` (still 0..255)
-> / 255 -> (x - ImageNet mean) / ImageNet std. Position embeddings are resized from 37 x 37 to
the 16 x 16 grid as dinov2 main's `interpolate_pos_encoding` does: bicubic, no antialias, with
`scale_factor = (16 + 0.1) / 37` (the historical offset, which shifts the sample points) rather than
`size`. Features are the final-norm CLS token (1024-d for ViT-L), float32 with TF32 off.
Weights are read from a local file (safetensors, or .pth with weights_only=True); never downloaded.
"""
from __future__ import annotations

import pathlib
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist, io
from ..errors import NeonError
from .backbone_base import as_rgb, load_weights
from .inception import no_tf32

PATCH = 14
TRAIN_GRID = 37  # 518 / 14: the grid `pos_embed` was trained at
INPUT_SIZE = 224  # edm2 / dgm-eval resize every image to 224 x 224, i.e. a 16 x 16 grid
POS_OFFSET = 0.1  # dinov2's `interpolate_offset` for the non-register models
HEAD_DIM = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EXPECTED_FILE = "dinov2_vitl14_pretrain.pth"
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"

# name -> (embed dim, depth); heads = dim / 64 and the MLP (ratio 4; SwiGLU for g) follow.
ARCHS = {"S/14": (384, 12), "B/14": (768, 12), "L/14": (1024, 24), "g/14": (1536, 40)}


@dataclass(frozen=True)
class Arch:
    dim: int
    depth: int
    hidden: int  # MLP hidden width (SwiGLU: the width of each of its two halves)
    swiglu: bool = False
    grid: int = TRAIN_GRID

    @property
    def heads(self) -> int:
        return self.dim // HEAD_DIM

    @classmethod
    def of(cls, dim: int, depth: int, swiglu: bool = False) -> "Arch":
        """The official hidden width: 4 D, or for SwiGLU 2/3 of it rounded up to a multiple of 8."""
        if dim % HEAD_DIM or dim < HEAD_DIM or depth < 1:
            raise ValueError(f"DINOv2 width must be a positive multiple of {HEAD_DIM} and depth >= 1, "
                             f"got dim={dim}, depth={depth}")
        hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
        return cls(dim, depth, hidden, swiglu)


# ----------------------------------------------------------------------------- building blocks

class PatchEmbed(nn.Module):
    """[N, 3, H, W] -> [N, (H/14)(W/14), D] tokens, row-major over the patch grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(64)) v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """ViT-g's MLP: w12 projects to two halves a, b; out = w3(silu(a) * b)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.norm1 = nn.LayerNorm(arch.dim, eps=1e-6)
        self.attn = Attention(arch.dim, arch.heads)
        self.ls1 = LayerScale(arch.dim)
        self.norm2 = nn.LayerNorm(arch.dim, eps=1e-6)
        self.mlp = (SwiGLU if arch.swiglu else Mlp)(arch.dim, arch.hidden)
        self.ls2 = LayerScale(arch.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------- the model

class DINOv2(nn.Module):
    """Input: float32 [N, 3, H, W] (H, W multiples of 14), normalised. Output: CLS features [N, D]."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        d = arch.dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + arch.grid * arch.grid, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # masked-patch token of training; kept for the layout
        self.patch_embed = PatchEmbed(d)
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """pos_embed for a rows x cols patch grid: [1, 1 + rows*cols, D].

        As dinov2's `interpolate_pos_encoding`: unchanged on the training grid; otherwise the patch
        rows are resampled bicubically (no antialias) with scale factors (rows + 0.1) / 37 and
        (cols + 0.1) / 37, which give output sizes rows, cols but sample at slightly shifted points."""
        m = self.arch.grid
        if (rows, cols) == (m, m):
            return self.pos_embed
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        scale = ((rows + POS_OFFSET) / m, (cols + POS_OFFSET) / m)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(grid.shape[-2:]) != (rows, cols):
            raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, wanted {(rows, cols)}")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if h % PATCH or w % PATCH:
            raise ValueError(f"DINOv2 input height and width must be multiples of {PATCH}, got {h} x {w}")
        tokens = torch.cat([self.cls_token.expand(n, -1, -1), self.patch_embed(x)], dim=1)
        tokens = tokens + self.position_embedding(h // PATCH, w // PATCH)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


# ----------------------------------------------------------------------------- pre-processing

def preprocess(images: torch.Tensor, layout: str = "nchw") -> torch.Tensor:
    """uint8 [N, C, H, W] (or NHWC), C = 1 or 3 -> float32 [N, 3, 224, 224], as edm2's DINOv2Detector."""
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"DINOv2 preprocess: layout must be 'nchw' or 'nhwc', got {layout!r}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"DINOv2 preprocess: expected uint8 [N, C, H, W] images, got {images.dtype} "
                         f"of shape {list(images.shape)}")
    x = as_rgb(images, layout)
    if layout == "nhwc":
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"DINOv2 preprocess: expected 1 or 3 channels, got {x.shape[1]} ({layout})")
    x = F.interpolate(x.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
    x = x / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- loading

def _need(state: dict[str, torch.Tensor], key: str, source: str, ndim: int) -> torch.Tensor:
    if key not in state:
        raise NeonError(f"{source}: missing key '{key}'")
    if state[key].ndim != ndim:
        raise NeonError(f"{source}: key '{key}' has shape {tuple(state[key].shape)}, expected {ndim} dimensions")
    return state[key]


def arch_from_state(state: dict[str, torch.Tensor], source: str) -> Arch:
    """Width, depth and MLP form of an official-layout state dict (one line if it is not one)."""
    if "register_tokens" in state:
        raise NeonError(f"{source}: a DINOv2 checkpoint with register tokens (dinov2_*_reg); FD_DINOv2 uses "
                        f"the plain {EXPECTED_FILE}")
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state):
        raise NeonError(f"{source}: chunked block keys ('blocks.C.N...', a training checkpoint); expected the "
                        f"released layout 'blocks.N...' as in {EXPECTED_FILE}")
    dim = _need(state, "cls_token", source, 3).shape[-1]
    patch = _need(state, "patch_embed.proj.weight", source, 4).shape
    if tuple(patch[1:]) != (3, PATCH, PATCH):
        raise NeonError(f"{source}: 'patch_embed.proj.weight' has shape {tuple(patch)}; expected a "
                        f"{PATCH} x {PATCH} RGB patch embedding (a DINOv2 ViT-*/14)")
    tokens = _need(state, "pos_embed", source, 3).shape[1] - 1
    grid = round(tokens ** 0.5)
    if grid * grid != tokens:
        raise NeonError(f"{source}: 'pos_embed' has {tokens} patch rows, not a square grid")
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise NeonError(f"{source}: missing key 'blocks.0.norm1.weight' (no transformer blocks)")
    if "blocks.0.mlp.w12.weight" in state:
        swiglu, hidden = True, _need(state, "blocks.0.mlp.w12.weight", source, 2).shape[0] // 2
    else:
        swiglu, hidden = False, _need(state, "blocks.0.mlp.fc1.weight", source, 2).shape[0]
    if dim % HEAD_DIM:
        raise NeonError(f"{source}: width {dim} is not a multiple of {HEAD_DIM} (DINOv2 heads are {HEAD_DIM}-d)")
    return Arch(dim, depth, hidden, swiglu, grid)


def load_dinov2(path: str | pathlib.Path, device: torch.device | str = "cpu") -> DINOv2:
    path = pathlib.Path(path)
    if not path.is_file():
        raise NeonError(f"{path}: DINOv2 weights not found; FD_DINOv2 needs the official ViT-L/14 checkpoint "
                        f"{EXPECTED_FILE} ({OFFICIAL_URL}) as a local file passed with --weights (never downloaded)")
    source = f"{path} (DINOv2 weights, e.g. {EXPECTED_FILE})"
    state = io.load_state_dict(path)
    arch = arch_from_state(state, source)
    model = DINOv2(arch)
    load_weights(model, state, source, official=True)
    return model.float().requires_grad_(False).eval().to(device)


class DINOv2Features:
    """uint8 [N, C, H, W] (or NHWC) -> (CLS features [N, D] float32 on the CPU, None): a backbone."""

    logits_dim = None

    def __init__(self, weights: str, device: torch.device | None = None, batch_size: int = 64):
        self.device = device or dist.device()
        self.batch_size = batch_size
        self.model = load_dinov2(weights, self.device)
        self.dim = self.model.arch.dim
        self.seconds = {"preprocess": 0.0, "network": 0.0}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, layout: str = "nchw") -> tuple[torch.Tensor, None]:
        out = []
        with no_tf32():
            for chunk in images.split(self.batch_size):
                t0 = time.perf_counter()
                x = preprocess(chunk.to(self.device, non_blocking=True), layout)
                self._sync()
                t1 = time.perf_counter()
                out.append(self.model(x).float().cpu())
                t2 = time.perf_counter()
                self.seconds["preprocess"] += t1 - t0
                self.seconds["network"] += t2 - t1
        if not out:
            return torch.zeros(0, self.dim), None
        return torch.cat(out), None


# ----------------------------------------------------------------------------- random weights

def random_dinov2_weights(path: str | pathlib.Path, arch: str | tuple[int, int] = "S/14", seed: int = 0) -> None:
    """Random DINOv2 weights in the official layout (tests and tiny configs only).

    `arch` is a name of ARCHS ("S/14", "B/14", "L/14", "g/14") or (embed dim, depth). Linear
    weights, `pos_embed` and `cls_token` are truncated normals (std 0.02, as dinov2's init for
    the first two), biases zero, layer scales 1 (the hub models' init_values), norms identity."""
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ValueError(f"unknown DINOv2 arch {arch!r}; one of {', '.join(ARCHS)} or (dim, depth)")
        spec = Arch.of(*ARCHS[arch], swiglu=arch.startswith("g"))
    else:
        spec = Arch.of(*arch)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DINOv2(spec)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias") and not name.startswith("patch_embed"):
                    p.zero_()
                elif name in ("pos_embed", "cls_token") or (p.ndim == 2 and name != "mask_token"):
                    nn.init.trunc_normal_(p, std=0.02)
    if pathlib.Path(path).suffix == ".safetensors":
        io.save_state_dict(path, model.state_dict())
        return
    with io.atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
