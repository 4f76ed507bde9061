"""xAR (next-cell flow autoregression): the network with the official module and parameter names,
and its flow-matching training loss. The sampler is in `xar_sampler.py`.

The image's VAE latent (MAR's KL-16: 16 channels, stride 16, scaled by 0.2325) is a grid of
tokens cut into `clusters` square cells (256 px: 16x16 tokens, four 8x8 cells). Tokens are
ordered cell by cell (cells in raster order, raster order inside a cell); attention is
block-causal over cells. Every cell carries its own flow time t (t = 0 data, t = 1 noise), the
network predicts the velocity noise - data of every token.

State-dict keys, shapes and dtypes equal those of the authors' `xAR/models/xar.py`, so their
released `.pth` files (bare state dicts) load with `strict=True`:

  encoder_pos_embed_learned, decoder_pos_embed_learned   [1, L, D] learned positions
  mask                                        [1, 1, L, L] buffer: 0 where a token may attend, -inf else
  class_emb.weight                            [class_num + 1, D]; row class_num = no class (CFG)
  time_embed.mlp.{0,2}.{weight,bias}          sinusoid(256) -> Linear -> SiLU -> Linear
  z_proj.{weight,bias}, z_proj_ln.weight      token (16) -> D, then RMSNorm with a weight
  {encoder,decoder}_blocks.N.attn.qkv/proj.*  attention (qkv with bias)
  {encoder,decoder}_blocks.N.attn.rope.{freqs,freqs_cos,freqs_sin}   2-D RoPE buffers
  {encoder,decoder}_blocks.N.mlp.{fc1_g,fc1_x,fc2}.*   gated MLP, hidden int(D * 4 * 2 / 3)
  {encoder,decoder}_blocks.N.ada_lin.1.*      SiLU -> Linear(D, 6D): adaLN gates/scales/shifts
  encoder_norm.weight, decoder_embed.*, decoder_norm.weight, pred.*   (pred: D -> 16)
The blocks' RMSNorms carry no weight. The official MLP is timm's `SwiGLU` built with
act_layer=nn.GELU, so its gate goes through the exact (erf) GELU, not SiLU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import rng
from ..errors import NeonError
from .layers import TimestepEmbedder, check_labels

LATENT_SCALE = 0.2325  # VAE latents are multiplied by this before the model sees them

# size -> (embed dim, depth of the encoder and of the decoder, heads)
XAR_SIZES = {"B": (768, 8, 12), "L": (1024, 16, 16), "H": (1280, 20, 16)}


def xar_config(size: str) -> dict:
    """"B" | "L" | "H" -> the constructor arguments the authors built xar_base/large/huge with
    (sizes from `xar_base` ..., the rest as their train/generate scripts pass them)."""
    if size not in XAR_SIZES:
        raise ValueError(f"unknown xAR size {size!r}: one of {sorted(XAR_SIZES)}")
    dim, depth, heads = XAR_SIZES[size]
    return {"img_size": 256, "vae_stride": 16, "patch_size": 1,
            "encoder_embed_dim": dim, "encoder_depth": depth, "encoder_num_heads": heads,
            "decoder_embed_dim": dim, "decoder_depth": depth, "decoder_num_heads": heads,
            "mlp_ratio": 4, "vae_embed_dim": 16, "label_drop_prob": 0.1, "class_num": 1000,
            "attn_dropout": 0.1, "proj_dropout": 0.1, "clusters": 4}


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps), computed in float32 (float64 for float64 x) and cast back; times
    a weight if it has one. (The official code always uses float32; it never runs in float64.)"""

    def __init__(self, dim: int, eps: float = 1e-6, weight: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out if self.weight is None else out * self.weight


def rope_tables(head_dim: int, side: int, cell_side: int, theta: float = 10000.0):
    """The official 2-D rotary tables, computed in float32 as the official code does.

    The first half of a head's channels rotates with the token's row, the second half with its
    column; channels pair up (2i, 2i+1) with the frequency theta^(-2i / (head_dim/2)) of their
    half. Rows of the tables follow the cell-major token order. Returns (freqs, cos, sin):
    [head_dim/4], [side*side, head_dim], [side*side, head_dim].
    """
    rot = head_dim // 2  # channels per axis
    freqs = 1.0 / (theta ** (torch.arange(0, rot, 2)[: rot // 2].float() / rot))
    pos = torch.arange(side) / side * side  # float32 positions 0 .. side-1
    ang = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # [side, rot]
    grid = torch.cat([ang[:, None, :].expand(side, side, rot), ang[None, :, :].expand(side, side, rot)], dim=-1)
    cells = side // cell_side
    grid = grid.reshape(cells, cell_side, cells, cell_side, head_dim).permute(0, 2, 1, 3, 4)
    grid = grid.reshape(side * side, head_dim)
    return freqs, grid.cos(), grid.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class RoPE(nn.Module):
    def __init__(self, head_dim: int, side: int, cell_side: int):
        super().__init__()
        freqs, cos, sin = rope_tables(head_dim, side, cell_side)
        self.register_buffer("freqs", freqs)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [B, heads, N, head_dim] holds the tokens at positions start .. start+N-1."""
        n = x.shape[2]
        # float32 tables; the result in x's dtype (16-bit training: q, k as v, what autocast gives sdpa anyway)
        out = x * self.freqs_cos[start:start + n] + rotate_half(x) * self.freqs_sin[start:start + n]
        return out.to(x.dtype)


def block_causal_mask(seq_len: int, cell_len: int) -> torch.Tensor:
    """[1, 1, L, L] float32: 0 where the key's cell is not after the query's cell, -inf else."""
    cell = torch.arange(seq_len) // cell_len
    allowed = cell[None, :] <= cell[:, None]
    return torch.zeros(seq_len, seq_len).masked_fill(~allowed, float("-inf"))[None, None]


class KVCache:
    """Keys (after RoPE) and values of the first `length` tokens for every attention layer
    (encoder layers, then decoder layers). Rows are the batch the cache was written with; a
    smaller batch reads the first rows (the sampler writes [cond; uncond] and may read cond)."""

    def __init__(self, layers: int):
        self.slots = [[None, None] for _ in range(layers)]
        self.length = 0


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, side: int, cell_side: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = RoPE(self.head_dim, side, cell_side)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, start: int = 0, kv: list | None = None,
                keep: int = 0) -> torch.Tensor:
        """x [B, N, D]: tokens at positions start .. start+N-1. kv: a cache slot holding the
        first `start` positions (read), to which the first `keep` new positions are appended."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rope(q, start), self.rope(k, start)
        if kv is not None:
            if kv[0] is not None:
                k, v = torch.cat([kv[0][:b], k], dim=2), torch.cat([kv[1][:b], v], dim=2)
            if keep:
                kv[0], kv[1] = k[:, :, :start + keep], v[:, :, :start + keep]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class GatedMlp(nn.Module):
    """fc2(GELU(fc1_g(x)) * fc1_x(x)) with dropout after the product and after fc2 (timm's
    SwiGLU with act_layer=nn.GELU, as the official Block builds it)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(F.gelu(self.fc1_g(x)) * self.fc1_x(x))))


class Block(nn.Module):
    """x += gamma1 * attn(RMS(x) (1 + scale1) + shift1); x += gamma2 * mlp(RMS(x) (1 + scale2) + shift2),
    the six modulations from the condition of the token's cell."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, side: int, cell_side: int,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, side, cell_side, attn_drop, proj_drop)
        self.norm2 = RMSNorm(dim)
        self.mlp = GatedMlp(dim, int(dim * mlp_ratio * 2 / 3.0), proj_drop)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None, start: int = 0,
                kv: list | None = None, keep: int = 0) -> torch.Tensor:
        """x [B, N, D] (N = cells * cell_len), c [B, cells, D]."""
        b, n, d = x.shape
        cells = c.shape[1]
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(c).unsqueeze(2).chunk(6, dim=-1)

        def per_cell(h):  # [B, N, D] <-> [B, cells, cell_len, D]: modulations broadcast per cell
            return h.reshape(b, cells, n // cells, d)

        h = (per_cell(self.norm1(x)) * (1 + scale1) + shift1).reshape(b, n, d)
        x = x + (per_cell(self.attn(h, mask, start, kv, keep)) * gamma1).reshape(b, n, d)
        h = (per_cell(self.norm2(x)) * (1 + scale2) + shift2).reshape(b, n, d)
        return x + (per_cell(self.mlp(h)) * gamma2).reshape(b, n, d)


# ----------------------------------------------------------------------------- the model

class XAR(nn.Module):
    def __init__(self, img_size: int = 256, vae_stride: int = 16, patch_size: int = 1,
                 encoder_embed_dim: int = 1024, encoder_depth: int = 16, encoder_num_heads: int = 16,
                 decoder_embed_dim: int = 1024, decoder_depth: int = 16, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, vae_embed_dim: int = 16, label_drop_prob: float = 0.1,
                 class_num: int = 1000, attn_dropout: float = 0.0, proj_dropout: float = 0.0, clusters: int = 4):
        super().__init__()
        if patch_size != 1:
            raise ValueError(f"xAR: patch_size={patch_size} is not supported (the official model uses 1)")
        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.vae_embed_dim = self.token_embed_dim = vae_embed_dim
        self.seq_h = self.seq_w = img_size // vae_stride
        self.seq_len = self.seq_h * self.seq_w
        self.cluster_h = self.cluster_w = math.isqrt(clusters)
        if clusters < 2 or self.cluster_h ** 2 != clusters or self.seq_h % self.cluster_h:
            raise ValueError(f"xAR: clusters={clusters} must be a square >= 4 whose side divides the "
                             f"{self.seq_h}x{self.seq_w} token grid")
        if decoder_embed_dim != encoder_embed_dim:  # the decoder's adaLN reads the encoder-width condition
            raise ValueError(f"xAR: decoder_embed_dim {decoder_embed_dim} must equal encoder_embed_dim "
                             f"{encoder_embed_dim}")
        for dim, heads in ((encoder_embed_dim, encoder_num_heads), (decoder_embed_dim, decoder_num_heads)):
            if dim % heads or (dim // heads) % 4:
                raise ValueError(f"xAR: width {dim} / {heads} heads must give a head dim divisible by 4 (RoPE)")
        self.clusters = clusters
        self.cell_side = self.seq_h // self.cluster_h
        self.cell_len = self.cell_side ** 2  # tokens per cell (64 at 256 px)
        self.num_classes = class_num
        self.label_drop_prob = label_drop_prob
        self.checkpointing = False  # activation checkpointing of every block while grad is enabled

        # built in the official order (the state dict and the default-init RNG stream follow it)
        self.class_emb = nn.Embedding(class_num + 1, encoder_embed_dim)
        self.time_embed = TimestepEmbedder(encoder_embed_dim)
        self.z_proj = nn.Linear(vae_embed_dim, encoder_embed_dim)
        self.z_proj_ln = RMSNorm(encoder_embed_dim, weight=True)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, encoder_embed_dim))

        def blocks(dim, heads, depth):
            return nn.ModuleList([Block(dim, heads, mlp_ratio, self.seq_h, self.cell_side, attn_dropout,
                                        proj_dropout) for _ in range(depth)])

        self.encoder_blocks = blocks(encoder_embed_dim, encoder_num_heads, encoder_depth)
        self.encoder_norm = RMSNorm(encoder_embed_dim, weight=True)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))
        self.decoder_blocks = blocks(decoder_embed_dim, decoder_num_heads, decoder_depth)
        self.decoder_norm = RMSNorm(decoder_embed_dim, weight=True)
        self.pred = nn.Linear(decoder_embed_dim, vae_embed_dim)
        self._init_weights()
        self.register_buffer("mask", block_causal_mask(self.seq_len, self.cell_len))

    def _init_weights(self) -> None:
        """The official initialisation: N(0, 0.02) class embedding and positions, xavier-uniform
        linears with zero biases (RMSNorm weights stay 1). Skipped on the meta device."""
        if self.class_emb.weight.is_meta:
            return
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.encoder_pos_embed_learned, std=0.02)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)

        def init_linear(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(init_linear)

    # -- latent layout
    def clusterify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] latent -> [B, L, C] tokens, cell by cell."""
        b, c = latents.shape[:2]
        g, p = self.cluster_h, self.cell_side
        x = latents.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # b, cell row, cell col, row, col, c
        return x.reshape(b, self.seq_len, c)

    def unclusterify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, C] tokens (cell by cell) -> [B, C, H, W] latent."""
        b, _, c = tokens.shape
        g, p = self.cluster_h, self.cell_side
        x = tokens.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.encoder_blocks) + len(self.decoder_blocks))

    # -- the network
    def _block(self, blk: Block, h, c, mask, start, cache: KVCache | None, layer: int, keep: int):
        if cache is None:
            if self.checkpointing and torch.is_grad_enabled():
                return checkpoint(blk, h, c, mask, start, use_reentrant=False)
            return blk(h, c, mask, start)
        return blk(h, c, mask, start, cache.slots[layer], keep)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, *, start_cell: int = 0,
                cache: KVCache | None = None, keep_cells: int = 0) -> torch.Tensor:
        """Velocity of every input token.

        x [B, n*cell_len, C]: the tokens of cells start_cell .. start_cell+n-1 (cell-major);
        labels [B] (class_num = no class); t [B, n] flow time per cell in [0, 1] (the network
        sees the integer timestep int(float32(t) * 1000), as official). Cells before start_cell
        are read from `cache` (required when start_cell > 0); keep_cells > 0 appends the keys
        and values of the first keep_cells input cells to it."""
        b, n_tok, _ = x.shape
        cells, length = t.shape[1], self.cell_len
        if n_tok != cells * length:
            raise ValueError(f"xAR: {n_tok} tokens for {cells} cells of {length}")
        start = start_cell * length
        if (cache.length if cache is not None else 0) != start:
            raise ValueError(f"xAR: start_cell {start_cell} needs a cache of its {start} preceding tokens")
        steps = (t.float() * 1000).long()
        c = self.class_emb(labels)[:, None, :] + self.time_embed(steps)  # [B, cells, D]
        mask = self.mask[:, :, start:start + n_tok, :start + n_tok] if cells > 1 else None
        keep = keep_cells * length

        h = self.z_proj(x.to(self.z_proj.weight.dtype)) + self.encoder_pos_embed_learned[:, start:start + n_tok]
        h = self.z_proj_ln(h)
        for i, blk in enumerate(self.encoder_blocks):
            h = self._block(blk, h, c, mask, start, cache, i, keep)
        h = self.encoder_norm(h)
        h = self.decoder_embed(h) + self.decoder_pos_embed_learned[:, start:start + n_tok]
        for i, blk in enumerate(self.decoder_blocks):
            h = self._block(blk, h, c, mask, start, cache, len(self.encoder_blocks) + i, keep)
        if cache is not None and keep:
            cache.length = start + keep
        return self.pred(self.decoder_norm(h))


# ----------------------------------------------------------------------------- training loss

def flow_loss_at(model: XAR, latents: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
    """The official flow loss for given per-cell times t [B, cells] (float32) and noise
    [B, L, C] (tokens, cell-major): x_t = (1 - t) x + t noise, target noise - x, mean squared
    error over everything. `labels` are used as given (no label dropout here)."""
    acc = torch.promote_types(latents.dtype, torch.float32)  # float32 as official (float64 stays)
    x = model.clusterify(latents.to(acc))
    tt = t.float().to(acc).repeat_interleave(model.cell_len, dim=1)[..., None]  # [B, L, 1]
    noise = noise.to(acc)
    xt = (1 - tt) * x + tt * noise
    out = model(xt, labels, t)
    return ((out.to(acc) - (noise - x)) ** 2).mean()


def flow_loss(model: XAR, latents: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """xAR's training loss on latents [B, 16, h, w] in the sampler's scale (VAE latents x 0.2325).

    Draws from `gen`, in this order: label dropout (B uniforms: a label becomes the null class
    `class_num` with probability label_drop_prob, as the official forward does), the cells'
    times t = sigmoid(N(0, 1)) (logit-normal, [B, cells] normals in float64, t cast to float32),
    then the noise [B, L, C] in token layout. Dropout layers (attn/proj_dropout, active in train
    mode) use torch's global RNG, as in the official code."""
    check_labels(labels, model.num_classes, allow_null=True, where="xAR flow loss")
    expect = (model.vae_embed_dim, model.seq_h, model.seq_w)
    if latents.dim() != 4 or tuple(latents.shape[1:]) != expect:
        raise NeonError(f"xAR flow loss: latents of shape {tuple(latents.shape)}, expected [B, {expect[0]}, "
                        f"{expect[1]}, {expect[2]}]")
    b, dev = latents.shape[0], latents.device
    drop = rng.rand(gen, (b,)) < model.label_drop_prob
    z = rng.randn(gen, (b, model.clusters), dtype=torch.float64)
    t = torch.sigmoid(z).float()
    noise = rng.randn(gen, (b, model.seq_len, model.vae_embed_dim))
    labels = torch.where(drop.to(dev), model.num_classes, labels.to(dev))
    return flow_loss_at(model, latents, labels, t.to(dev), noise.to(dev))
