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

Every file is opened with torch.load(mmap=True, weights_only=True): only this metadata is
unpickled, tensor data stays on disk, and `get(key)` copies just that key's slices (one per rank)
into a new tensor. The result equals deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_
checkpoint bit for bit, dtypes included (floating buffers are returned as float32, frozen
parameters with their stored dtype; ZeRO 1 does not save frozen parameters).
"""
from __future__ import annotations

import math
import pathlib
import re
from dataclasses import dataclass

import torch

from ..errors import NeonError
from ..io import torch_load
from .tensors import TensorMeta, TensorSource

OPTIM_RE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


def deepspeed_classes() -> tuple:
    """The non-tensor objects DeepSpeed pickles into its optimizer-state files; weights_only=True
    refuses any class it does not know, so exactly these are allow-listed (none defines
    __reduce__ or __setstate__: unpickling only calls the enum with its value or fills __dict__):
    - ZeroStageEnum: the int enum stored as `zero_stage`;
    - LossScaler (fp32/bf16) and DynamicLossScaler (fp16): `loss_scaler`, a bag of numbers;
    - fragment_address: dataclass(numel, start) in the ZeRO 1/2 `param_slice_mappings`.
    The model-states files need nothing beyond what weights_only allows by default."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)


def _load(path: pathlib.Path, what: str) -> dict:
    if not path.is_file():
        raise NeonError(f"{path}: {what} not found")
    obj = torch_load(path, what, allow=deepspeed_classes(), mmap=True)
    if not isinstance(obj, dict):
        raise NeonError(f"{path}: not a DeepSpeed {what} (a {type(obj).__name__})")
    return obj


def _optim_files(d: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in d.glob("*_optim_states.pt") if OPTIM_RE.fullmatch(p.name))


def _tag_dir(path: pathlib.Path, tag: str | None) -> pathlib.Path:
    if tag is None:
        latest = path / "latest"
        if not latest.is_file():
            if _optim_files(path):  # handed the tag directory itself
                return path
            raise NeonError(f"{latest}: file not found (a DeepSpeed checkpoint directory names its tag there; or pass --tag)")
        try:
            tag = latest.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise NeonError(f"{latest}: cannot read ({e})") from None
        if not tag:
            raise NeonError(f"{latest}: empty, expected a checkpoint tag")
    d = path / tag
    if not d.is_dir():
        raise NeonError(f"{d}: checkpoint tag directory not found")
    return d


def is_zero_checkpoint(path: pathlib.Path, tag: str | None) -> bool:
    """Looks like a DeepSpeed checkpoint: a tag asked for, a `latest` file, or partition files."""
    return tag is not None or (path / "latest").is_file() or bool(_optim_files(path))


def _pieces(parts: list[torch.Tensor], lo: int, hi: int) -> list[torch.Tensor]:
    """Views of elements [lo, hi) of the concatenation of the 1-D tensors `parts`."""
    out, start = [], 0
    for t in parts:
        end = start + t.numel()
        if start < hi and end > lo:
            out.append(t.detach()[max(lo - start, 0):min(hi, end) - start])
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
        self.name = str(d)
        matches = [m for p in _optim_files(d) if (m := OPTIM_RE.fullmatch(p.name))]
        if not matches:
            raise NeonError(f"{d}: no ZeRO optimizer partition files (*zero_pp_rank_*_optim_states.pt)")
        if {m[3] for m in matches} != {"00"} or len({m[1] for m in matches}) > 1:
            raise NeonError(f"{d}: unsupported layout (model-parallel or mixed bf16/non-bf16 partition files)")
        prefix = matches[0][1] or ""
        first = d / f"{prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt"
        sd0 = _load(first, "ZeRO optimizer partition of rank 0").get("optimizer_state_dict")
        if not isinstance(sd0, dict) or "zero_stage" not in sd0 or "partition_count" not in sd0:
            raise NeonError(f"{first}: unsupported layout (no optimizer_state_dict with zero_stage/partition_count)")
        self.stage = int(sd0["zero_stage"])
        counts = sd0["partition_count"]
        counts = set(counts) if isinstance(counts, (list, tuple)) else {counts}
        if self.stage not in (1, 2, 3) or len(counts) != 1:
            raise NeonError(f"{first}: unsupported layout (zero_stage {self.stage}, partition counts {sorted(counts)})")
        self.world = world = int(counts.pop())
        top = max(matches, key=lambda m: int(m[2]))
        if int(top[2]) >= world:
            raise NeonError(f"{d / top[0]}: rank beyond partition_count {world} (stale file from another run?)")
        flat_key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        self._flat: list[list[torch.Tensor]] = []  # [rank][group] -> 1-D mmapped fp32 tensor
        self._optim_paths = [d / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
        for r, f in enumerate(self._optim_paths):
            osd = sd0 if r == 0 else _load(f, f"ZeRO optimizer partition of rank {r}").get("optimizer_state_dict", {})
            groups = osd.get(flat_key) if isinstance(osd, dict) else None
            if not isinstance(groups, (list, tuple)) or not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in groups):
                raise NeonError(f"{f}: unsupported layout (no list of 1-D tensors under {flat_key})")
            self._flat.append(list(groups))
        if ema:
            self._flat = [self._ema_groups(d, r, len(groups)) for r, groups in enumerate(self._flat)]
        if self.stage <= 2:
            model_files = [d / "mp_rank_00_model_states.pt"]
        else:
            model_files = [d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
        self._models = [_load(f, "DeepSpeed model states") for f in model_files]
        m0 = self._models[0]
        if not isinstance(m0.get("param_shapes"), list):
            raise NeonError(f"{model_files[0]}: unsupported layout (no param_shapes: not saved by a ZeRO engine)")

        # key -> ("flat", _Slot) | ("frozen", name) | ("buffer", name); built in zero_to_fp32's
        # order, listed in the order of the model's state_dict (the saved `module`)
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
            self._layout_zero12(m0["param_shapes"], sd0.get("param_alignment_paddings"), first)
        else:
            self._layout_zero3(m0["param_shapes"])
        for alias, target in (m0.get("shared_params") or {}).items():
            if target in self._entries:
                self._entries[alias] = self._entries[target]
        order = [k for k in module if k in self._entries]
        self._keys = order + [k for k in self._entries if k not in set(order)]
        prefix = self._wrapper_prefix(d)
        if prefix:  # saved by our trainer, whose engine wraps the model: names as in model.state_dict()
            self._entries = {k.removeprefix(prefix): v for k, v in self._entries.items()}
            self._keys = [k.removeprefix(prefix) for k in self._keys]

    @staticmethod
    def _wrapper_prefix(d: pathlib.Path) -> str:
        """The name prefix our trainer's loss wrapper adds (recorded in its per-rank state file)."""
        import json

        from ..train.checkpoint import trainer_file

        path = trainer_file(d, 0)
        if not path.is_file():
            return ""
        try:
            return str(json.loads(path.read_text()).get("module_prefix", ""))
        except (OSError, ValueError) as e:
            raise NeonError(f"{path}: cannot read ({e})") from None

    @staticmethod
    def _ema_groups(d: pathlib.Path, rank: int, n_groups: int) -> list[torch.Tensor]:
        """Rank `rank`'s EMA partitions (neon_scale.train.ema), laid out like its fp32 masters."""
        from safetensors import safe_open

        from ..train.ema import ema_file

        path = ema_file(d, rank)
        if not path.is_file():
            raise NeonError(f"{path}: no EMA partition in this checkpoint (trained without train.ema_decay?)")
        try:
            with safe_open(str(path), framework="pt") as f:
                groups = [f.get_tensor(f"group{g}") for g in range(n_groups)]
        except Exception as e:
            raise NeonError(f"{path}: cannot read the EMA partition ({type(e).__name__}: {e})") from None
        return groups

    def _layout_zero12(self, param_shapes: list, paddings: list | None, first: pathlib.Path) -> None:
        if any(len(groups) != len(param_shapes) for groups in self._flat):
            raise NeonError(f"{first}: unsupported layout ({len(param_shapes)} parameter groups in param_shapes, "
                            f"{len(self._flat[0])} fp32 partitions)")
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
            avail = sum(groups[g].numel() for groups in self._flat)
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
        for r, groups in enumerate(self._flat):
            have = sum(t.numel() for t in groups)
            if have != offset:
                raise NeonError(f"{self._optim_paths[r]}: unsupported layout or truncated "
                                f"(holds {have} elements, the parameters need {offset})")

    def keys(self) -> list[str]:
        return list(self._keys)

    def meta(self, key: str) -> TensorMeta:
        kind, what = self._entries[key]
        if kind == "flat":
            return TensorMeta(what.shape, self._flat[0][0].dtype)
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
                return t.to(torch.float32 if t.is_floating_point() else t.dtype, copy=True)
            if kind == "frozen":
                return self._join([m["frozen_param_fragments"][what].reshape(-1) for m in self._models], key)
            if self.stage <= 2:
                parts = [groups[what.group] for groups in self._flat]
                return self._join(_pieces(parts, what.offset, what.offset + what.numel), key)
            per_rank = math.ceil(what.numel / self.world)
            pieces = [p for groups in self._flat for p in _pieces(groups, what.offset, what.offset + per_rank)]
            return self._join(pieces, key)

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
        return torch.cat(_pieces(pieces, 0, numel)).view(meta.shape)

    def close(self) -> None:
        self._flat, self._models = [], []  # drop the mmapped tensors
