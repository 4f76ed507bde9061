"""`neon export`: our weights <-> the files the official DiT and xAR scripts read.

Our networks keep the official module and parameter names (models/dit.py, models/xar.py), so no
key is renamed either way: an export is the official key set in the official order, in the
official container, written with torch.save of plain tensors only (the official scripts and
`torch.load(weights_only=True)` read it without unpickling any class).

- OUT.pt / OUT.pth, `container="plain"`: a bare state dict: what DiT's sample.py / sample_ddp.py
  (`--ckpt`), xAR's eval.py (`--resume FILE`, loaded as a whole and strictly) and the Neon
  authors' xAR/calculate_fid.py (`--model_ckpt`) read.
- `container="train"`: the official training checkpoint's weight entries, the same tensors under
  both ({"model", "ema"} for DiT, as its train.py saves; {"model", "model_ema"} for xAR, as its
  main_mar.py saves `checkpoint-last.pth`), no optimizer, step or args. DiT's find_model takes
  "ema"; xAR's main_mar.py `--resume DIR` reads DIR/checkpoint-last.pth ("model" and the EMA from
  "model_ema"; without an optimizer it starts at epoch 0).
- OUT.safetensors (the import direction): an official file (bare, or a training checkpoint: the
  EMA unless `key` says otherwise, as io.pick_state_dict picks) -> our safetensors, as `neon base`
  stores theta_r. Keys the network does not have are left out with a warning (an error with
  --strict), as for every official file read (io.check_keys).

The source is read by merge.open's reader for a path (a .safetensors file, a directory of shards
with an index or holding one `model.safetensors`, a .pt/.pth file, a
DeepSpeed checkpoint directory). Before anything is written its keys and shapes must be exactly
those of the model the shapes describe (sizes inferred from the tensors, the network built on the
meta device): the first missing or unexpected key (import: a warning), or the first wrong shape, is
one line.
"""
from __future__ import annotations

import os
import pathlib
import re

import torch

from .. import io
from ..console import console
from ..errors import NeonError
from ..lock import hold_output
from ..models.dit import DIT_SIZES, DiT
from ..models.xar import XAR, XAR_SIZES
from .open import open_source
from .sources import CAST_DTYPES, TensorMeta

KINDS = ("dit", "xar")
NAMES = {"dit": "DiT", "xar": "xAR"}
CONTAINERS = ("plain", "train")
OFFICIAL_SUFFIXES = (".pt", ".pth")
TRAIN_KEYS = {"dit": ("model", "ema"), "xar": ("model", "model_ema")}  # the official training checkpoints' entries

# What the official xAR code fixes whatever its arguments (models/xar.py, models/rope.py):
# nn.Embedding(1000 + 1, D), pred = Linear(D, 16), RoPE tables for a 16 x 16 token grid.
XAR_OFFICIAL_CLASS_ROWS = 1001
XAR_OFFICIAL_TOKENS = 256
XAR_OFFICIAL_LATENT = 16
XAR_NAMES = {"B": "xar_base", "L": "xar_large", "H": "xar_huge"}
DIT_LATENT_CHANNELS = 4  # sample.py builds DiT_models[name](input_size, num_classes): 4 in, learn_sigma


# ----------------------------------------------------------------------------- the layout check

def _need(metas: dict[str, TensorMeta], key: str, ndim: int, where: str, kind: str) -> tuple[int, ...]:
    if key not in metas:
        raise NeonError(f"{where}: missing key '{key}' (not a {kind} state dict?)")
    shape = metas[key].shape
    if len(shape) != ndim:
        raise NeonError(f"{where}: key '{key}' has shape {shape}, a {kind} has {ndim} dimensions there")
    return shape


def _count(metas: dict[str, TensorMeta], prefix: str) -> int:
    """Blocks under `prefix` (`blocks.` -> 1 + the largest index)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m[1]) for k in metas if (m := pat.match(k))]
    return max(found) + 1 if found else 0


def _dit_args(metas: dict[str, TensorMeta], where: str) -> dict:
    """The DiT constructor arguments the tensors' shapes imply (num_heads changes no shape: 1)."""
    _, tokens, hidden = _need(metas, "pos_embed", 3, where, "DiT")
    _, in_ch, patch, _ = _need(metas, "x_embedder.proj.weight", 4, where, "DiT")
    rows, _ = _need(metas, "y_embedder.embedding_table.weight", 2, where, "DiT")
    out, _ = _need(metas, "final_layer.linear.weight", 2, where, "DiT")
    grid = int(round(tokens ** 0.5))
    out_ch = out // (patch * patch) if patch else 0
    if grid * grid != tokens or out_ch * patch * patch != out or out_ch not in (in_ch, 2 * in_ch):
        raise NeonError(f"{where}: pos_embed {metas['pos_embed'].shape}, x_embedder.proj.weight "
                        f"{metas['x_embedder.proj.weight'].shape} and final_layer.linear.weight "
                        f"{metas['final_layer.linear.weight'].shape} describe no DiT")
    # rows = classes + the null row (class_dropout_prob > 0, the official default): either reading
    # gives the same shapes
    return {"input_size": grid * patch, "patch_size": patch, "in_channels": in_ch, "hidden_size": hidden,
            "depth": _count(metas, "blocks."), "num_heads": 1, "num_classes": max(rows - 1, 1),
            "class_dropout_prob": 0.1 if rows > 1 else 0.0, "learn_sigma": out_ch == 2 * in_ch}


def _xar_args(metas: dict[str, TensorMeta], where: str) -> dict:
    """The xAR constructor arguments the tensors' shapes imply (heads from the RoPE tables)."""
    _, tokens, dim = _need(metas, "encoder_pos_embed_learned", 3, where, "xAR")
    _, latent = _need(metas, "z_proj.weight", 2, where, "xAR")
    rows, _ = _need(metas, "class_emb.weight", 2, where, "xAR")
    depth = _count(metas, "encoder_blocks.")
    head_dim = dim
    if depth:
        head_dim = _need(metas, "encoder_blocks.0.attn.rope.freqs_cos", 2, where, "xAR")[1]
    side = int(round(tokens ** 0.5))
    if side * side != tokens or not head_dim or dim % head_dim:
        raise NeonError(f"{where}: encoder_pos_embed_learned {metas['encoder_pos_embed_learned'].shape} and the "
                        f"RoPE tables (head dim {head_dim}) describe no xAR")
    return {"img_size": side * 16, "vae_stride": 16, "patch_size": 1, "encoder_embed_dim": dim,
            "encoder_depth": depth, "encoder_num_heads": dim // head_dim, "decoder_embed_dim": dim,
            "decoder_depth": _count(metas, "decoder_blocks."), "decoder_num_heads": dim // head_dim,
            "mlp_ratio": 4, "vae_embed_dim": latent, "class_num": max(rows - 1, 1), "clusters": 4}


def expected_layout(kind: str, metas: dict[str, TensorMeta], where: str) -> tuple[list[tuple[str, tuple]], dict]:
    """[(key, shape)] in the official state-dict order for the network the shapes describe, and
    its constructor arguments. Built on the meta device: no memory, no initialisation."""
    args = _dit_args(metas, where) if kind == "dit" else _xar_args(metas, where)
    try:
        with torch.device("meta"):
            model = DiT(**args) if kind == "dit" else XAR(**args)
    except ValueError as e:
        raise NeonError(f"{where}: not a {kind} the official code builds ({e})") from None
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()], args


def check_layout(kind: str, metas: dict[str, TensorMeta], where: str, released: bool = False) -> tuple[list[str], dict]:
    """The keys in the official order when `metas` is exactly a `kind` state dict; otherwise one
    line naming the first missing key, the first unexpected key, or the first wrong shape. With
    `released` (an official file being imported) unexpected keys are a warning and left out, unless
    --strict (io.check_keys)."""
    if kind not in KINDS:
        raise NeonError(f"{where}: unknown model kind {kind!r} (one of {', '.join(KINDS)})")
    layout, args = expected_layout(kind, metas, where)
    expected = dict(layout)
    for key, _ in layout:
        if key not in metas:
            raise NeonError(f"{where}: missing key '{key}' for a {kind} state dict")
    if released:
        io.check_keys(list(expected), list(metas), f"{where} ({kind} state dict)", official=True)
    for key in metas:
        if key not in expected and not released:
            raise NeonError(f"{where}: unexpected key '{key}' in a {kind} state dict")
    for key, shape in layout:
        if tuple(metas[key].shape) != shape:
            raise NeonError(f"{where}: key '{key}' has shape {tuple(metas[key].shape)}, the {kind} its other "
                            f"tensors describe has {shape}")
    return [k for k, _ in layout], args


def _official_xar_check(args: dict, where: str) -> None:
    """What the official xAR code cannot build, whatever its arguments: one line."""
    tokens = (args["img_size"] // 16) ** 2
    if tokens != XAR_OFFICIAL_TOKENS:
        raise NeonError(f"{where}: {tokens} tokens (img_size {args['img_size']}); the official xAR builds its RoPE "
                        f"tables for {XAR_OFFICIAL_TOKENS} (img_size 256) only: no official layout to export to")
    if args["class_num"] + 1 != XAR_OFFICIAL_CLASS_ROWS:
        raise NeonError(f"{where}: class_emb has {args['class_num'] + 1} rows; the official xAR always builds "
                        f"{XAR_OFFICIAL_CLASS_ROWS} (1000 classes + the null class): no official layout to export to")
    if args["vae_embed_dim"] != XAR_OFFICIAL_LATENT:
        raise NeonError(f"{where}: {args['vae_embed_dim']} latent channels; the official xAR's pred layer has "
                        f"{XAR_OFFICIAL_LATENT}: no official layout to export to")


def official_usage(kind: str, args: dict) -> tuple[str, str | None]:
    """(how the official scripts build this network, a warning when their command lines cannot)."""
    if kind == "dit":
        size = next((s for s, (d, h, _) in DIT_SIZES.items() if (d, h) == (args["depth"], args["hidden_size"])), None)
        image = args["input_size"] * 8
        name = f"DiT-{size}/{args['patch_size']}" if size else None
        flags = f"--model {name} --image-size {image} --num-classes {args['num_classes']}"
        if name and image in (256, 512) and args["in_channels"] == DIT_LATENT_CHANNELS and args["learn_sigma"] \
                and args["class_dropout_prob"] > 0:
            return f"official DiT: sample.py / sample_ddp.py {flags} --ckpt OUT", None
        kw = ", ".join(f"{k}={v}" for k, v in args.items() if k != "num_heads")
        return (f"official DiT: models.DiT({kw}, num_heads=<yours>)",
                "sample.py / sample_ddp.py build DiT-{S,B,L,XL}/{2,4,8} at 256 or 512 px with 4 latent channels and "
                "learned sigma only; this network loads into the DiT constructor call shown")
    dim, depth, heads = args["encoder_embed_dim"], args["encoder_depth"], args["encoder_num_heads"]
    size = next((s for s, v in XAR_SIZES.items() if v == (dim, depth, heads)), None)
    if size and args["decoder_depth"] == depth:
        return f"official xAR: eval.py --model {XAR_NAMES[size]} --resume OUT (or calculate_fid.py --model_ckpt OUT)", None
    return (f"official xAR: models.xar.xAR(encoder_embed_dim={dim}, encoder_depth={depth}, encoder_num_heads={heads}, "
            f"decoder_embed_dim={dim}, decoder_depth={args['decoder_depth']}, decoder_num_heads={heads})",
            "eval.py builds xar_base / xar_large / xar_huge only; this network loads into the xAR constructor call shown")


# ----------------------------------------------------------------------------- reading and writing

def _plain(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor on its own storage (torch.save writes whole storages: no view of a larger one)."""
    t = t.detach().to("cpu", dtype).contiguous()
    if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _read_checked(src: pathlib.Path, kind: str, *, key: str | None, tag: str | None, dtype: str | None,
                  official: bool, released: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    if dtype is not None and dtype not in CAST_DTYPES:
        raise NeonError(f"--dtype {dtype!r}: one of {', '.join(CAST_DTYPES)}")
    with open_source(src, tag=tag, key=key) as source:
        metas = {k: source.meta(k) for k in source.keys()}
        keys, args = check_layout(kind, metas, str(src), released)
        if official and kind == "xar":
            _official_xar_check(args, str(src))
        state = {k: _plain(source.get(k), metas[k].cast(dtype).dtype) for k in keys}
    return state, args


def _prepare_out(out: pathlib.Path, overwrite: bool) -> None:
    io.remove_stale(out.parent, recursive=False, of=out.name)  # a killed earlier export's temporary file
    if out.is_dir():
        raise NeonError(f"{out}: is a directory; give a file name ending in .pt, .pth or .safetensors")
    if out.exists() and not overwrite:
        raise NeonError(f"{out}: already exists (use --overwrite to replace it)")


def export_official(src: str | os.PathLike, out: str | os.PathLike, model_kind: str, *, container: str = "plain",
                    dtype: str | None = None, key: str | None = None, tag: str | None = None,
                    overwrite: bool = False) -> dict:
    """Our weights at `src` -> the official `model_kind` file `out` (.pt/.pth): a bare state dict
    (`container="plain"`) or the training checkpoint's weight entries (`"train"`). Float tensors
    keep their dtype unless `dtype` (fp32/bf16/fp16). Returns the constructor arguments the
    shapes describe. Nothing is written unless every key and shape is the official one."""
    src, out = pathlib.Path(src), pathlib.Path(out)
    if out.suffix not in OFFICIAL_SUFFIXES:
        raise NeonError(f"{out}: the official files end in .pt (DiT) or .pth (xAR)")
    if container not in CONTAINERS:
        raise NeonError(f"--container {container!r}: one of {', '.join(CONTAINERS)}")
    with hold_output(out):
        _prepare_out(out, overwrite)
        state, args = _read_checked(src, model_kind, key=key, tag=tag, dtype=dtype, official=True)
        obj = state if container == "plain" else {name: state for name in TRAIN_KEYS[model_kind]}
        with io.atomic_path(out) as tmp:
            torch.save(obj, tmp)
    return args


def import_official(src: str | os.PathLike, out: str | os.PathLike, model_kind: str, *, dtype: str | None = None,
                    key: str | None = None, tag: str | None = None, overwrite: bool = False) -> dict:
    """An official `model_kind` file (or any weights the reader opens) -> our safetensors `out`,
    keys in the official order, metadata {"model": kind} as `neon base` writes theta_r."""
    src, out = pathlib.Path(src), pathlib.Path(out)
    if out.suffix != ".safetensors":
        raise NeonError(f"{out}: our weights are .safetensors files")
    with hold_output(out):
        _prepare_out(out, overwrite)
        state, args = _read_checked(src, model_kind, key=key, tag=tag, dtype=dtype, official=False, released=True)
        io.save_state_dict(out, state, {"model": model_kind})
    return args


def export(src: str | os.PathLike, out: str | os.PathLike, model_kind: str, *, container: str = "plain",
           dtype: str | None = None, key: str | None = None, tag: str | None = None, overwrite: bool = False) -> None:
    """`neon export`: OUT's suffix picks the direction (.pt/.pth official, .safetensors ours);
    prints what was written and how the official scripts build the network."""
    path = pathlib.Path(out)
    if path.suffix not in (*OFFICIAL_SUFFIXES, ".safetensors"):
        raise NeonError(f"{out}: OUT ends in .pt / .pth (the official layout) or .safetensors (ours, the import)")
    if path.suffix == ".safetensors":
        if container != "plain":
            raise NeonError(f"{out}: --container applies to official .pt/.pth outputs only")
        import_official(src, out, model_kind, dtype=dtype, key=key, tag=tag, overwrite=overwrite)
        console.print(f"{src} -> {out} (our safetensors, {NAMES[model_kind]})")
        return
    args = export_official(src, out, model_kind, container=container, dtype=dtype, key=key, tag=tag,
                           overwrite=overwrite)
    entries = "a bare state dict" if container == "plain" else " + ".join(f'"{k}"' for k in TRAIN_KEYS[model_kind])
    console.print(f"{src} -> {out} (official {NAMES[model_kind]} layout, {entries})")
    usage, warning = official_usage(model_kind, args)
    console.print(usage)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
