"""In-place merge of live weights: a plain module, or each rank's own ZeRO-3 partition.

`Extrapolator` keeps, for every local tensor, theta_r and Delta = theta_r - theta_s in fp32;
`set_w(w)` writes theta_r + w Delta (base kept where it is not finite) into the live tensors in
one pass, so moving along a sweep costs one pass over the local weights, not a reload. Under
ZeRO-3 the live tensors are the rank's partition of each parameter (`param.ds_tensor`) and its
fp32 master copy in the optimizer; nothing is gathered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from neon_scale.kernels.reference import has_only_finite

from .. import dist
from .extrapolate import MERGE, action_for, check_keys


@dataclass
class Slot:
    name: str
    targets: list[torch.Tensor]   # live storage written by set_w (same numel, any float dtype)
    base: torch.Tensor            # theta_r, fp32 (fp64 for fp64 tensors), flat
    delta: torch.Tensor           # theta_r - theta_s, same dtype, flat


def delta_of(base: torch.Tensor, theta_s: torch.Tensor, consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta_r, Delta) flat in the accumulation dtype. consume=True writes Delta over theta_s's own
    storage when it is already in that dtype (the caller gives theta_s up): no second model in memory."""
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.reshape(-1).to(acc)
    s = theta_s.reshape(-1)
    if consume and s.dtype == acc and s.data_ptr() != b.data_ptr():
        return b, torch.sub(b, s, out=s)  # the same operation as below, its result in s's memory
    return b, b - s.to(acc)


def apply_delta(base: torch.Tensor, delta: torch.Tensor, w: float) -> torch.Tensor:
    """The Neon formula with Delta precomputed: the same operations, in the same precision, as
    kernels.extrapolate.extrapolate_reference (b + w (b - s), base kept where not finite)."""
    out = torch.mul(delta, w).add_(base)
    if not has_only_finite(base):
        torch.where(torch.isfinite(base), out, base, out=out)
    return out


class Extrapolator:
    def __init__(self, slots: list[Slot]):
        self.slots = slots
        self.w: float | None = None

    @torch.no_grad()
    def set_w(self, w: float) -> None:
        for slot in self.slots:
            merged = apply_delta(slot.base, slot.delta, w)
            for target in slot.targets:
                target.view(-1).copy_(merged.to(target.dtype))
        self.w = w


@torch.no_grad()
def module_slots(module: torch.nn.Module, base: dict[str, torch.Tensor], theta_s: dict[str, torch.Tensor],
                 consume: bool = False) -> list[Slot]:
    """Slots over a plain module's state (every rank holds the whole model). Tensors the policy
    copies (non-float, missing from theta_s) are set to the base once, here. consume=True: theta_s
    (a dict the caller loaded for this and gives up) is overwritten with Delta, so the slots cost
    no memory beyond it (at 675M parameters, 2.6 GiB per process less)."""
    check_keys(base, theta_s)
    live = module.state_dict(keep_vars=True)
    slots = []
    for key, b in base.items():
        s = theta_s.get(key)
        action = action_for(key, b.shape, b.dtype, None if s is None else s.shape, None if s is None else s.dtype)
        target = live[key].data
        if action == MERGE:
            slots.append(Slot(key, [target], *delta_of(b, s, consume)))
        else:
            target.copy_(b)
    return slots


@torch.no_grad()
def zero3_slots(engine, module: torch.nn.Module, other: Callable[[str], torch.Tensor], engine_holds: str = "theta_s") -> list[Slot]:
    """Slots over this rank's ZeRO-3 partitions of `module`'s parameters (module = engine.module or a
    submodule of it; names relative to it). `other(name)` returns the full tensor the engine does not
    hold: theta_r when the engine holds theta_s (engine_holds="theta_s"), theta_s otherwise."""
    if engine_holds not in ("theta_s", "base"):
        raise ValueError(f"engine_holds must be 'theta_s' or 'base', got {engine_holds!r}")
    opt = engine.optimizer
    masters: dict[int, torch.Tensor] = {}
    for group, flat in zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat):
        offset = 0
        for p in group:
            n = p.ds_tensor.numel()
            masters[id(p)] = flat.narrow(0, offset, n)
            offset += n
    rank, world = dist.rank(), dist.world()
    slots = []
    for name, p in module.named_parameters():
        part = p.ds_tensor
        n = part.numel()
        full = other(name).reshape(-1)
        if full.numel() != p.ds_numel:
            raise ValueError(f"'{name}': {full.numel()} elements given, the engine holds {p.ds_numel}")
        padded = torch.zeros(n * world, dtype=torch.float32)
        padded[: full.numel()] = full.float()
        theirs = padded[rank * n:(rank + 1) * n]
        master = masters.get(id(p))
        ours = (master if master is not None else part).float()
        base, theta_s = (theirs, ours) if engine_holds == "theta_s" else (ours, theirs)
        targets = [part] + ([master] if master is not None and master.data_ptr() != part.data_ptr() else [])
        slots.append(Slot(name, targets, *delta_of(base, theta_s)))
    return slots
