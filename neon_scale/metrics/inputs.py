"""Image inputs of `neon fid`: folders of PNG/JPEG, ADM sample batches (`.npz`, `arr_0`), webdataset shards.

Every source is an indexed list of images: `len(src)`, `src.name(i)` (for error messages) and
`src.load(i)` -> uint8 HWC RGB numpy array. Ranks take disjoint index sets (i % world == rank) and
DataLoader workers decode. Order is fixed (sorted paths, shard then member order), so Inception
Score splits, KID subsets and the per-rank split do not depend on the file system or world size.
"""
from __future__ import annotations

import io
import os
import pathlib
import tarfile
import zipfile

import numpy as np
import torch
from PIL import Image

from ..errors import NeonError

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def decode_image(data: bytes | str | os.PathLike) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        return np.asarray(img.convert("RGB"))


class FolderSource:
    """PNG/JPEG files directly in a folder (not recursive, as torch-fidelity), sorted by real path."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.files = sorted(os.path.realpath(p) for p in path.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise NeonError(f"{path}: no .png/.jpg/.jpeg images in this folder")

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return self.files[i]

    def load(self, i: int) -> np.ndarray:
        return decode_image(self.files[i])


def _npz_member_memmap(path: pathlib.Path, key: str) -> np.ndarray | None:
    """Memory-map an uncompressed `.npy` member of an `.npz` (np.savez stores members uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(key + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with z.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                return None
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(member)
            header_len = member.tell()
    with open(path, "rb") as f:  # the member's data starts after its local file header
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len) + header_len
    return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape, order="F" if fortran else "C")


class NpzSource:
    """ADM sample batch: `arr_0` uint8 [N, H, W, 3], memory-mapped when stored uncompressed."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        names = npz_keys(path)
        if names is not None and "arr_0" not in names:
            raise NeonError(f"{path}: no 'arr_0' images in this .npz (keys: {sorted(names)}); "
                            f"pass statistics with 'mu'/'sigma' as --ref")
        try:
            arr = _npz_member_memmap(path, "arr_0")
            if arr is None:  # compressed: read once
                with np.load(path, allow_pickle=False) as f:
                    arr = f["arr_0"]
        except Exception as e:  # noqa: BLE001
            raise NeonError(f"{path}: not a readable .npz ({type(e).__name__}: {e})")
        if arr.ndim != 4 or arr.shape[3] != 3 or arr.dtype != np.uint8:
            raise NeonError(f"{path}: 'arr_0' must be uint8 [N, H, W, 3] images, got {arr.dtype} {list(arr.shape)}")
        self.images = arr

    def __len__(self) -> int:
        return self.images.shape[0]

    def name(self, i: int) -> str:
        return f"{self.path}[arr_0][{i}]"

    def load(self, i: int) -> np.ndarray:
        return np.array(self.images[i])


class ShardSource:
    """Webdataset shards (a .tar or a folder of them): the first .png/.jpg/.jpeg field of each record."""

    def __init__(self, path: pathlib.Path):
        tars = [path] if path.is_file() else sorted(path.glob("*.tar"))
        if not tars:
            raise NeonError(f"{path}: no .tar shards in this folder")
        self.items: list[tuple[pathlib.Path, str, int, int]] = []  # (shard, member, offset, size)
        for tar in tars:
            seen: set[str] = set()
            try:
                with tarfile.open(tar, "r:") as tf:
                    for m in tf:
                        key, _, ext = m.name.partition(".")
                        if m.isfile() and "." + ext.lower() in IMAGE_EXTS and key not in seen:
                            seen.add(key)
                            self.items.append((tar, m.name, m.offset_data, m.size))
            except (tarfile.TarError, OSError) as e:
                raise NeonError(f"{tar}: unreadable shard ({type(e).__name__}: {e})")
        if not self.items:
            raise NeonError(f"{path}: no image fields (.png/.jpg/.jpeg) in the shards")

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        tar, member, _, _ = self.items[i]
        return f"{tar}:{member}"

    def load(self, i: int) -> np.ndarray:
        tar, _, offset, size = self.items[i]
        with open(tar, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError("shard truncated")
        return decode_image(data)


def npz_keys(path: pathlib.Path | str) -> set[str] | None:
    """The array names in an .npz (None: not a readable zip). ADM reference batches hold both
    images (`arr_0`) and statistics (`mu`, `sigma`)."""
    try:
        with zipfile.ZipFile(path) as z:
            return {n.removesuffix(".npy") for n in z.namelist()}
    except (zipfile.BadZipFile, OSError):
        return None


def open_source(path: str | os.PathLike):
    p = pathlib.Path(path)
    if not p.exists():
        raise NeonError(f"{p}: input not found")
    if p.is_dir():
        has_tars = any(p.glob("*.tar"))
        return ShardSource(p) if has_tars else FolderSource(p)
    if p.suffix == ".npz":
        return NpzSource(p)
    if p.suffix == ".tar":
        return ShardSource(p)
    raise NeonError(f"{p}: unsupported input (a folder of images, an .npz with 'arr_0', or webdataset .tar shards)")


class RankShare:
    """The Dataset of one rank: its indices of a source; items are (index, image or None, error)."""

    def __init__(self, source, indices: range):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        try:
            return i, self.source.load(i), ""
        except Exception as e:  # noqa: BLE001 (any undecodable image: reported by name in the main process)
            return i, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def collate(items):
    """Group decoded images by size -> ([(indices, uint8 NHWC tensor)], [(index, error)])."""
    groups: dict[tuple, list] = {}
    bad = []
    for i, img, err in items:
        if img is None:
            bad.append((i, err))
        else:
            groups.setdefault(img.shape, []).append((i, img))
    out = [(torch.tensor([i for i, _ in g]), torch.from_numpy(np.stack([im for _, im in g]))) for g in groups.values()]
    return out, bad
