"""Resume a DeepSpeed ZeRO 1/2/3 checkpoint written by another number of ranks.

DeepSpeed's `engine.load_checkpoint` refuses a checkpoint whose data-parallel world differs from
the engine's (the partitions would not line up). Here every rank reads, one tensor at a time, the
FULL fp32 master weight, Adam states and EMA of each parameter from all the saved partitions
(neon_scale.merge.zero, no pickle runs) and writes into its own new partitions only the part it
owns, through DeepSpeed's public tensor-fragment API (deepspeed.utils):
- ZeRO 1/2: `safe_set_full_fp32_param` / `safe_set_full_optimizer_state` take the full tensor and
  copy the fragment this rank's flat partition holds;
- ZeRO 3: `safe_set_local_fp32_param` / `safe_set_local_optimizer_state` take this rank's slice
  (ceil(numel / world) elements, zero padded at the end). The `safe_set_full_*` pair is not used:
  in DeepSpeed 0.19.8 it narrows the full tensor to [rank * n, (rank + 1) * n), past its end on
  the last rank whenever numel is not a multiple of the world size.
The low-precision module weights are then the fp32 master cast to their dtype (what DeepSpeed's
own load and every optimizer step do), so bf16 weights and masters agree bit for bit.

Not covered: ZeRO 0 (its bf16 optimizer partitions differently and the reader knows stage 1-3
only), NVMe optimizer offload, and optimizers other than torch's Adam/AdamW family (any 1-D
per-element state is copied, but only Adam(W) is tested). The fp16 loss scaler is restored as
DeepSpeed restores it (the saved object), untested here.
"""
from __future__ import annotations

import contextlib
import pathlib

import torch
import torch.distributed as tdist

from ..errors import NeonError, first_line
from ..merge.zero import ZeroCheckpointSource

# deepspeed.utils is imported in the methods that call it: importing DeepSpeed builds its op table
# (seconds), and a run that only samples or sweeps never needs it.


def _flat_masters(opt) -> list[torch.Tensor]:
    """The fp32 partitions the base optimizer steps (its state is keyed by these very tensors)."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO 3, ZeRO 1/2
        groups = getattr(opt, attr, None)
        if groups:
            return list(groups)
    raise NeonError(f"{type(opt).__name__}: no flat fp32 partitions (resharding needs a ZeRO 1-3 optimizer)")


class _Zero12:
    """ZeRO 1/2: every rank holds the whole module; fp32 masters and states are flat partitions."""

    def __init__(self, engine):
        self.opt = engine.optimizer

    @contextlib.contextmanager
    def writing(self):
        yield

    def link_states(self) -> None:
        # the fragments' views of the (new) Adam state tensors; DeepSpeed makes them lazily at
        # its first step, after which safe_set_full_optimizer_state can address them
        self.opt._hp_optimizer_states_linked = False
        self.opt._lazy_init_hp_params_optimizer_state()

    def set_master(self, p, full: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, full)

    def set_state(self, p, full: torch.Tensor, which: str) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(p, full, which)

    def set_module(self, p, full: torch.Tensor) -> None:
        p.data.copy_(full.view(p.shape))  # casts to the module dtype as DeepSpeed's fp32 -> bf16 copy does


class _Zero3:
    """ZeRO 3: parameters, fp32 masters and states are all partitioned per parameter."""

    def __init__(self, engine):
        self.opt = engine.optimizer

    @contextlib.contextmanager
    def writing(self):
        # as engine.load_checkpoint: release every gathered parameter first, so that only the
        # partitions (ds_tensor) hold values; afterwards the persistent (never released)
        # parameters are gathered again from the partitions just written
        self.opt.checkpoint_event_prologue()
        yield
        self.opt.checkpoint_event_epilogue()

    def link_states(self) -> None:
        pass  # ZeRO 3 looks the states up by sub-group at each call

    @staticmethod
    def _local(p, full: torch.Tensor) -> torch.Tensor:
        n = p.ds_tensor.numel()
        rank = tdist.get_rank(group=getattr(p, "ds_process_group", None))
        flat = full.reshape(-1)
        part = torch.zeros(n, dtype=full.dtype)
        lo, hi = min(rank * n, flat.numel()), min((rank + 1) * n, flat.numel())
        part[:hi - lo] = flat[lo:hi]
        return part

    def set_master(self, p, full: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_local_fp32_param

        safe_set_local_fp32_param(p, self._local(p, full))

    def set_state(self, p, full: torch.Tensor, which: str) -> None:
        from deepspeed.utils import safe_set_local_optimizer_state

        safe_set_local_optimizer_state(p, self._local(p, full), which)

    def set_module(self, p, full: torch.Tensor) -> None:
        p.ds_tensor.data.copy_(self._local(p, full))  # the partition; gathered on use (or by the epilogue)


def _new_adam_state(opt, step: torch.Tensor, keys: list[str]) -> None:
    """Give every flat fp32 partition an optimizer state (values written after), as torch's Adam
    would create it at its first step: `step` a scalar on the CPU, or on the partition's device
    for fused/capturable Adam."""
    base = opt.optimizer
    on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
    for flat in _flat_masters(opt):
        state = base.state[flat]
        state["step"] = step.to(flat.device if on_device else "cpu").clone()
        for k in keys:
            state[k] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def _names(engine, src: ZeroCheckpointSource, where: pathlib.Path):
    """(name in the checkpoint, parameter) for the trained and the frozen parameters, and (name,
    buffer) for the saved buffers; one line for what the two sides do not share."""
    module = engine.module
    params = dict(module.named_parameters())
    saved_buffers = set(module.state_dict()) - set(params)  # persistent buffers only
    buffers = [(n, b) for n, b in module.named_buffers() if n in saved_buffers]
    key = {n: n.removeprefix(src.prefix) for n in [*params, *dict(buffers)]}
    trained = [(key[n], p) for n, p in params.items() if p.requires_grad]
    frozen = [(key[n], p) for n, p in params.items() if not p.requires_grad]
    in_ckpt = {k for k in src.keys() if src.kind(k) == "trainable"}
    ours = {k for k, _ in trained}
    if ours != in_ckpt:
        extra, missing = sorted(in_ckpt - ours), sorted(ours - in_ckpt)
        raise NeonError(f"{where}: trained parameters differ from this model's (only in the checkpoint: {extra[:3]}, "
                        f"only in the model: {missing[:3]}); another model or set of frozen parameters?")
    for k, p in trained:
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if src.meta(k).shape != shape:
            raise NeonError(f"{where}: '{k}' has shape {src.meta(k).shape} in the checkpoint, {shape} in the model")
    return trained, frozen, [(key[n], b) for n, b in buffers]


def _check_shape(where, k: str, value: torch.Tensor, shape) -> torch.Tensor:
    if tuple(value.shape) != tuple(shape):
        raise NeonError(f"{where}: '{k}' has shape {tuple(value.shape)} in the checkpoint, {tuple(shape)} in the model")
    return value


@torch.no_grad()
def load_resharded(engine, tag_dir: pathlib.Path, ema, saved_world: int) -> None:
    """Load the checkpoint in `tag_dir`, written by `saved_world` ranks, into `engine` on the current
    world (collective; every rank calls it). Call it after deepspeed.initialize, instead of
    engine.load_checkpoint. Restores the fp32 masters and the module weights made from them, frozen
    parameters and buffers, the optimizer's states, step count and hyperparameters (lr included),
    the lr scheduler, the engine's global_steps / global_samples / skipped_steps, the loss scaler,
    and `ema` (a PartitionEMA, or None) re-partitioned for this rank."""
    tag_dir = pathlib.Path(tag_dir)
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2, 3):
        raise NeonError(f"{tag_dir}: resuming on another number of ranks needs ZeRO stage 1, 2 or 3 "
                        f"(this run: {stage})")
    try:
        _load(engine, tag_dir, ema, saved_world, stage)
    except NeonError:
        raise
    except Exception as e:  # noqa: BLE001  (DeepSpeed's assertions and the like: one line, as resume does)
        detail = first_line(e)
        raise NeonError(f"{tag_dir}: could not re-partition this checkpoint ({type(e).__name__}: {detail})") from None


def _load(engine, tag_dir: pathlib.Path, ema, saved_world: int, stage: int) -> None:
    with ZeroCheckpointSource(tag_dir) as src:
        if src.world != saved_world:
            raise NeonError(f"{tag_dir}: partitions of {src.world} rank(s), but the trainer state says {saved_world}")
        trained, frozen, buffers = _names(engine, src, tag_dir)
        opt = engine.optimizer
        groups, saved_groups, state = opt.optimizer.param_groups, src.param_groups(), src.training_state()
        if len(groups) != len(saved_groups):
            raise NeonError(f"{tag_dir}: {len(saved_groups)} optimizer param groups saved, this run has {len(groups)}")
        if engine.lr_scheduler is not None and state["lr_scheduler"] is None:
            raise NeonError(f"{tag_dir}: saved without an lr scheduler, this run has one")
        side = _Zero3(engine) if stage == 3 else _Zero12(engine)
        step, keys = src.adam_step(), src.optimizer_state_keys()
        if step is not None:
            _new_adam_state(opt, step, keys)
            side.link_states()
        with side.writing():
            if ema is not None:
                # The EMA is laid out like this rank's master partitions: write the full EMA as the
                # masters, copy the partitions into the shadow, then write the real masters below.
                for k, p in trained:
                    side.set_master(p, src.get_ema(k))
                for shadow, master in zip(ema.shadow, ema.masters):
                    shadow.copy_(master)
            for k, p in trained:  # one parameter at a time: never the whole model in memory
                master = src.get_master(k)
                side.set_master(p, master)
                side.set_module(p, master)
                if step is not None:
                    for which in keys:
                        side.set_state(p, src.optimizer_state(k, which), which)
            for k, p in frozen:
                shape = getattr(p, "ds_shape", p.shape)
                side.set_module(p, _check_shape(tag_dir, k, src.module_tensor(k), shape))
        for k, b in buffers:
            b.copy_(_check_shape(tag_dir, k, src.module_tensor(k), b.shape))

        for group, hyper in zip(groups, saved_groups):  # lr, betas, ... as torch's optimizer load_state_dict does
            group.update(hyper)
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        engine.global_steps = state["global_steps"]
        engine.global_samples = state["global_samples"] if state["global_samples"] is not None else \
            state["global_steps"] * engine.train_batch_size()
        engine.skipped_steps = state["skipped_steps"]
        for k in ("loss_scaler", "dynamic_loss_scale", "overflow"):  # as DeepSpeed's _load_global_state
            if k in state:
                setattr(opt, k, state[k])
