"""The `neon` command (also behind `deepspeed launchers/neon.py`).

  neon run   --config configs/toy2d.yaml          all stages: base, synth, train, sweep
  neon synth --config ... --set synth.n=2000      one stage (its inputs must exist)
  neon fid samples/ --ref ref.npz --weights inception.pth   FID of an image set

Errors from bad input print one line and exit 2; --debug shows the traceback instead. No pickle
in a file we read is executed unless --trust-pickles (or the config's trust_pickles) says so.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import DISK_FULL, NeonError, Stopped

# The commands import the package inside their functions, the one place that does: each loads only
# what it runs (torch, DeepSpeed and Triton take seconds to import; `neon --help` needs none).

STAGE_HELP = {
    "run": "run every stage in order (finished stages are skipped)",
    "base": "train or import theta_r (safetensors)",
    "synth": "sample the synthetic set S as webdataset shards",
    "train": "fine-tune theta_r on S with DeepSpeed -> theta_s checkpoints",
    "sweep": "merge theta_r + w (theta_r - theta_s), evaluate, select w",
}
COMMANDS = (*STAGE_HELP, "merge", "consolidate", "fid", "diagnose", "export", "plan", "doctor")


TRUST_HELP = ("let torch.load unpickle classes outside the allow-list in the files read (resumed checkpoints "
              "included): only for files you made yourself; default: refuse, naming the file and the class")


STRICT_HELP = ("official files read (DiT/xAR weights, the VAE, Inception / DINOv2 weights): a key the model does "
               "not have is an error (default: ignored with a warning naming them; config strict_keys: true)")


def _add_strict_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickles", action="store_true", help=TRUST_HELP)
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_run_args(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--config", "-c", required=True, help="YAML config, e.g. configs/toy2d.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-5 (repeatable)")
    p.add_argument("--run-dir", help="output directory (default: runs/<config name>)")
    # a stage command runs its own stage: `neon base --stage sweep` is refused in main() (one line)
    p.add_argument("--stage", choices=[s for s in STAGE_HELP if s != "run"], action="append",
                   help="run only this stage (repeatable)" if command == "run" else argparse.SUPPRESS)
    _add_common_args(p)
    _add_strict_arg(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the plan (as `neon plan`) and run nothing")
    _add_throughput_args(p)


PLAN_HELP = "print per stage the work and, given a throughput, the time of a config, running nothing"


def _add_throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images-per-s", type=float, metavar="R", help="plan: sampling throughput of the whole job "
                   "(images/s; in the sweep with their feature extraction)")
    p.add_argument("--train-images-per-s", type=float, metavar="R", help="plan: training throughput (images/s)")
    p.add_argument("--measure", action="store_true", help="plan: measure both on this machine on a few batches "
                   "(random weights; slow for large models on a CPU); stated values win")


def _add_merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="theta_r: .safetensors, safetensors dir with index, .pt/.pth, or DeepSpeed checkpoint dir")
    p.add_argument("theta_s", metavar="self", help="theta_s (the self-trained weights), same formats")
    p.add_argument("--w", type=float, action="append", required=True,
                   help="extrapolation weight; one --w writes the model into OUT itself, several (repeatable) "
                        "one folder each, OUT/w=<w>/, from one read")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--tag", help="DeepSpeed checkpoint tag for both inputs (default: 'latest')")
    p.add_argument("--base-tag", help="tag for BASE only")
    p.add_argument("--self-tag", help="tag for SELF only")
    p.add_argument("--step", type=int, metavar="N", help="SELF (a DeepSpeed checkpoint dir): the checkpoint of "
                   "optimizer step N (tag stepNNNNNN; train.save_steps are kept), instead of 'latest'")
    p.add_argument("--ema", action="store_true", help="SELF (a DeepSpeed checkpoint dir): the EMA weights kept "
                   "during training (train.ema_decay; what the sweep scores), not the fp32 master weights")
    p.add_argument("--key", help="sub-dict of a .pt/.pth file: ema, model_ema, model, state_dict (default: the only one)")
    p.add_argument("--base-key", help="sub-dict for BASE only")
    p.add_argument("--self-key", help="sub-dict for SELF only")
    p.add_argument("--max-shard-size", default="5GB", help="largest output file, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast float tensors (default: keep each dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (the old OUT stays until "
                                                             "the new one is complete)")
    _add_common_args(p)


def _add_fid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="generated images: image folder, ADM .npz (arr_0), webdataset .tar / folder of "
                                 ".tar, or a stats .npz (mu, sigma)")
    p.add_argument("input2", nargs="?", help="reference images (same forms) or a stats .npz")
    p.add_argument("--ref", help="reference statistics .npz with mu, sigma (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--features", default="inception", metavar="NAME",
                   help="feature backbone: inception (FID; default), dinov2 (FD_DINOv2) or classifier "
                        "(the project's classifier on the real data)")
    p.add_argument("--weights",
                   help="the backbone's local weights file (never downloaded), needed unless both inputs are "
                        "statistics files: inception: torch-fidelity's weights-inception-2015-12-05-6726825d.pth; "
                        "dinov2: dinov2_vitl14_pretrain.pth; classifier: the project's trained classifier")
    p.add_argument("--metrics", default=None, help="comma list of fid,isc,kid,prc (default: fid with a second "
                                                   "input or --ref, else isc); fid is the Frechet distance in "
                                                   "the backbone's features, isc needs a backbone with logits")
    p.add_argument("--save-stats", metavar="OUT.npz", help="write INPUT's mu/sigma (ADM format)")
    p.add_argument("--json", metavar="OUT.json", help="write the results as JSON (rank 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per network batch (default 64)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader decode workers per rank (default min(4, cores))")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images and count them (default: error)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (default 1000)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument("--device", help="cpu or cuda (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--trust-pickles", action="store_true", help="let torch.load unpickle classes outside the "
                                                                "allow-list in --weights (only for files you made)")
    _add_strict_arg(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")


DIAGNOSE_HELP = "predict the sign of the best w from theta_r alone (after base and synth, before any fine-tune)"
DIAGNOSE_DESCRIPTION = f"""{DIAGNOSE_HELP}.

What it measures: the cosine between the mean gradient of the training loss on each synthetic set S
and on real data, at theta_r. Fine-tuning on S moves theta_s ~ theta_r - eta g_s, so the merge
theta_r + w (theta_r - theta_s) changes the real loss by ~ w eta <g_s, g_r>: cos < 0 (anti-aligned,
expected for mode-seeking samplers) predicts w > 0; cos > 0 predicts w < 0.

Real data, first found: --real PATH; the config's data.source (its held-out split); the toys' true
distribution (fresh samples). Each set is cut into K equal batches (--batches), one mean gradient
each; where the loss draws noise (diffusion timesteps and noise) each record's loss is averaged over
--repeats draws (the toys' real side gets 4 x that many fresh samples instead). The 95%
interval is a bootstrap over batches (--bootstrap resamples, each side resampled on its own). The two
sides get independent noise: shared noise would add a common component to both means.

How to read the table: 'predicted w' is -sign(cos); trust it when the interval excludes 0 and
'bootstrap agrees' (the fraction of resamples with that sign) is near 1. 'cos, noise removed'
divides by unbiased estimates of the gradient norms, so it does not shrink with fewer samples.
Writes <run>/diagnose/diagnose.json. Needs the base and synth stages of the same config.
Memory: 2 x K x (number of parameters) x 4 bytes on the CPU (K = 32: 256 bytes per parameter),
plus one synthetic set and the real set in memory. Runs on one rank."""


def _add_diagnose_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="YAML config whose base and synth stages are done")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), as for `neon run`")
    p.add_argument("--run-dir", help="output directory (default: runs/<config name>)")
    p.add_argument("--real", metavar="PATH", help="real data: a folder of class folders of images, webdataset shards "
                                                  "(.tar or a folder of them), or a set in the synth layout")
    p.add_argument("--n", type=int, help="use at most N samples per set (default: the whole synthetic set; for the "
                                         "toys as many fresh real samples)")
    p.add_argument("--batches", type=int, default=32, help="K: batches per set, one gradient each (default 32)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the loss noise, the real samples and the bootstrap")
    p.add_argument("--repeats", type=int, default=16, help="loss noise draws averaged per record where the loss draws "
                                                          "noise (diffusion, flow; default 16)")
    p.add_argument("--micro-batch", type=int, help="rows per forward/backward pass (default: the train section's "
                                                  "global_batch / grad_accum)")
    _add_common_args(p)
    _add_strict_arg(p)


EXPORT_HELP = "our weights -> the official DiT .pt / xAR .pth file (or an official file -> our safetensors)"
EXPORT_DESCRIPTION = f"""{EXPORT_HELP}.

The networks keep the official parameter names, so no key is renamed: OUT holds exactly the official
keys and shapes (checked before anything is written; a source that is not a --to state dict is one
line naming the first missing or unexpected key), written with torch.save of plain tensors.
OUT's suffix picks the direction:
  OUT.pt / OUT.pth, --container plain (default): a bare state dict, what the official scripts read:
      DiT:  sample.py / sample_ddp.py --model DiT-XL/2 --image-size 256 --ckpt OUT.pt
      xAR:  eval.py --model xar_large --resume OUT.pth (the Neon authors' calculate_fid.py --model_ckpt)
  --container train: the training checkpoint's weight entries, the same tensors under both:
      DiT {{"model", "ema"}} (find_model takes "ema"); xAR {{"model", "model_ema"}}: name it
      checkpoint-last.pth in DIR for main_mar.py --resume DIR
  OUT.safetensors: the import direction: an official file (bare, or a training checkpoint: the EMA
      unless --key) -> our safetensors, checked the same way.
Prints the official model name and flags the sizes match."""


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="our weights: .safetensors, a safetensors dir (index, or a `neon merge` output), a "
                               "DeepSpeed checkpoint dir; or an official .pt/.pth (import)")
    p.add_argument("--to", "--model", dest="kind", choices=["dit", "xar"], required=True,
                   help="the model family whose official layout OUT gets")
    p.add_argument("-o", "--out", required=True, help="OUT.pt / OUT.pth (official layout) or OUT.safetensors (ours)")
    p.add_argument("--container", choices=["plain", "train"], default="plain",
                   help="plain: a bare state dict (default; the official sampling / evaluation scripts); train: "
                        "the training checkpoint's weight entries")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast float tensors (default: keep each dtype)")
    p.add_argument("--key", help="sub-dict of a .pt/.pth SRC: ema, model_ema, model (default: the EMA, else the only one)")
    p.add_argument("--tag", help="DeepSpeed checkpoint tag of a checkpoint-dir SRC (default: 'latest')")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_common_args(p)
    _add_strict_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neon", description="Neon: improve a generator by extrapolating away from its own self-training.",
        epilog="Multi-rank: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/neon.py --config configs/toy2d.yaml")
    parser.add_argument("--version", action="version", version=f"neon_scale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in STAGE_HELP.items():
        _add_run_args(sub.add_parser(name, help=help_text, description=help_text), name)
    merge_help = "theta_r + w (theta_r - theta_s) from two checkpoints to safetensors, streaming"
    _add_merge_args(sub.add_parser("merge", help=merge_help, description=merge_help))
    cons_help = "a DeepSpeed ZeRO 1/2/3 checkpoint -> safetensors (fp32 masters), streaming"
    cons = sub.add_parser("consolidate", help=cons_help, description=cons_help)
    cons.add_argument("ckpt_dir", help="DeepSpeed checkpoint directory (the one holding 'latest')")
    cons.add_argument("-o", "--out", required=True, help="output directory")
    cons.add_argument("--tag", help="checkpoint tag (default: the one named in 'latest')")
    cons.add_argument("--ema", action="store_true", help="the EMA kept during training (train.ema_decay) instead "
                                                         "of the master weights")
    cons.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast float tensors (default fp32)")
    cons.add_argument("--max-shard-size", default="5GB", help="largest output file (default 5GB)")
    cons.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (the old OUT stays until "
                                                                "the new one is complete)")
    _add_common_args(cons)
    fid_help = "FID / Inception Score / KID / precision-recall of image sets (torch-fidelity's numbers, distributed)"
    _add_fid_args(sub.add_parser("fid", help=fid_help, description=fid_help,
                                 epilog="Multi-rank: torchrun --nproc-per-node 8 launchers/neon.py fid ..."))
    _add_diagnose_args(sub.add_parser("diagnose", help=DIAGNOSE_HELP, description=DIAGNOSE_DESCRIPTION,
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    plan = sub.add_parser("plan", help=PLAN_HELP, description=PLAN_HELP)
    plan.add_argument("--config", "-c", required=True, help="YAML config, e.g. configs/xar_l_in256.yaml")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value (repeatable), as for `neon run`")
    plan.add_argument("--run-dir", help="output directory (default: runs/<config name>)")
    _add_throughput_args(plan)
    _add_common_args(plan)
    _add_export_args(sub.add_parser("export", help=EXPORT_HELP, description=EXPORT_DESCRIPTION,
                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    doctor_help = "print the stack neon_scale runs on here (torch, CUDA, GPUs, DeepSpeed, the csrc op)"
    _add_common_args(sub.add_parser("doctor", help=doctor_help, description=doctor_help))
    return parser


def _fail(msg: str, code: int) -> None:
    from .console import error

    error(msg)
    _exit(code)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # peers blocked in a collective are killed by the launcher when this rank exits


def run_plan(args: argparse.Namespace) -> None:
    """`neon plan` and `neon run --dry-run`: loads the config, prints its plan, writes nothing."""
    from .stages.plan import run_plan as plan

    plan(args.config, list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else []),
         args.images_per_s, args.train_images_per_s, args.measure)


def run_command(args: argparse.Namespace) -> None:
    if args.dry_run:
        return run_plan(args)
    from . import dist, io, pipeline, stop
    from .config import load_config
    from .train.deepspeed_config import check_user_json

    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = load_config(args.config, overrides)
    check_user_json(cfg)  # a user's DeepSpeed JSON fails now, not at the train stage
    if cfg.trust_pickles:
        io.trust_pickles()
    if cfg.strict_keys:
        io.strict_keys()
    stages = args.stage or ([args.command] if args.command != "run" else None)
    stop.install(cfg.run.stop_signals)  # from here a stop signal ends the run resumably (exit 3)
    dist.init()
    pipeline.run(cfg, stages)
    dist.barrier()


def run_fid(args: argparse.Namespace) -> None:
    """`neon fid`: the options as metrics.calculate's arguments."""
    from . import stop
    from .metrics.calculate import calculate

    stop.install(("SIGTERM", "SIGUSR1"))
    calculate(args.input, args.input2, weights=args.weights, ref=args.ref, features=args.features,
              metrics=args.metrics, save_stats=args.save_stats, json_path=args.json, batch_size=args.batch_size,
              workers=args.workers, skip_bad=args.skip_bad, kid_subset_size=args.kid_subset_size,
              kid_subsets=args.kid_subsets, device=args.device)


def run_diagnose(args: argparse.Namespace) -> None:
    from . import io
    from .config import load_config
    from .stages.diagnose import diagnose

    cfg = load_config(args.config, list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else []))
    if cfg.trust_pickles:
        io.trust_pickles()
    if cfg.strict_keys:
        io.strict_keys()
    diagnose(cfg, real=args.real, n=args.n, batches=args.batches, resamples=args.bootstrap, seed=args.seed,
             repeats=args.repeats, micro_batch=args.micro_batch)


def _negative_w(argv: list[str]) -> list[str]:
    """`--w -1e-3` as `--w=-1e-3`: argparse takes a value starting with '-' for an option unless it
    looks like a plain decimal, and an exponent does not."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--w" and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                float(argv[i + 1])
            except ValueError:
                out.append(argv[i])
            else:
                out.append(f"--w={argv[i + 1]}")
                i += 1
        else:
            out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(_negative_w(sys.argv[1:] if argv is None else list(argv)))
    if args.command in STAGE_HELP and args.command != "run" and args.stage:
        _fail(f"neon {args.command} runs the {args.command} stage only; --stage {' --stage '.join(args.stage)} "
              f"is for `neon run` (e.g. neon run --config ... --stage {args.stage[0]})", 2)
    if getattr(args, "trust_pickles", False):
        from .io import trust_pickles

        trust_pickles()
    if getattr(args, "strict", False):
        from .io import strict_keys

        strict_keys()
    try:
        if args.command == "merge":
            from .merge.merge_files import merge

            from .ckpt_files import tag_of

            if args.step is not None and (args.self_tag or args.tag):
                raise NeonError(f"merge: --step {args.step} names SELF's tag ({tag_of(args.step)}); drop --self-tag/--tag")
            merge(args.base, args.theta_s, args.w, args.out, base_tag=args.base_tag or args.tag,
                  theta_s_tag=tag_of(args.step) if args.step is not None else args.self_tag or args.tag,
                  base_key=args.base_key or args.key, theta_s_key=args.self_key or args.key, theta_s_ema=args.ema,
                  max_shard_size=args.max_shard_size, dtype=args.dtype, overwrite=args.overwrite)
        elif args.command == "consolidate":
            from .merge.consolidate import consolidate

            consolidate(args.ckpt_dir, args.out, tag=args.tag, ema=args.ema, dtype=args.dtype,
                        max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        elif args.command == "export":
            from .merge.export import export

            export(args.src, args.out, args.kind, container=args.container, dtype=args.dtype, key=args.key,
                   tag=args.tag, overwrite=args.overwrite)
        elif args.command == "fid":
            run_fid(args)
        elif args.command == "diagnose":
            run_diagnose(args)
        elif args.command == "plan":
            run_plan(args)
        elif args.command == "doctor":
            from .doctor import doctor

            _exit(doctor())
        else:
            run_command(args)
    except Stopped as e:  # saved what it had: a rerun resumes (neon.sbatch requeues on this status)
        from .console import notice

        notice(str(e))
        _exit(e.exit_code)
    except NeonError as e:
        if args.debug:
            raise
        _fail(str(e), 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # a bug or an environment problem: still one line unless --debug
        if args.debug:
            raise
        if isinstance(e, OSError) and e.errno in DISK_FULL:  # a write no writer of ours named
            _fail(f"{e.filename or 'writing output'}: no space left on device", 2)
        _fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)", 1)


if __name__ == "__main__":
    main()
