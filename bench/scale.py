"""Every stage at the real model sizes on this CPU: wall time and peak RSS per rank, beside a bound.

DiT-XL/2 (675M parameters), xAR-L (608M) and xAR-H (1.19B) with random weights (base.random_init,
model.args.vae: random) at their real dimensions go through every stage, each the real `neon`
command in its own processes:

  base          neon base                         theta_r (random init) -> base/model.safetensors
  synth         2 ranks (torchrun)                8 images (--scale full), 4 DDPM steps / 2 flow steps
  train         2 ranks (torchrun)                3 optimizer steps, ZeRO-3, bf16, activation
                                                  checkpointing, EMA on, theta_s exported at step 3
  export        neon export --to dit|xar          the exported theta_s (the EMA) -> the official .pt/.pth
  consolidate   neon consolidate CKPT             the fp32 master weights from the ZeRO-3 partitions
  consolidate_ema  neon consolidate CKPT --ema    the EMA from its partitions
  merge         neon merge BASE THETA_S --w 0.5 --w 1 --w 1.5   (safetensors -> OUT/w=<w>/)
  merge_zero    neon merge BASE CKPT --ema --w 0.5 --w 1 --w 1.5  (straight from the ZeRO-3 partitions)
  sweep         2 ranks (torchrun)                grid w in {0, 1} (two points), eval.n = 4, random
                                                  Inception weights and reference statistics
                                                  (tools/make_tiny_assets.py); no samples.png (its
                                                  160 samples would take ~45 min at full size)

--scale small runs the same configs with depth and width overridden (a few million parameters,
the image size and so the sequence length unchanged, the same stages and settings): a check of the
bench itself in a few minutes.

How memory is measured: peak RSS = the kernel's ru_maxrss of the process, from os.wait4 on it.
A single-process stage is waited for by this script directly; under torchrun each rank runs as the
child of a thin wrapper (this script with --rank-wrapper, started by torchrun in the rank's place)
that waits for it and writes its ru_maxrss (the rank's own peak, including any process it waited
for, e.g. a JIT build) to rank<R>.json. This script never imports torch, so its own memory (which a
forked child's ru_maxrss would include) stays small.

Bounds printed beside (MiB; "within" compares each rank's peak):
  train        ZeRO-3 model states, mixed precision (Rajbhandari et al. 2020, K = 12): (2 + 2 + 12) P / W
               bytes (bf16 parameters, bf16 gradients, fp32 master + Adam m, v, each partitioned over W
               ranks) + 4 P / W (the EMA, fp32, kept on each rank's partition: train/ema.py)
               + activations with checkpointing (Korthikanti et al. 2022, 16-bit: the input of every
               block, 2 b s h L bytes, plus one block recomputed, s b h (34 + 5 a s / h) bytes; b micro
               batch, s tokens, h width, a heads, L blocks) + DeepSpeed's working buffers, sized by
               the trainer's DeepSpeed settings (train/deepspeed_config.py: 2 x max live parameters +
               3 x 4 x sub_group_size + 2 x reduce_bucket_size bytes, 858 MiB) + the baseline (RSS of
               a process that only imports torch, DeepSpeed and the trainer).
  merge, consolidate, export
               2 x the largest tensor (fp32) + the baseline (RSS of a process that imports torch,
               safetensors and the merge modules) + 64 MiB (read/write buffers). export writes a
               torch.save file, which needs the whole state dict: its bound is the fp32 model +
               the baseline + 64 MiB instead.
  base, synth, sweep: no bound ("-"); the fp32 model size is printed per model for reference.

Time and memory to expect (2 cores, 24 GiB; a quiet machine, OMP_NUM_THREADS=1 per rank):
  --scale small   all three models in about 5-10 minutes, under 1 GiB per process.
  --scale full    DiT-XL/2 or xAR-L: about 12 minutes each (measured 2026-12-01; train ~3-4 min, synth
                  ~2 min, the sweep's 8 samples ~3 min). Training ranks peak at ~8.4 GiB each for 675M
                  parameters with MALLOC_MMAP_THRESHOLD_=65536 in the environment (~9.8 GiB without: glibc
                  keeps freed tensors under its dynamic mmap threshold in the heap), so run the bench with
                  it on a 24 GiB machine. xAR-H (1.19B) does not fit: ~14 GiB per rank on 2 ranks, and
                  20 bytes per parameter (24 GiB) on one. Disk: ~20 GB per 600M model at a time
                  (DeepSpeed checkpoint with optimizer states, theta_s; each export, consolidation and
                  merge output is removed once its stage is measured, the run once the model is done).
  MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python bench/scale.py --models dit_xl2,xar_l
Stages already measured in --work (results.json) are skipped, so an interrupted bench resumes;
--redo STAGE[,STAGE] measures stages again.

  python bench/scale.py --scale small --models dit_xl2,xar_l,xar_h --work runs/bench-scale-small
  python bench/scale.py --scale full --models dit_xl2,xar_l,xar_h --work runs/bench-scale --out runs/bench-scale.json
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
MiB = 2 ** 20
WORLD = 2

# name -> config, export kind, sampler of synth and eval (few steps), the --scale small model.args
MODELS = {
    "dit_xl2": {"config": "configs/dit_xl2_in256.yaml", "kind": "dit",
                "sampler": "{method: ddpm, steps: 4, cfg: 1.5}",
                "small": {"depth": 2, "hidden_size": 256, "num_heads": 4}},
    "xar_l": {"config": "configs/xar_l_in256.yaml", "kind": "xar", "sampler": "{num_steps: 2, cfg: 2.3}",
              "small": {"depth": 1, "embed_dim": 256, "num_heads": 4}},
    "xar_h": {"config": "configs/xar_h_in256.yaml", "kind": "xar", "sampler": "{num_steps: 2, cfg: 2.3}",
              "small": {"depth": 1, "embed_dim": 320, "num_heads": 4}},
}
STAGES = ("base", "synth", "train", "export", "consolidate", "consolidate_ema", "merge", "merge_zero", "sweep")
MERGE_WS = ("0.5", "1", "1.5")
TRAIN_STEPS = 3
MICRO = 1  # samples per rank per step

# What the bound's baseline processes import (their RSS is the per-process overhead).
BASELINE_TRAIN = "import torch, deepspeed, neon_scale.cli, neon_scale.stages.train, neon_scale.train.deepspeed_engine"
BASELINE_MERGE = ("import torch, safetensors.torch, neon_scale.cli, neon_scale.merge.merge_files, "
                  "neon_scale.merge.consolidate, neon_scale.merge.export, neon_scale.merge.zero")

# Run in a child (this script never imports torch): the parameters, the largest tensor and the
# shapes the activation formula needs, from the model built on the meta device.
INFO = r"""
import json, sys, torch
from neon_scale.config import load_config
from neon_scale.specs.registry import get_spec
cfg = load_config(sys.argv[1], sys.argv[2:], check_files=False)
spec = get_spec(cfg.model.name, "<bench>")
with torch.device("meta"):
    model = spec.build(cfg.model.parsed_args)
state = model.state_dict()
params = sum(p.numel() for p in model.parameters())
largest = max(t.numel() for t in state.values())
blocks = [m for m in model.modules() if hasattr(m, "attn") and hasattr(m.attn, "qkv")]
attn = blocks[0].attn
tokens = getattr(model, "seq_len", None) or model.x_embedder.num_patches
print(json.dumps({"params": params, "state_numel": sum(t.numel() for t in state.values()), "largest": largest,
                  "blocks": len(blocks), "width": attn.qkv.in_features,
                  "heads": getattr(attn, "num_heads", None) or attn.heads, "tokens": tokens}))
"""


# ----------------------------------------------------------------------------------- processes

def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", DS_ACCELERATOR="cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"  # the venv's ninja (ENVIRONMENT.md)
    return env


def rank_wrapper(out_dir: str, cmd: list[str]) -> int:
    """Torchrun's rank process: run `cmd` (a script and its arguments) as a child with this
    interpreter, forward the stop signals, and write the child's ru_maxrss to rank<RANK>.json."""
    proc = subprocess.Popen([sys.executable, *cmd])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda s, _frame: proc.send_signal(s))
    while True:
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    rank = os.environ.get("RANK", "0")
    pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rank": int(rank), "maxrss_kib": usage.ru_maxrss,
                                                                     "returncode": code}))
    return code if code >= 0 else 128 - code


def run_single(cmd: list[str], log: pathlib.Path) -> tuple[float, list[float]]:
    """Wall time [s] and [peak RSS MiB] of one process running `cmd` (python arguments)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}\n"
                           + log.read_text()[-3000:] + f"\n(log: {log})")
    return wall, [usage.ru_maxrss / 1024]


def run_ranks(args: list[str], log: pathlib.Path) -> tuple[float, list[float]]:
    """Wall time [s] and [peak RSS MiB per rank] of `launchers/neon.py ARGS` on WORLD ranks (torchrun)."""
    rank_dir = log.with_suffix(".ranks")
    rank_dir.mkdir(parents=True, exist_ok=True)
    for old in rank_dir.glob("rank*.json"):
        old.unlink()
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(pathlib.Path(__file__).resolve()), "--rank-wrapper", str(rank_dir), "--",
           str(ROOT / "launchers" / "neon.py"), *args]
    wall, _ = run_single(cmd, log)
    ranks = sorted((json.loads(p.read_text()) for p in rank_dir.glob("rank*.json")), key=lambda r: r["rank"])
    if len(ranks) != WORLD:
        raise RuntimeError(f"{len(ranks)} of {WORLD} ranks reported their memory ({rank_dir})")
    return wall, [r["maxrss_kib"] / 1024 for r in ranks]


def baseline_mib(code: str, log: pathlib.Path) -> float:
    return run_single(["-c", code], log)[1][0]


# ----------------------------------------------------------------------------------- settings

def overrides(name: str, scale: str, assets: pathlib.Path) -> list[str]:
    """The --set values of the bench (both scales) on top of the model's real config."""
    m = MODELS[name]
    sets = [
        "base.weights=null", "base.random_init=true", "base.seed=0", "model.args.vae=random",
        "synth.n=8" if scale == "full" else "synth.n=4", f"synth.samplers=[{m['sampler']}]",
        "synth.shard_size=4", "synth.batch_size=4", "synth.save_images=false",
        "train.zero_stage=3", "train.dtype=bf16", "train.activation_checkpointing=true",
        f"train.global_batch={MICRO * WORLD}", f"train.save_steps=[{TRAIN_STEPS}]", "train.warmup_steps=0",
        "train.ckpt_every_images=0", "train.log_every=1", "train.keep_last=1",
        "eval.n=4", "eval.chunk=2", "eval.batch_size=4", f"eval.sampler={m['sampler']}",
        f"eval.inception_weights={assets / 'inception-random.pth'}", f"eval.ref_stats={assets / 'ref-stats.npz'}",
        "sweep.mode=grid", "sweep.w_min=0", "sweep.w_max=1", "sweep.w_step=1", "sweep.refine_w=0",
        "sweep.refine_guidance=0", "sweep.guidance_key=null", "sweep.guidance=[]", "sweep.final_n=null",
        "sweep.repeats=0", "sweep.samples_png=false", "run.tensorboard=false",
    ]
    if scale == "small":
        sets += [f"model.args.{k}={v}" for k, v in m["small"].items()]
    return sets


def set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def activation_bytes(info: dict) -> float:
    """Checkpointed activations, 16-bit (Korthikanti et al. 2022): every block's input (2 b s h per
    block) plus one block recomputed, s b h (34 + 5 a s / h)."""
    b, s, h, a, n = MICRO, info["tokens"], info["width"], info["heads"], info["blocks"]
    return 2 * b * s * h * n + s * b * h * (34 + 5 * a * s / h)


def deepspeed_memory_settings() -> dict:
    """The trainer's DeepSpeed memory settings (neon_scale/train/deepspeed_config.py ZERO_MEMORY and
    ZERO3_MEMORY), read from its source: importing the package would import torch (see above)."""
    tree = ast.parse((ROOT / "neon_scale" / "train" / "deepspeed_config.py").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("ZERO_MEMORY", "ZERO3_MEMORY")
                                                for t in node.targets):
            out.update(ast.literal_eval(node.value))
    return out


def deepspeed_buffer_bytes() -> float:
    """DeepSpeed's working buffers, sized by its config, not by the model: the gathered 16-bit
    parameters kept alive (2 x stage3_max_live_parameters), Adam's temporaries over one optimizer
    sub-group (3 fp32 tensors of sub_group_size) and the 16-bit gradient bucket (2 x
    reduce_bucket_size)."""
    ds = deepspeed_memory_settings()
    return 2 * ds["stage3_max_live_parameters"] + 3 * 4 * ds["sub_group_size"] + 2 * ds["reduce_bucket_size"]


def bounds(info: dict, base_train: float, base_merge: float) -> dict:
    """MiB per stage (None: no bound)."""
    p = info["params"]
    zero3 = 16 * p / WORLD + 4 * p / WORLD  # (2 + 2 + 12) P / W + the fp32 EMA partition
    two_largest = 2 * 4 * info["largest"]
    return {"train": (zero3 + activation_bytes(info) + deepspeed_buffer_bytes()) / MiB + base_train,
            "merge": two_largest / MiB + base_merge + 64, "merge_zero": two_largest / MiB + base_merge + 64,
            "consolidate": two_largest / MiB + base_merge + 64, "consolidate_ema": two_largest / MiB + base_merge + 64,
            "export": 4 * info["state_numel"] / MiB + base_merge + 64}


# ----------------------------------------------------------------------------------- stages

def stage_command(stage: str, name: str, cfg: str, sets: list[str], run_dir: pathlib.Path,
                  out: pathlib.Path) -> tuple[bool, list[str]]:
    """(distributed, arguments) of one stage: `launchers/neon.py ARGS` on WORLD ranks, or
    `-m neon_scale.cli ARGS` in one process."""
    run_args = ["--config", cfg, "--run-dir", str(run_dir), *set_args(sets)]
    if stage in ("synth", "train", "sweep"):
        return True, [stage, *run_args]
    if stage == "base":
        return False, ["-m", "neon_scale.cli", "base", *run_args]
    theta = sorted(glob.glob(str(run_dir / "train" / "*" / f"theta_s-step{TRAIN_STEPS:06d}.safetensors")))
    ckpts = sorted(glob.glob(str(run_dir / "train" / "*" / "ckpt")))
    if not theta or not ckpts:
        raise RuntimeError(f"{run_dir}: no theta_s or DeepSpeed checkpoint (did train run?)")
    base = str(run_dir / "base" / "model.safetensors")
    ws = [a for w in MERGE_WS for a in ("--w", w)]
    cli = ["-m", "neon_scale.cli"]
    if stage == "export":
        suffix = ".pt" if MODELS[name]["kind"] == "dit" else ".pth"
        return False, [*cli, "export", theta[0], "--to", MODELS[name]["kind"], "-o", str(out / f"theta_s{suffix}"),
                       "--overwrite"]
    if stage == "consolidate":
        return False, [*cli, "consolidate", ckpts[0], "-o", str(out / "consolidated"), "--overwrite"]
    if stage == "consolidate_ema":
        return False, [*cli, "consolidate", ckpts[0], "--ema", "-o", str(out / "consolidated-ema"), "--overwrite"]
    if stage == "merge":
        return False, [*cli, "merge", base, theta[0], *ws, "-o", str(out / "merged"), "--overwrite"]
    if stage == "merge_zero":
        return False, [*cli, "merge", base, ckpts[0], "--ema", *ws, "-o", str(out / "merged-zero"), "--overwrite"]
    raise ValueError(stage)


# What the export, consolidate and merge stages write (under the model's folder) and no later stage
# reads: removed once the stage is measured, so that a 600M model's bench fits in ~20 GB of disk.
STAGE_OUTPUTS = {"export": ("theta_s.pt", "theta_s.pth"), "consolidate": ("consolidated",),
                 "consolidate_ema": ("consolidated-ema",), "merge": ("merged",), "merge_zero": ("merged-zero",)}


def mem_total_mib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) / 1024


def train_fits(name: str, results: dict, baseline: dict) -> str | None:
    """None when WORLD training ranks of `name` should fit in this machine's memory, else why not:
    each rank's bound (the ZeRO formula + activations + DeepSpeed's buffers + the baseline) times the
    largest measured/bound ratio of the models trained so far (1 before any), against MemTotal."""
    ratios = [max(e["stages"]["train"]["peak_rss_mib"]) / bounds(e["info"], baseline["train"], baseline["merge"])["train"]
              for e in results.values() if "peak_rss_mib" in e.get("stages", {}).get("train", {})]
    ratio = max(ratios, default=1.0)
    need = bounds(results[name]["info"], baseline["train"], baseline["merge"])["train"] * max(ratio, 1.0)
    total = mem_total_mib()
    if WORLD * need <= 0.95 * total:
        return None
    return (f"does not fit: training needs ~{need / 1024:,.1f} GiB per rank x {WORLD} ranks (the bound x {ratio:.2f}, "
            f"the measured ratio of the models trained here) > {total / 1024:,.1f} GiB")


def bench_model(name: str, scale: str, work: pathlib.Path, assets: pathlib.Path, results: dict, redo: set,
                save, baseline: dict) -> bool:
    """Every stage of one model, each measured and saved as it ends; False when a stage failed."""
    model_dir = work / name
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg, sets = str(ROOT / MODELS[name]["config"]), overrides(name, scale, assets)
    entry = results.setdefault(name, {"stages": {}})
    if "info" not in entry:
        out = subprocess.run([sys.executable, "-c", INFO, cfg, *sets], cwd=ROOT, env=_env(), capture_output=True,
                             text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"{name}: model info failed\n{out.stderr[-3000:]}")
        entry["info"] = json.loads(out.stdout.strip().splitlines()[-1])
        save()
    info = entry["info"]
    print(f"\n{name} ({scale}): {info['params'] / 1e6:,.1f}M parameters, fp32 model "
          f"{4 * info['state_numel'] / MiB:,.0f} MiB, largest tensor {4 * info['largest'] / MiB:,.1f} MiB, "
          f"{info['blocks']} blocks x width {info['width']}, {info['tokens']} tokens", flush=True)
    entry.pop("skipped", None)
    if scale == "full" and (why := train_fits(name, results, baseline)):  # an OOM would take the machine down
        entry["skipped"] = why
        save()
        print(f"  skipped: {why}", flush=True)
        return True
    for stage in STAGES:
        done = entry["stages"].get(stage)
        if done and "failed" not in done and stage not in redo:
            print(f"  {stage:<16} measured before: {done['wall_s']:.1f} s, peak RSS "
                  f"{' / '.join(f'{m:,.0f}' for m in done['peak_rss_mib'])} MiB", flush=True)
            continue
        if stage in redo and (model_dir / "run" / stage).is_dir():  # else the run would skip its finished stage
            shutil.rmtree(model_dir / "run" / stage)
        distributed, args = stage_command(stage, name, cfg, sets, model_dir / "run", model_dir)
        log = model_dir / f"{stage}.log"
        print(f"  {stage:<16} running ({'torchrun, ' + str(WORLD) + ' ranks' if distributed else '1 process'}; "
              f"log {log})", flush=True)
        try:
            wall, rss = run_ranks(args, log) if distributed else run_single(args, log)
        except RuntimeError as e:  # recorded; the later stages of this model need it, the other models do not
            errors = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("error:")]
            entry["stages"][stage] = {"failed": (errors or str(e).splitlines())[0], "log": str(log)}
            save()
            print(f"  {stage:<16} FAILED: {e}", flush=True)
            return False
        entry["stages"][stage] = {"wall_s": wall, "peak_rss_mib": rss}
        for made in STAGE_OUTPUTS.get(stage, ()):  # read by no later stage: the disk back (~8 GB a merge)
            target = model_dir / made
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        if os.environ.get("MALLOC_MMAP_THRESHOLD_"):  # glibc's heap setting changes the peaks: kept with them
            entry["stages"][stage]["malloc_mmap_threshold"] = int(os.environ["MALLOC_MMAP_THRESHOLD_"])
        save()
        print(f"  {stage:<16} {wall:.1f} s, peak RSS {' / '.join(f'{m:,.0f}' for m in rss)} MiB", flush=True)
    if scale == "full":  # every stage measured: the run's ~15 GB (checkpoint, theta_s) for the next model
        shutil.rmtree(model_dir / "run", ignore_errors=True)
    return True


# ----------------------------------------------------------------------------------- report

def table(results: dict, scale: str) -> str:
    base_train, base_merge = results["baseline_mib"]["train"], results["baseline_mib"]["merge"]
    lines = ["| model | stage | params | wall [s] | peak RSS rank0 [MiB] | peak RSS rank1 [MiB] | bound [MiB] | within |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        info = entry.get("info")
        if not info:
            continue
        if "skipped" in entry:
            lines.append(f"| {name} | all | {info['params'] / 1e6:,.1f}M | skipped: {entry['skipped']} | | | | |")
            continue
        bound = bounds(info, base_train, base_merge)
        for stage in STAGES:
            r = entry["stages"].get(stage)
            if r is None:
                continue
            if "failed" in r:
                lines.append(f"| {name} | {stage} | {info['params'] / 1e6:,.1f}M | failed: {r['failed'][:80]} "
                             f"| | | | |")
                continue
            rss = r["peak_rss_mib"]
            b = bound.get(stage)
            within = "-" if b is None else ("yes" if max(rss) <= b else "**no**")
            mmap = f" (MALLOC_MMAP_THRESHOLD_={r['malloc_mmap_threshold']})" if "malloc_mmap_threshold" in r else ""
            lines.append(f"| {name}{' (small)' if scale == 'small' else ''} | {stage}{mmap} | {info['params'] / 1e6:,.1f}M "
                         f"| {r['wall_s']:,.1f} | {rss[0]:,.0f} | {f'{rss[1]:,.0f}' if len(rss) > 1 else '-'} "
                         f"| {'-' if b is None else f'{b:,.0f}'} | {within} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank-wrapper"]:
        if len(argv) < 4 or argv[2] != "--":
            raise SystemExit("usage: scale.py --rank-wrapper DIR -- SCRIPT [ARGS...]")
        return rank_wrapper(argv[1], argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dit_xl2,xar_l", help=f"comma list of {', '.join(MODELS)} "
                        "(default dit_xl2,xar_l; xar_h needs ~2 x xAR-L's memory)")
    parser.add_argument("--scale", choices=["full", "small"], default="full",
                        help="full: the real dimensions; small: depth and width overridden (a few M parameters)")
    parser.add_argument("--work", help="working directory (default runs/bench-scale-<scale>); stages measured there "
                                       "before are skipped")
    parser.add_argument("--redo", default="", help="comma list of stages to measure again (a run stage's folder in "
                                                   "the work directory is deleted first)")
    parser.add_argument("--out", help="also write the results JSON here")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            parser.error(f"--models: unknown model {m!r} (choose from {', '.join(MODELS)})")
    redo = {s.strip() for s in args.redo.split(",") if s.strip()}
    if redo - set(STAGES):
        parser.error(f"--redo: unknown stage(s) {', '.join(sorted(redo - set(STAGES)))}")
    work = pathlib.Path(args.work or ROOT / "runs" / f"bench-scale-{args.scale}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    path = work / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if results.get("scale", args.scale) != args.scale:
        parser.error(f"{work} holds a --scale {results['scale']} bench; use another --work")
    results.update(scale=args.scale, world=WORLD, machine=f"{platform.machine()}, {os.cpu_count()} cores",
                   omp_num_threads=_env()["OMP_NUM_THREADS"])
    results.setdefault("models", {})

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)

    print(f"bench/scale.py: --scale {args.scale}, models {', '.join(models)}, {WORLD} ranks, work {work}, "
          f"OMP_NUM_THREADS={results['omp_num_threads']}", flush=True)
    assets = work / "assets"
    if not (assets / "inception-random.pth").is_file() or not (assets / "ref-stats.npz").is_file():
        print("random Inception weights and reference statistics (tools/make_tiny_assets.py) ...", flush=True)
        run_single([str(ROOT / "tools" / "make_tiny_assets.py"), str(assets)], work / "assets.log")
    if "baseline_mib" not in results:
        results["baseline_mib"] = {"train": baseline_mib(BASELINE_TRAIN, work / "baseline-train.log"),
                                   "merge": baseline_mib(BASELINE_MERGE, work / "baseline-merge.log")}
        save()
    print(f"baseline RSS (import only): trainer {results['baseline_mib']['train']:,.0f} MiB, merge/consolidate/"
          f"export {results['baseline_mib']['merge']:,.0f} MiB", flush=True)
    ok = [bench_model(name, args.scale, work, assets, results["models"], redo, save, results["baseline_mib"])
          for name in models]
    print("\n" + table(results, args.scale))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
