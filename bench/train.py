"""Per-rank memory of ZeRO stages 1-3, measured on the live DeepSpeed engine, beside the ZeRO
paper's formula (Rajbhandari et al. 2020), and the training steps/s.

  DS_ACCELERATOR=cpu python bench/train.py [--stages 1 2 3] [--dtypes bf16 fp32] [--ranks 1 2]

For every (ranks, stage, dtype) the toy2d_diffusion MLP (default hidden 1024, depth 8: 8.4M
parameters, Psi) trains with the project's engine (neon_scale.train.deepspeed_engine.initialize, gloo on CPU)
under `torch.distributed.run`, one launch per rank count; every rank reports its own bytes.
Formula (bytes per rank, N ranks):

  bf16, the paper's mixed precision with K = 12 (fp32 master + Adam m, v):
    params 2Psi (stage 3: 2Psi/N), grads 2Psi (stage 2, 3: 2Psi/N), optimizer 12Psi/N
  fp32, adapted: no separate master copy, K = 8 (Adam m, v):
    params 4Psi (stage 3: 4Psi/N), grads 4Psi (stage 2, 3: 4Psi/N), optimizer 8Psi/N

What is counted (bytes = the union of the byte ranges the listed tensors cover, so views into a
flat buffer count once and aliases are not counted twice), on step 4, after 3 warm-up steps:
  params   after step: stage 1/2 the low-precision flat buffers and every p.data; stage 3 every
           p.ds_tensor (the partition) plus p.data where it is materialised (persistent params).
  grads    twice: "bwd", all gradients alive when autograd is done and DeepSpeed starts its
           reduction (engine.allreduce_gradients, wrapped for that one step), and "step", all alive
           when the inner AdamW steps (torch's step pre-hook): by then stage 1/2 has turned the
           reduced low-precision partition into an fp32 `.grad` of the master partition, stage 3
           keeps its partition buffer and adds that fp32 `.grad` too.
  optim    after step: fp32 master partitions plus every tensor in AdamW's state, less any bytes
           already counted as params (in fp32 training a master may alias the parameters).
  bucket   the reduce bucket(s) DeepSpeed allocates for the reduction (allocated size; the
           gradients in them are counted under grads). The paper counts them as temporary buffers.
           The default bucket (5e8 elements) holds this whole model, so stage 2/3 keep the full
           gradient until the reduction; a smaller reduce_bucket_size (--deepspeed-json) does not.
The steps/s times --steps steps (forward, backward, step) after the measured one; 2 ranks share
the same cores as 1 rank, so no speed-up is expected on a small machine. "other CPU": cores that
processes other than the ranks kept busy meanwhile (/proc/stat); well above 0, the timing is unfair.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

MB = 1e6


def formula(dtype: str, stage: int, n: int) -> tuple[float, float, float]:
    """The paper's (params, grads, optimizer) bytes per parameter on each of n ranks."""
    low, k = (2, 12) if dtype == "bf16" else (4, 8)  # bf16: K = 12 (fp32 master, m, v); fp32: K = 8 (m, v)
    return (low / n if stage == 3 else low, low / n if stage >= 2 else low, k / n)


def covered_bytes(tensors) -> int:
    """Bytes the (contiguous) tensors cover; overlaps, views and aliases counted once."""
    spans = []
    for t in tensors:
        if t is not None and t.numel() > 0:
            assert t.is_contiguous(), "a strided view would need more than a [start, end) span"
            start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
            spans.append((start, start + t.numel() * t.element_size()))
    total, end = 0, -1
    for a, b in sorted(spans):  # distinct storages never overlap in memory, so one sweep will do
        total += max(0, b - max(a, end))
        end = max(end, b)
    return total


def flat(x) -> list[torch.Tensor]:
    """Every tensor inside nested lists, tuples and dicts."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [t for item in x for t in flat(item)] if isinstance(x, (list, tuple)) else []


def param_tensors(engine, stage: int) -> list[torch.Tensor]:
    params = list(engine.module.parameters())
    if stage == 3:  # ds_tensor: this rank's partition; p.data is empty unless gathered or persistent
        return [p.ds_tensor for p in params] + [p.data for p in params]
    return flat(engine.optimizer.bit16_groups_flat) + [p.data for p in params]


def master_tensors(opt, stage: int) -> list[torch.Tensor]:
    return list(opt.fp32_partitioned_groups_flat if stage == 3 else opt.single_partition_of_fp32_groups)


def grad_tensors(engine, stage: int) -> list[torch.Tensor]:
    """Everything that holds gradients now: p.grad (full size as autograd made it; stage 2 re-points
    it into the reduce bucket as it arrives), p.grad_accum (a higher-precision accumulator, if used);
    stage 1/2: averaged_gradients (the reduced partition, a flat buffer per group) and
    grads_in_partition (stage 2's contiguous partition); stage 3: grad_partitions_flat_buffer (the
    reduced partition, which averaged_gradients views); and the fp32 `.grad` the step gives each
    master partition."""
    opt = engine.optimizer
    out = [t for p in engine.module.parameters() for t in (p.grad, getattr(p, "grad_accum", None))]
    if stage == 3:
        out += [opt.grad_partitions_flat_buffer] + flat(opt.averaged_gradients)
    else:
        out += flat(opt.averaged_gradients) + [getattr(opt, "grads_in_partition", None)]
    return [t for t in out + [m.grad for m in master_tensors(opt, stage)] if isinstance(t, torch.Tensor)]


def bucket_bytes(opt) -> int:
    buckets = getattr(opt, "ipg_buckets", {}).values()
    return sum(t.untyped_storage().nbytes() for b in buckets for t in flat(b.buffer))


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all processes, all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_case(spec, args, stage: int, dtype: str, world: int) -> dict:
    from neon_scale import dist
    from neon_scale.config import TrainConfig
    from neon_scale.train.deepspeed_engine import initialize

    torch.manual_seed(0)
    model = spec.build(spec.parse_args({"hidden": args.hidden, "depth": args.depth}))
    psi = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(global_batch=args.batch, zero_stage=stage, dtype=dtype, lr=1e-4,
                      deepspeed_json=args.deepspeed_json)
    engine = initialize(spec, model, cfg, world)
    opt = engine.optimizer
    gen = torch.Generator().manual_seed(100 + dist.rank())
    batch = {"x": torch.randn(args.batch // world, 2, generator=gen)}
    seen: dict[str, float] = {}

    def train_step():  # as neon's train stage does it (the toy casts its inputs to the weights' dtype)
        engine.backward(engine(batch, gen))
        engine.step()

    for _ in range(3):
        train_step()
    # Step 4 is measured: grads and buckets when DeepSpeed starts reducing, then at the step.
    reduce_grads = engine.allreduce_gradients

    def snapshot_then_reduce(*a, **kw):
        seen["grads_bwd"] = covered_bytes(grad_tensors(engine, stage))
        seen["bucket"] = bucket_bytes(opt)
        return reduce_grads(*a, **kw)

    def snapshot_at_step(*_):
        seen["grads_step"] = max(seen.get("grads_step", 0), covered_bytes(grad_tensors(engine, stage)))
        seen["bucket"] = max(seen["bucket"], bucket_bytes(opt))

    engine.allreduce_gradients = snapshot_then_reduce  # an instance attribute shadows the method
    hook = opt.optimizer.register_step_pre_hook(snapshot_at_step)
    train_step()
    del engine.allreduce_gradients
    hook.remove()
    params = param_tensors(engine, stage)
    state = [t for s in opt.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    seen["params"] = covered_bytes(params)
    seen["optim"] = covered_bytes(params + master_tensors(opt, stage) + state) - seen["params"]

    dist.barrier()
    start, cpu, busy = time.perf_counter(), time.process_time(), busy_seconds()
    for _ in range(args.steps):
        train_step()
    dist.barrier()
    seen.update(wall=time.perf_counter() - start, cpu=time.process_time() - cpu, busy=busy_seconds() - busy)
    seen["steps_per_s"] = args.steps / seen["wall"]
    seen.update(psi=psi, **{f"formula_{k}": f * psi for k, f in zip(("params", "grads", "optim"),
                                                                   formula(dtype, stage, world))})
    engine.destroy()
    return seen


def worker(args) -> None:
    from neon_scale import dist
    from neon_scale.specs.registry import get_spec

    dist.init()
    spec, world = get_spec("toy2d_diffusion"), dist.world()
    rows = []
    for dtype in args.dtypes:
        for stage in args.stages:
            mine = run_case(spec, args, stage, dtype, world)
            gc.collect()  # the engine of the case before, its buffers included, goes here
            every = [None] * world
            torch.distributed.all_gather_object(every, mine)
            others = (every[0]["busy"] - sum(r["cpu"] for r in every)) / every[0]["wall"]
            rows += [dict(r, stage=stage, dtype=dtype, ranks=world, rank=i, threads=torch.get_num_threads(),
                          others=others) for i, r in enumerate(every)]
    if dist.is_main():
        with open(args.worker, "w") as f:
            json.dump(rows, f)
    dist.shutdown()


def launch(args, nproc: int) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               __file__, "--worker", out.name, "--steps", str(args.steps), "--hidden", str(args.hidden),
               "--depth", str(args.depth), "--batch", str(args.batch), "--dtypes", *args.dtypes,
               "--stages", *map(str, args.stages)]
        if args.deepspeed_json:
            cmd += ["--deepspeed-json", os.path.abspath(args.deepspeed_json)]
        subprocess.run(cmd, env=env, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(out.name) as f:
            return json.load(f)


def cell(measured: float, formula: float) -> str:
    return f"{measured / MB:.1f} / {formula / MB:.1f} ({measured / formula:.2f})"


def report(rows: list[dict]) -> None:
    base = {r["dtype"]: r["steps_per_s"] for r in rows if r["stage"] == 1 and r["ranks"] == 1}
    print("\nPer rank, MB = 1e6 bytes, 'measured / formula (ratio)'; psi =", rows[0]["psi"], "parameters\n")
    print("| stage | dtype | ranks | rank | params | grads bwd | grads step | optimizer | bucket MB "
          "| steps/s | vs 1-rank ZeRO-1 | other CPU |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["dtype"], r["stage"], r["ranks"], r["rank"])):
        rel = f"{r['steps_per_s'] / base[r['dtype']]:.2f}" if r["dtype"] in base else "-"
        print(f"| {r['stage']} | {r['dtype']} | {r['ranks']} | {r['rank']} "
              f"| {cell(r['params'], r['formula_params'])} | {cell(r['grads_bwd'], r['formula_grads'])} "
              f"| {cell(r['grads_step'], r['formula_grads'])} | {cell(r['optim'], r['formula_optim'])} "
              f"| {r['bucket'] / MB:.0f} | {r['steps_per_s']:.2f} | {rel} | {max(0.0, r['others']):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to run (default 1 2)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (after 3 warm-up + 1 measured)")
    parser.add_argument("--hidden", type=int, default=1024, help="MLP width (toy2d_diffusion)")
    parser.add_argument("--depth", type=int, default=8, help="hidden layers (toy2d_diffusion)")
    parser.add_argument("--batch", type=int, default=256, help="global batch per step, split over the ranks")
    parser.add_argument("--deepspeed-json", help="extra DeepSpeed JSON merged by the project (train.deepspeed_json), "
                        "e.g. {\"zero_optimization\": {\"reduce_bucket_size\": 1000000}}")
    parser.add_argument("--worker", metavar="OUT_JSON", help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    start = time.perf_counter()
    rows = [row for n in args.ranks for row in launch(args, n)]
    report(rows)
    print("\nformula, params + grads + optimizer in bytes per psi, N ranks: bf16 (mixed precision, K = 12) "
          "stage 1: 2 + 2 + 12/N, stage 2: 2 + (2 + 12)/N, stage 3: (2 + 2 + 12)/N; fp32 (no master copy, "
          "K = 8) stage 1: 4 + 4 + 8/N, stage 2: 4 + (4 + 8)/N, stage 3: (4 + 4 + 8)/N")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"(ranks, threads per rank) {sorted({(r['ranks'], r['threads']) for r in rows})}; "
          f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
