"""Started by tests/test_reshard.py (torchrun, 1 or 2 ranks): writes and resumes ZeRO checkpoints
across world sizes. Each job is ACTION:STAGE:DTYPE:FROM (FROM = the world that saves the case):

- save (run on FROM ranks): train STEPS steps (WarmupLR, EMA), checkpoint.save to OUT/<case>/ckpt,
  dump the full state as `saved`, take one more step on the fixed full batch, dump `after`;
- load (run on another world): build the engine from another seed, `load_resharded` the
  checkpoint, dump `loaded`, take the same step, dump `after-resharded`;
- errors (another world): the one-line errors for a wrong saved world and for another model,
  written to errors.json.

A dump (rank 0 writes it) is OUT/<case>/<name>.safetensors, the full tensors gathered with
DeepSpeed's safe_get_full_* (master/, exp_avg/, exp_avg_sq/, ema/, module/ = the module's own
low-precision weights, buffer/), and <name>.json (lr, engine counters, scheduler, Adam steps of
every rank, hyperparameters).

usage: torchrun --nproc_per_node N tests/reshard_worker.py OUT JOB [JOB ...]
"""
import json
import os
import pathlib
import sys

import torch

STEPS, BATCH, DECAY = 3, 8, 0.8


def case_name(stage: int, dtype: str, world: int) -> str:
    return f"z{stage}-{dtype}-from{world}"


def _sub_groups() -> str:
    """A DeepSpeed JSON with ZeRO-3 sub-groups of 16 elements: every rank then holds several flat fp32
    groups (as a large model does with the default sub_group_size), which the reader, the EMA and
    the resharding must walk in order."""
    from neon_scale.io import write_json

    path = pathlib.Path(sys.argv[1]) / f"zero3-sub-groups-rank{os.environ.get('RANK', '0')}.json"
    write_json(path, {"zero_optimization": {"sub_group_size": 16}})
    return str(path)


def build(stage: int, dtype: str, seed: int, hidden: int = 7):
    from neon_scale import dist
    from neon_scale.config import TrainConfig
    from neon_scale.specs.registry import get_spec
    from neon_scale.train.ema import PartitionEMA
    from neon_scale.train.deepspeed_engine import initialize

    spec = get_spec("toy2d_ar")  # a loss without sampling: the same full batch gives the same step on any world
    torch.manual_seed(seed)
    model = spec.build(spec.parse_args({"hidden": hidden}))  # odd sizes: ZeRO pads the last rank's partitions
    model.cond[0].bias.requires_grad_(False)  # a frozen parameter (as DiT's pos_embed)
    model.register_buffer("calib", torch.randn(5))  # and a buffer
    cfg = TrainConfig(global_batch=BATCH, lr=1e-2, weight_decay=0.01, warmup_steps=10, zero_stage=stage, dtype=dtype,
                      deepspeed_json=_sub_groups() if stage == 3 else None)
    engine = initialize(spec, model, cfg, dist.world())
    return engine, PartitionEMA(engine, DECAY)


def step(engine, ema, full: torch.Tensor) -> None:
    """One optimizer step, this rank taking its share of the full batch."""
    from neon_scale import dist

    n = full.shape[0] // dist.world()
    loss = engine({"x": full[dist.rank() * n:(dist.rank() + 1) * n]}, torch.Generator())
    engine.backward(loss)
    engine.step()
    ema.update()


def dump(engine, ema, out: pathlib.Path, name: str) -> None:
    import deepspeed
    import torch.distributed as tdist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from neon_scale import dist
    from neon_scale.io import save_state_dict

    model = engine.module
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tensors = {}
    for n, p in trained:
        tensors[f"master/{n}"] = safe_get_full_fp32_param(p).cpu().clone()
        for k in ("exp_avg", "exp_avg_sq"):
            tensors[f"{k}/{n}"] = safe_get_full_optimizer_state(p, k).cpu().clone()
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=engine.zero_optimization_stage() == 3):
        for n, p in model.named_parameters():
            tensors[f"module/{n}"] = p.detach().cpu().clone()
    for n, b in model.named_buffers():
        tensors[f"buffer/{n}"] = b.detach().cpu().clone()
    with ema.swapped_in():
        for n, p in trained:
            tensors[f"ema/{n}"] = safe_get_full_fp32_param(p).cpu().clone()
    from neon_scale.train.ema import master_partitions

    local = sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values()})
    steps = [None] * dist.world()
    tdist.all_gather_object(steps, local)
    hyper = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
             for g in engine.optimizer.optimizer.param_groups]
    info = {"lr": engine.get_lr(), "global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps, "scheduler": engine.lr_scheduler.state_dict(),
            "adam_steps": steps, "param_groups": hyper, "world": dist.world(),
            "flat_groups": len(master_partitions(engine))}
    if dist.is_main():
        save_state_dict(out / f"{name}.safetensors", tensors)
        (out / f"{name}.json").write_text(json.dumps(info, indent=1))


def main() -> None:
    from neon_scale import dist
    from neon_scale.io import read_json
    from neon_scale import ckpt_files
    from neon_scale.train import train_state as checkpoint
    from neon_scale.train.reshard import load_resharded

    root = pathlib.Path(sys.argv[1])
    dist.init()
    full = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(7))  # the step both sides take
    for job in sys.argv[2:]:
        action, stage, dtype, world = job.split(":")
        stage, world = int(stage), int(world)
        out = root / case_name(stage, dtype, world)
        out.mkdir(parents=True, exist_ok=True)
        if action == "save":
            assert dist.world() == world, job
            engine, ema = build(stage, dtype, seed=0)
            for i in range(STEPS):
                gen = torch.Generator().manual_seed(100 * i + dist.rank())
                loss = engine({"x": torch.randn(BATCH // dist.world(), 2, generator=gen)}, gen)
                engine.backward(loss)
                engine.step()
                ema.update()
            checkpoint.save(engine, out / "ckpt", STEPS, {}, ema)
            dump(engine, ema, out, "saved")
            step(engine, ema, full)
            dump(engine, ema, out, "after")
        elif action == "errors":
            from neon_scale.errors import NeonError

            tag_dir = out / "ckpt" / checkpoint.latest_tag(out / "ckpt")
            errors = {}
            for what, hidden, saved_world in (("world", 7, 5), ("model", 9, world)):
                engine, ema = build(stage, dtype, seed=1, hidden=hidden)
                try:
                    load_resharded(engine, tag_dir, ema, saved_world)
                except NeonError as e:
                    errors[what] = str(e)
            if dist.is_main():
                (out / "errors.json").write_text(json.dumps(errors))
        else:
            assert action == "load" and dist.world() != world, job
            engine, ema = build(stage, dtype, seed=1)  # other initial weights: all must come from the checkpoint
            tag_dir = out / "ckpt" / checkpoint.latest_tag(out / "ckpt")
            saved_world = read_json(ckpt_files.trainer_file(tag_dir, 0))["world"]
            load_resharded(engine, tag_dir, ema, saved_world)
            dump(engine, ema, out, "loaded")
            step(engine, ema, full)
            dump(engine, ema, out, "after-resharded")
    dist.finish()


if __name__ == "__main__":
    main()
