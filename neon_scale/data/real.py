"""Real labelled images: the input that trains a base model from scratch and gives the metric its
reference (config section `data`).

A source is one of:
- a built-in name: `digits` (scikit-learn's 1,797 handwritten digits, 8x8 grey, 10 classes;
  shipped inside the package, nothing downloaded). Pixel values 0..16 become 0..255 (x 255/16).
- a folder with one sub-folder per class (`root/<class>/*.png|jpg`), classes numbered in sorted
  name order;
- webdataset shards (a `.tar` or a folder of `.tar`) whose records hold `.png` and `.cls`.
Image size and channels come from the data; every image must have the same ones (the first that
differs is named). The split is fixed: a `holdout` fraction of each class, chosen by `seed`.
"""
from __future__ import annotations

import functools
import pathlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import NeonError
from .shards import decode_png, read_shard

BUILTIN = ["digits"]
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


@dataclass
class RealImages:
    images: torch.Tensor   # uint8 [N, C, H, W]
    labels: torch.Tensor   # int64 [N]
    num_classes: int
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def split(self, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(train indices, held-out indices): round(holdout x count) of each class held out, chosen
        by a permutation of `seed`; both sorted, so the split does not depend on anything else."""
        gen = torch.Generator().manual_seed(seed)
        held = []
        for c in range(self.num_classes):
            members = (self.labels == c).nonzero().flatten()
            k = int(round(holdout * len(members)))
            held.append(members[torch.randperm(len(members), generator=gen)[:k]])
        held_idx = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)
        mask = torch.ones(len(self.labels), dtype=torch.bool)
        mask[held_idx] = False
        return mask.nonzero().flatten(), held_idx


def _digits() -> RealImages:
    try:
        from sklearn.datasets import load_digits  # lazy: optional, only data.source = 'digits' needs it
    except ImportError:
        raise NeonError("data.source = 'digits' needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return RealImages(torch.from_numpy(images), torch.from_numpy(d.target.astype(np.int64)), 10, "digits")


def _decode(path: pathlib.Path) -> np.ndarray:
    """uint8 [C, H, W] of an image file (the shards' PNG decoder: grey stays 1 channel, else RGB)."""
    try:
        return decode_png(path.read_bytes())
    except Exception as e:  # noqa: BLE001  (PIL's errors of every flavour are the same user error)
        raise NeonError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _stack(items: list[tuple[str, np.ndarray, int]], where: str, num_classes: int) -> RealImages:
    if not items:
        raise NeonError(f"{where}: no images found (expected class folders of .png/.jpg, or shards with .png + .cls)")
    first_name, first, _ = items[0]
    for name, arr, _ in items:
        if arr.shape != first.shape:
            raise NeonError(f"{name}: image of shape {list(arr.shape)} (channels, height, width), but {first_name} has "
                            f"{list(first.shape)}: every image of {where} must have the same size and channels")
    images = torch.from_numpy(np.stack([a for _, a, _ in items]))
    labels = torch.tensor([c for _, _, c in items], dtype=torch.int64)
    return RealImages(images, labels, num_classes, where)


def _folder(root: pathlib.Path) -> RealImages:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise NeonError(f"{root}: no class sub-folders (expected {root}/<class>/*.png)")
    items = []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                items.append((str(f), _decode(f), c))
    return _stack(items, str(root), len(classes))


def _shards(paths: list[pathlib.Path], where: str) -> RealImages:
    items = []
    for path in paths:
        columns, count, _ = read_shard(path)
        if count and ("image" not in columns or "cls" not in columns):
            raise NeonError(f"{path}: records need a .png image and a .cls label, found {sorted(columns)}")
        for i in range(count):
            items.append((f"{path} record {i}", columns["image"][i], int(columns["cls"][i])))
    result = _stack(items, where, 0)
    result.num_classes = int(result.labels.max()) + 1
    return result


@functools.lru_cache(maxsize=2)
def load_real(source: str) -> RealImages:
    """The images and labels of `source` (a built-in name, a class-folder root or shards); read
    once per process (config validation and the stages share it: do not modify the result)."""
    if source in BUILTIN:
        return _digits()
    path = pathlib.Path(source)
    if not path.exists():
        raise NeonError(f"data.source = {source!r}: not a built-in data set ({', '.join(BUILTIN)}) and no such "
                        f"file or folder")
    if path.is_file():
        if path.suffix != ".tar":
            raise NeonError(f"data.source = {source!r}: a file must be a webdataset .tar shard")
        return _shards([path], source)
    tars = sorted(p for p in path.iterdir() if p.suffix == ".tar")
    return _shards(tars, source) if tars else _folder(path)

