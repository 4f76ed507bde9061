"""Lazy reader of DeepSpeed ZeRO 1/2/3 checkpoints: fp32 master weights, one tensor at a time.

Layout of `CKPT/` (as written by `engine.save_checkpoint(CKPT)`, data-parallel ranks r < W):

    CKPT/latest                                   the tag, e.g. "global_step2"
    CKPT/<tag>/[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt    one per rank
    CKPT/<tag>/mp_rank_00_model_states.pt                            ZeRO 1/2 (one file)
    CKPT/<tag>/zero_pp_rank_{r}_mp_rank_00_model_states.pt           ZeRO 3 (one per rank)

Model states: `param_shapes` (one ordered {name: shape} per optimizer group: the parameters the
fp32 partitions hold, in storage order), `buffer_names` (buffer values are in `module`),
`frozen_param_shapes`/`frozen_param_fragments` (parameters the optimizer does not own, saved by
ZeRO 2/3 only) and `shared_params` ({tied name: stored name}).

Optimizer states, `optimizer_state_dict`: `zero_stage`, `partition_count` = W and the flat fp32
partitions, one 1-D tensor per group:
- ZeRO 1/2, `single_partition_of_fp32_groups`: group g is the concatenation over ranks of rank
  r's slice (the tail padding of the last rank removed). Inside the group, parameters follow
  each other, each followed by its `param_alignment_paddings` entry (0 when absent).
- ZeRO 3, `fp32_flat_groups`: every parameter is split on its own into W slices of
  ceil(numel / W) elements (the last one padded); rank r's groups, read one after the other, hold
  its slice of every parameter in `param_shapes` order.

Adam's states (`optimizer_state(key, "exp_avg")`, ...) are the base optimizer's state of each
flat group (ZeRO 1/2 `base_optimizer_state`, ZeRO 3 `optimizer_state_dict`, torch's format: state
index i is flat group i, since DeepSpeed builds its flat groups param group after param group),
laid out like the fp32 partitions (ZeRO 1/2: the last rank's keeps its tail padding); with
`adam_step()`, `param_groups()` and `training_state()` (the engine's counters and lr scheduler)
they let a run resume on another number of ranks (neon_scale.train.reshard).

Every file is opened with torch.load(mmap=True, weights_only=True): only this metadata is
unpickled, tensor data stays on disk, and `get(key)` copies just that key's slices (one per rank)
into a new tensor; EMA partitions (safetensors) are read a slice at a time too. The result equals
deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint bit for bit, dtypes
included (floating buffers are returned as float32, frozen parameters with their stored dtype;
ZeRO 1 does not save frozen parameters: `module_tensor` takes them from the saved module).
One exception, for checkpoints of our trainer: DeepSpeed saves frozen parameters and buffers cast to
the module's bf16/fp16 (there is no fp32 master of them), so the trainer also writes them as built
(`untrained.safetensors`, rank 0), and `get` returns that fp32 value wherever the stored one is it
cast (nothing changed it): DiT's pos_embed and xAR's RoPE tables are not rounded to bf16 by a merge.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import pathlib
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..ckpt_files import LATEST, ema_file, read_latest, trainer_file, untrained_file
from ..errors import NeonError
from ..io import torch_load
from .sources import TensorMeta, TensorSource, read_header

OPTIM_RE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


def deepspeed_classes() -> tuple:
    """The non-tensor objects DeepSpeed pickles into its optimizer-state files; weights_only=True
    refuses any class it does not know, so exactly these are allow-listed (none defines
    __reduce__ or __setstate__: unpickling only calls the enum with its value or fills __dict__):
    - ZeroStageEnum: the int enum stored as `zero_stage`;
    - LossScaler (fp32/bf16) and DynamicLossScaler (fp16): `loss_scaler`, a bag of numbers;
    - fragment_address: dataclass(numel, start) in the ZeRO 1/2 `param_slice_mappings`.
    The model-states files need nothing beyond what weights_only allows by default."""
    # deepspeed takes seconds to import (and JIT-builds ops): only when its files are read
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)


def _load(path: pathlib.Path, what: str) -> dict:
    obj = torch_load(path, what, allow=deepspeed_classes(), mmap=True)
    if not isinstance(obj, dict):
        raise NeonError(f"{path}: not a DeepSpeed {what} (a {type(obj).__name__})")
    return obj


def _optim_files(d: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in d.glob("*_optim_states.pt") if OPTIM_RE.fullmatch(p.name))


def _tag_dir(path: pathlib.Path, tag: str | None) -> pathlib.Path:
    if tag is None:
        tag = read_latest(path)
        if tag is None:
            if _optim_files(path):  # handed the tag directory itself
                return path
            raise NeonError(f"{path / LATEST}: file not found (a DeepSpeed checkpoint directory names its tag there; "
                            f"or pass --tag)")
    d = path / tag
    if not d.is_dir():
        raise NeonError(f"{d}: checkpoint tag directory not found")
    return d


def is_zero_checkpoint(path: pathlib.Path, tag: str | None) -> bool:
    """Looks like a DeepSpeed checkpoint: a tag asked for, a `latest` file, or partition files."""
    return tag is not None or (path / LATEST).is_file() or bool(_optim_files(path))


class _SafetensorsFlat:
    """A 1-D tensor of an open safetensors file, read a slice at a time with positioned reads (never
    whole, and no mmap: the pages of a mapped file stay resident once read)."""

    def __init__(self, handle, offset: int, meta: TensorMeta):
        self._file, self._offset, self._dtype = handle, offset, meta.dtype
        self._numel = math.prod(meta.shape)

    def numel(self) -> int:
        return self._numel

    def slice(self, lo: int, hi: int) -> torch.Tensor:
        out = torch.empty(max(hi - lo, 0), dtype=self._dtype)
        if out.numel():
            self._file.seek(self._offset + lo * out.element_size())
            if self._file.readinto(memoryview(out.view(torch.uint8).numpy())) != out.numel() * out.element_size():
                raise NeonError(f"{self._file.name}: truncated EMA partition")
        return out


def as_built(built: torch.Tensor | None, live: torch.Tensor) -> torch.Tensor:
    """A frozen parameter or buffer that DeepSpeed holds (or saved) cast to the module's bf16/fp16:
    the fp32 value it was built with when `live` is exactly that value cast (nothing changed it),
    else `live` itself, in fp32 when floating. The trainer's export and this reader both use it."""
    if built is not None and built.shape == live.shape and torch.equal(built.to(live.dtype), live):
        return built
    return live.float() if live.is_floating_point() else live


def _checkpoint_mappings(d: pathlib.Path) -> list[tuple[int, int]]:
    """Address ranges this process maps from files in checkpoint folder `d` (/proc/self/maps)."""
    prefix = str(d.resolve()) + "/"
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n").startswith(prefix):
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return out


def _drop_pages(pieces: list, d: pathlib.Path) -> None:
    """Unmap the pages of mmapped checkpoint data already copied out (madvise MADV_DONTNEED; they are
    clean file pages, read again from the page cache if touched again): otherwise every page read
    stays resident, and reading a whole checkpoint brings the process to the checkpoint's size (2.8
    GiB for DiT-XL/2's partitions; the bound is 2 x the largest tensor). Only pages inside a mapping
    of a file of `d`, checked now, are touched: never anonymous memory, which MADV_DONTNEED zeroes."""
    views = [t for t in pieces if isinstance(t, torch.Tensor) and t.numel()]
    if not views or not hasattr(os, "sysconf"):
        return
    maps = _checkpoint_mappings(d)
    if not maps:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    libc = ctypes.CDLL(None, use_errno=True)
    for t in views:
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        a, b = start - start % page, -(-end // page) * page
        if any(lo <= a and b <= hi for lo, hi in maps):
            libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4)  # 4: MADV_DONTNEED


def _pieces(parts: list, lo: int, hi: int) -> list[torch.Tensor]:
    """Elements [lo, hi) of the concatenation of the 1-D tensors `parts` (views, or slices read
    from a _SafetensorsFlat)."""
    out, start = [], 0
    for t in parts:
        end = start + t.numel()
        if start < hi and end > lo:
            a, b = max(lo - start, 0), min(hi, end) - start
            out.append(t.slice(a, b) if isinstance(t, _SafetensorsFlat) else t.detach()[a:b])
        start = end
    return out


@dataclass(frozen=True)
class _Slot:
    """Where a trainable parameter lives: ZeRO 1/2 group index and offset in the whole group;
    ZeRO 3 offset in each rank's concatenated groups (group is -1)."""
    group: int
    offset: int
    numel: int
    shape: tuple[int, ...]


class ZeroCheckpointSource(TensorSource):
    def __init__(self, path: pathlib.Path, tag: str | None = None, ema: bool = False):
        d = _tag_dir(pathlib.Path(path), tag)
        self.name, self._dir = str(d), d
        # find the files, read the layout from rank 0, check the ranks against it
        prefix, matches = self._find_partitions(d)
        first = d / f"{prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt"
        sd0 = self._read_layout(first)
        self._check_ranks(d, matches)
        self._load_partitions(d, prefix, sd0)
        self._masters = self._flat
        self._ema: list[list[_SafetensorsFlat]] | None = None
        self._ema_handles: list = []
        self._states: dict[str, list[list[torch.Tensor]]] = {}  # optimizer state key -> [rank][group]
        if ema:
            self._flat = self._ema_flat()
        model_files = self._load_model_states(d)
        self._map_keys(model_files, sd0.get("param_alignment_paddings"), first)
        self._strip_prefix(d)
        self._untrained = self._read_untrained(d)

    def _read_untrained(self, d: pathlib.Path) -> dict[str, torch.Tensor]:
        """Our trainer's copy of the frozen parameters and floating buffers as built (fp32), where
        DeepSpeed's files hold them cast to bf16/fp16; {} for a checkpoint without it."""
        path = untrained_file(d)
        if not path.is_file():
            return {}
        with safe_open(str(path), framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
        return {k: v for k, v in out.items() if k in self._entries and self._entries[k][0] in ("frozen", "buffer")}

    def _as_built(self, key: str, stored: torch.Tensor) -> torch.Tensor:
        return as_built(self._untrained[key], stored).clone()

    @staticmethod
    def _find_partitions(d: pathlib.Path) -> tuple[str, list[re.Match]]:
        """The optimizer partition files of tag dir `d`: their name prefix ("bf16_" or "") and matches."""
        matches = [m for p in _optim_files(d) if (m := OPTIM_RE.fullmatch(p.name))]
        if not matches:
            raise NeonError(f"{d}: no ZeRO optimizer partition files (*zero_pp_rank_*_optim_states.pt)")
        if {m[3] for m in matches} != {"00"} or len({m[1] for m in matches}) > 1:
            raise NeonError(f"{d}: unsupported layout (model-parallel or mixed bf16/non-bf16 partition files)")
        return matches[0][1] or "", matches

    def _read_layout(self, first: pathlib.Path) -> dict:
        """Rank 0's optimizer_state_dict; sets the ZeRO stage and the world size it was saved with."""
        sd0 = _load(first, "ZeRO optimizer partition of rank 0").get("optimizer_state_dict")
        if not isinstance(sd0, dict) or "zero_stage" not in sd0 or "partition_count" not in sd0:
            raise NeonError(f"{first}: unsupported layout (no optimizer_state_dict with zero_stage/partition_count)")
        self.stage = int(sd0["zero_stage"])
        counts = sd0["partition_count"]
        counts = set(counts) if isinstance(counts, (list, tuple)) else {counts}
        if self.stage not in (1, 2, 3) or len(counts) != 1:
            raise NeonError(f"{first}: unsupported layout (zero_stage {self.stage}, partition counts {sorted(counts)})")
        self.world = int(counts.pop())
        return sd0

    def _check_ranks(self, d: pathlib.Path, matches: list[re.Match]) -> None:
        top = max(matches, key=lambda m: int(m[2]))
        if int(top[2]) >= self.world:
            raise NeonError(f"{d / top[0]}: rank beyond partition_count {self.world} (stale file from another run?)")

    def _load_partitions(self, d: pathlib.Path, prefix: str, sd0: dict) -> None:
        """Every rank's optimizer_state_dict and flat fp32 groups (tensors mmapped)."""
        flat_key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        self._flat: list[list[torch.Tensor]] = []  # [rank][group] -> 1-D mmapped fp32 tensor
        self._optim_paths = [d / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(self.world)]
        self._optim: list[dict] = []  # [rank] -> optimizer_state_dict (tensors mmapped)
        for r, f in enumerate(self._optim_paths):
            osd = sd0 if r == 0 else _load(f, f"ZeRO optimizer partition of rank {r}").get("optimizer_state_dict", {})
            groups = osd.get(flat_key) if isinstance(osd, dict) else None
            if not isinstance(groups, (list, tuple)) or not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in groups):
                raise NeonError(f"{f}: unsupported layout (no list of 1-D tensors under {flat_key})")
            self._flat.append(list(groups))
            self._optim.append(osd)

    def _load_model_states(self, d: pathlib.Path) -> list[pathlib.Path]:
        """The model-states files (one under ZeRO 1/2, one per rank under ZeRO 3), loaded; returns their paths."""
        if self.stage <= 2:
            model_files = [d / "mp_rank_00_model_states.pt"]
        else:
            model_files = [d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(self.world)]
        self._models = [_load(f, "DeepSpeed model states") for f in model_files]
        if not isinstance(self._models[0].get("param_shapes"), list):
            raise NeonError(f"{model_files[0]}: unsupported layout (no param_shapes: not saved by a ZeRO engine)")
        return model_files

    def _map_keys(self, model_files: list[pathlib.Path], paddings: list | None, first: pathlib.Path) -> None:
        """key -> ("flat", _Slot) | ("frozen", name) | ("buffer", name); built in zero_to_fp32's
        order, listed in the order of the model's state_dict (the saved `module`)."""
        m0 = self._models[0]
        self._entries: dict[str, tuple[str, object]] = {}
        module = m0.get("module") if isinstance(m0.get("module"), dict) else {}
        buffer_names = set(m0.get("buffer_names") or ())
        for k in module:
            if k in buffer_names:
                self._entries[k] = ("buffer", k)
        for k in m0.get("frozen_param_shapes") or {}:
            for m, f in zip(self._models, model_files):
                if k not in (m.get("frozen_param_fragments") or {}):
                    raise NeonError(f"{f}: frozen parameter '{k}' has no saved fragment")
            self._entries[k] = ("frozen", k)
        if self.stage <= 2:
            self._layout_zero12(m0["param_shapes"], paddings, first)
        else:
            self._layout_zero3(m0["param_shapes"])
        for alias, target in (m0.get("shared_params") or {}).items():
            if target in self._entries:
                self._entries[alias] = self._entries[target]
        order = [k for k in module if k in self._entries]
        self._keys = order + [k for k in self._entries if k not in set(order)]

    def _strip_prefix(self, d: pathlib.Path) -> None:
        self.prefix = prefix = self._wrapper_prefix(d)  # what the keys lost against the saved names
        if prefix:  # saved by our trainer, whose engine wraps the model: names as in model.state_dict()
            self._entries = {k.removeprefix(prefix): v for k, v in self._entries.items()}
            self._keys = [k.removeprefix(prefix) for k in self._keys]

    @staticmethod
    def _wrapper_prefix(d: pathlib.Path) -> str:
        """The name prefix our trainer's loss wrapper adds (recorded in its per-rank state file)."""
        path = trainer_file(d, 0)
        if not path.is_file():
            return ""
        try:
            return str(json.loads(path.read_text()).get("module_prefix", ""))
        except (OSError, ValueError) as e:
            raise NeonError(f"{path}: cannot read ({e})") from None

    def _like_partition(self, numel: int, master_numel: int, rank: int) -> bool:
        """A flat tensor laid out like rank `rank`'s fp32 partition: the same size, but for the tail
        padding ZeRO 1/2 strips from the last rank's saved masters only (its Adam states and our EMA
        keep it)."""
        return numel == master_numel or (self.stage <= 2 and rank == self.world - 1 and numel > master_numel)

    def _ema_flat(self) -> list[list[_SafetensorsFlat]]:
        """Every rank's EMA partitions (neon_scale.train.ema), laid out like its fp32 masters; the
        files stay open and are read a slice at a time."""
        if self._ema is None:
            ema = []
            for r, masters in enumerate(self._masters):
                path = ema_file(self._dir, r)
                if not path.is_file():
                    raise NeonError(f"{path}: no EMA partition in this checkpoint (trained without train.ema_decay?)")
                header = read_header(path)  # one line for a file that is not a whole safetensors file
                missing = [f"group{g}" for g in range(len(masters)) if f"group{g}" not in header]
                if missing:
                    raise NeonError(f"{path}: cannot read the EMA partition (no tensor '{missing[0]}')")
                handle = open(path, "rb")
                self._ema_handles.append(handle)
                groups = [_SafetensorsFlat(handle, *header[f"group{g}"]) for g in range(len(masters))]
                for g, (e, m) in enumerate(zip(groups, masters)):
                    if not self._like_partition(e.numel(), m.numel(), r):
                        raise NeonError(f"{path}: EMA group{g} holds {e.numel()} elements, the fp32 partition "
                                        f"{m.numel()} (from another run?)")
                ema.append(groups)
            self._ema = ema
        return self._ema

    def _layout_zero12(self, param_shapes: list, paddings: list | None, first: pathlib.Path) -> None:
        if any(len(groups) != len(param_shapes) for groups in self._masters):
            raise NeonError(f"{first}: unsupported layout ({len(param_shapes)} parameter groups in param_shapes, "
                            f"{len(self._masters[0])} fp32 partitions)")
        align = 2 * self.world  # DeepSpeed pads every group to a multiple of 2 * world size
        for g, shapes in enumerate(param_shapes):
            pads = paddings[g] if paddings is not None else [0] * len(shapes)
            if len(pads) != len(shapes):
                raise NeonError(f"{first}: unsupported layout (group {g}: {len(pads)} alignment paddings for {len(shapes)} parameters)")
            offset = 0
            for (name, shape), pad in zip(shapes.items(), pads):
                numel = math.prod(shape)
                self._entries[name] = ("flat", _Slot(g, offset, numel, tuple(shape)))
                offset += numel + pad
            avail = sum(groups[g].numel() for groups in self._masters)
            if math.ceil(offset / align) != math.ceil(avail / align):
                raise NeonError(f"{first}: unsupported layout (group {g}: parameters need {offset} elements, "
                                f"the partitions hold {avail})")

    def _layout_zero3(self, param_shapes: list) -> None:
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                numel = math.prod(shape)
                self._entries[name] = ("flat", _Slot(-1, offset, numel, tuple(shape)))
                offset += math.ceil(numel / self.world)
        for r, groups in enumerate(self._masters):
            have = sum(t.numel() for t in groups)
            if have != offset:
                raise NeonError(f"{self._optim_paths[r]}: unsupported layout or truncated "
                                f"(holds {have} elements, the parameters need {offset})")

    def keys(self) -> list[str]:
        return list(self._keys)

    def meta(self, key: str) -> TensorMeta:
        kind, what = self._entries[key]
        if kind == "flat":
            return TensorMeta(what.shape, self._masters[0][0].dtype)  # the EMA is fp32 too
        if key in self._untrained:
            return TensorMeta(tuple(self._untrained[key].shape), torch.float32)
        if kind == "frozen":
            shape = self._models[0]["frozen_param_shapes"][what]
            return TensorMeta(tuple(shape), self._models[0]["frozen_param_fragments"][what].dtype)
        t = self._models[0]["module"][what]
        return TensorMeta(tuple(t.shape), torch.float32 if t.is_floating_point() else t.dtype)

    def get(self, key: str) -> torch.Tensor:
        kind, what = self._entries[key]
        with torch.no_grad():
            if kind == "buffer":
                t = self._models[0]["module"][what]
                if key in self._untrained:
                    return self._as_built(key, t)
                return t.to(torch.float32 if t.is_floating_point() else t.dtype, copy=True)
            if kind == "frozen":
                t = self._frozen_stored(key, what)
                return self._as_built(key, t) if key in self._untrained else t
            return self._slot(self._flat, what, key)

    def _frozen_stored(self, key: str, what) -> torch.Tensor:
        return self._join([m["frozen_param_fragments"][what].reshape(-1) for m in self._models], key)

    def _slot(self, flat: list[list], what: _Slot, key: str) -> torch.Tensor:
        """The full tensor at `what` in the per-rank flat groups `flat` (masters, EMA or a state)."""
        if self.stage <= 2:
            parts = [groups[what.group] for groups in flat]
            return self._join(_pieces(parts, what.offset, what.offset + what.numel), key)
        per_rank = math.ceil(what.numel / self.world)
        pieces = [p for groups in flat for p in _pieces(groups, what.offset, what.offset + per_rank)]
        return self._join(pieces, key)

    def _trained(self, key: str) -> _Slot:
        kind, what = self._entries.get(key, (None, None))
        if kind != "flat":
            raise NeonError(f"{self.name}: '{key}' is not a trained parameter of this checkpoint")
        return what

    def kind(self, key: str) -> str:
        """What `key` is: "trainable" (fp32 master and optimizer state), "frozen" or "buffer"."""
        return {"flat": "trainable"}.get(self._entries[key][0], self._entries[key][0])

    def get_master(self, key: str) -> torch.Tensor:
        """The fp32 master weight (what `get` returns when not opened with ema=True)."""
        return self._slot(self._masters, self._trained(key), key)

    def get_ema(self, key: str) -> torch.Tensor:
        """The full fp32 EMA of a trained parameter (the trainer's per-rank EMA partitions)."""
        return self._slot(self._ema_flat(), self._trained(key), key)

    def _base_state(self, rank: int) -> dict:
        """Rank `rank`'s base optimizer state dict (torch's format)."""
        osd, path = self._optim[rank], self._optim_paths[rank]
        base = osd.get("optimizer_state_dict" if self.stage == 3 else "base_optimizer_state")
        if not (isinstance(base, dict) and isinstance(base.get("state"), dict) and isinstance(base.get("param_groups"), list)):
            raise NeonError(f"{path}: unsupported layout (no torch optimizer state dict; saved with "
                            f"zero_optimization.elastic_checkpoint?)")
        return base

    def optimizer_state_keys(self) -> list[str]:
        """The optimizer's per-element states (Adam: exp_avg, exp_avg_sq); empty when saved before
        the first step."""
        state = self._base_state(0)["state"]
        first = state.get(0, {})
        return [k for k, v in first.items() if isinstance(v, torch.Tensor) and v.dim() == 1]

    def _state_flat(self, which: str) -> list[list[torch.Tensor]]:
        if which not in self._states:
            per_rank = []
            for r, masters in enumerate(self._masters):
                state, path = self._base_state(r)["state"], self._optim_paths[r]
                groups = []
                for g, m in enumerate(masters):
                    t = state.get(g, {}).get(which)
                    ok = isinstance(t, torch.Tensor) and t.dim() == 1 and self._like_partition(t.numel(), m.numel(), r)
                    if not ok:
                        raise NeonError(f"{path}: optimizer state '{which}' of group {g} missing or not laid out "
                                        f"like its fp32 partition ({m.numel()} elements)")
                    groups.append(t)
                per_rank.append(groups)
            self._states[which] = per_rank
        return self._states[which]

    def optimizer_state(self, key: str, which: str) -> torch.Tensor:
        """The full fp32 optimizer state `which` (e.g. "exp_avg") of a trained parameter."""
        return self._slot(self._state_flat(which), self._trained(key), key)

    def adam_step(self) -> torch.Tensor | None:
        """The optimizer's step count (as saved: a scalar tensor), the same for every group of every
        rank; None when saved before the first step."""
        steps = {}
        for r in range(self.world):
            for i, s in self._base_state(r)["state"].items():
                if "step" in s:
                    steps.setdefault(float(s["step"]), (r, i, s["step"]))
        if len(steps) > 1:
            raise NeonError(f"{self.name}: optimizer groups at different step counts {sorted(steps)}; "
                            f"cannot re-partition")
        return torch.as_tensor(next(iter(steps.values()))[2]).clone() if steps else None

    def param_groups(self) -> list[dict]:
        """The optimizer's hyperparameters (lr, betas, ...) per param group, as saved."""
        return [{k: v for k, v in g.items() if k != "params"} for g in self._base_state(0)["param_groups"]]

    def training_state(self) -> dict:
        """What the engine keeps besides tensors: global_steps, global_samples, skipped_steps,
        lr_scheduler (a state dict or None), and the loss scaler (loss_scaler, dynamic_loss_scale,
        overflow; fp16 only changes them)."""
        m0, sd0 = self._models[0], self._optim[0]
        missing = [k for k in ("global_steps", "skipped_steps") if not isinstance(m0.get(k), int)]
        if missing:
            raise NeonError(f"{self.name}: the model states lack {missing} (not saved by engine.save_checkpoint?)")
        out = {k: m0.get(k) for k in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")}
        out.update({k: sd0[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow") if k in sd0})
        return out

    def module_tensor(self, key: str) -> torch.Tensor:
        """A frozen parameter or buffer as the engine saved it (its own dtype, not cast); under
        ZeRO 1 frozen parameters come from the saved module, which holds them whole."""
        kind, what = self._entries.get(key, (None, None))
        if kind == "frozen":
            with torch.no_grad():
                return self._frozen_stored(key, what)
        name = self.prefix + key
        module = self._models[0].get("module") or {}
        t = module.get(name) if isinstance(module, dict) else None
        if not isinstance(t, torch.Tensor) or (self.stage == 3 and kind != "buffer"):
            raise NeonError(f"{self.name}: '{key}' is not saved in this checkpoint "
                            f"(frozen parameter or buffer expected)")
        return t.detach().clone()

    def _join(self, pieces: list[torch.Tensor], key: str) -> torch.Tensor:
        """The first numel elements of the concatenated pieces (dropping partition padding), as a
        new tensor of the key's shape."""
        meta = self.meta(key)
        numel = math.prod(meta.shape)
        have = sum(p.numel() for p in pieces)
        if have < numel:
            raise NeonError(f"{self.name}: '{key}' needs {numel} elements, the partitions hold {have}")
        if numel == 0:
            return torch.empty(meta.shape, dtype=meta.dtype)
        out = torch.cat(_pieces(pieces, 0, numel)).view(meta.shape)
        _drop_pages(pieces, self._dir)
        return out

    def close(self) -> None:
        # drop the mmapped tensors and the open EMA files
        for handle in self._ema_handles:
            handle.close()
        self._flat, self._masters, self._models, self._optim, self._states = [], [], [], [], {}
        self._ema, self._ema_handles = None, []
