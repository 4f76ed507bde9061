"""`neon fid INPUT [INPUT2 | --ref REF.npz] --weights W.pth ...`: FID / IS / KID / PR of image sets.

Inputs: folders of PNG/JPEG, ADM sample batches (.npz with arr_0), webdataset shards, or (INPUT
only, FID only) a statistics .npz with mu/sigma. Everything is checked before any image is decoded;
non-finite features or metrics are an error before anything is written (never a bare NaN in JSON).
Under `torchrun`/`deepspeed` every rank extracts a disjoint share; rank 0 writes the results.
`--features` picks the backbone (`backbones.py`): Inception (FID, the default), DINOv2 (FD_DINOv2)
or the project's classifier; the Frechet distance is reported under the backbone's metric name.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import time

from .. import dist, io
from ..console import log
from ..errors import NeonError

METRICS = ("fid", "isc", "kid", "prc")
SCORES = ("is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall")  # besides the Frechet distance


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="generated images: image folder, ADM .npz (arr_0), webdataset .tar / folder of "
                                 ".tar, or a stats .npz (mu, sigma)")
    p.add_argument("input2", nargs="?", help="reference images (same forms) or a stats .npz")
    p.add_argument("--ref", help="reference statistics .npz with mu, sigma (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--features", default="inception", metavar="NAME",
                   help="feature backbone: inception (FID; default), dinov2 (FD_DINOv2) or classifier "
                        "(the project's classifier on the real data)")
    p.add_argument("--weights", required=True,
                   help="the backbone's local weights file (never downloaded): inception: torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth; dinov2: dinov2_vitl14_pretrain.pth; "
                        "classifier: the project's trained classifier")
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
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _metrics(args) -> list[str]:
    from .backbones import check_name

    check_name(args.features, "--features")
    second = args.input2 or args.ref
    if args.input2 and args.ref:
        raise NeonError("give either INPUT2 or --ref, not both")
    wanted = args.metrics.split(",") if args.metrics else (["fid"] if second else ["isc"])
    wanted = [m.strip() for m in wanted if m.strip()]
    for m in wanted:
        if m not in METRICS:
            raise NeonError(f"--metrics: unknown metric '{m}' (choose from {', '.join(METRICS)})")
    if any(m in wanted for m in ("fid", "kid", "prc")) and not second:
        raise NeonError(f"--metrics {','.join(wanted)}: needs a second input (INPUT2 or --ref)")
    if args.batch_size < 1 or args.workers < 0:
        raise NeonError(f"--batch-size must be >= 1 and --workers >= 0 (got {args.batch_size}, {args.workers})")
    return wanted


def _open(path: str, role: str, wanted: list[str]):
    """-> ("stats", (mu, sigma)) or ("images", source), checked before any work starts."""
    from .fid import read_stats
    from .inputs import npz_keys, open_source

    needs_images = [m for m in wanted if m in ("kid", "prc") or (m == "isc" and role == "input1")]
    keys = npz_keys(path) if path.endswith(".npz") and os.path.isfile(path) else None
    if keys is not None and {"mu", "sigma"} <= keys and not (needs_images and "arr_0" in keys):
        if needs_images:
            raise NeonError(f"{path}: is a statistics file; {','.join(needs_images)} need images")
        return "stats", read_stats(path)
    return "images", open_source(path)


def _check_finite(results: dict, names, where: str) -> None:
    """Non-finite metrics: one line naming them and `where` (the inputs), before anything is written."""
    bad = [f"{k} = {results[k]}" for k in names if k in results and not math.isfinite(results[k])]
    if bad:
        raise NeonError(f"{', '.join(bad)} for {where}: not a finite number; nothing written")


def run_cli(args: argparse.Namespace) -> None:
    from .fid import check_same_dim, frechet_distance, read_stats, write_stats

    wanted = _metrics(args)
    inputs = {"input1": _open(args.input, "input1", wanted)}
    if args.input2:
        inputs["input2"] = _open(args.input2, "input2", wanted)
    elif args.ref:
        if "kid" in wanted or "prc" in wanted:
            raise NeonError(f"--ref {args.ref}: kid and prc need reference images (INPUT2), not statistics")
        inputs["input2"] = ("stats", read_stats(args.ref))
    if args.save_stats and inputs["input1"][0] == "stats":
        raise NeonError(f"--save-stats: {args.input} already is a statistics file")
    if "kid" in wanted and args.kid_subset_size < 2:
        raise NeonError(f"--kid-subset-size must be >= 2, got {args.kid_subset_size}")
    paths = {"input1": args.input, "input2": args.input2 or args.ref}

    import numpy as np
    import torch  # the heavy imports (torch-fidelity pulls torchvision) after the cheap checks

    from .backbones import METRIC_NAMES, load_backbone
    from .features import FeatureStats, extract
    from .scores import inception_score, kernel_inception_distance, precision_recall

    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:  # under a launcher: checked and joined
        dist.init()
    device = torch.device(args.device) if args.device else None
    extractor = None
    if any(kind == "images" for kind, _ in inputs.values()):  # loaded (and checked) before any image is decoded
        extractor = load_backbone(args.features, args.weights, device, args.batch_size)
        if "isc" in wanted and extractor.logits_dim is None:
            default = "" if args.metrics else " (the default with one input)"
            raise NeonError(f"--metrics isc{default}: the {args.features} features have no class logits; the "
                            f"Inception Score needs --features inception or classifier")
    if "input2" in inputs:  # before any image is decoded
        dims = {role: value[0].shape[0] if kind == "stats" else extractor.dim for role, (kind, value) in inputs.items()}
        check_same_dim((paths["input1"], dims["input1"]), (paths["input2"], dims["input2"]))
    results: dict = {}
    stats: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    for role, (kind, value) in inputs.items():
        if kind == "stats":
            stats[role] = {"mu": value[0], "sigma": value[1], "n": None}
            continue
        acc = FeatureStats.for_backbone(extractor, keep_pool="kid" in wanted or "prc" in wanted,
                                        keep_logits="isc" in wanted and role == "input1")
        timing = extract(value, extractor, acc, args.workers, args.skip_bad, label=f"{role} features")
        stats[role] = acc.finish(paths[role])
        if not (np.isfinite(stats[role]["mu"]).all() and np.isfinite(stats[role]["sigma"]).all()):
            # images are finite uint8: NaN/inf comes from the network (overflow, a negative BN variance)
            raise NeonError(f"{paths[role]}: the {args.features} features contain NaN/inf (backbone weights "
                            f"{args.weights}); nothing written")
        for k, v in timing.items():
            seconds[k] = seconds.get(k, 0.0) + v
        if stats[role]["bad"]:
            results.setdefault("skipped_bad", {})[role] = stats[role]["bad"]
    elapsed = time.perf_counter() - start

    s1, s2 = stats["input1"], stats.get("input2")
    fd_name = METRIC_NAMES[args.features]
    results["features"] = args.features
    with np.errstate(all="ignore"):  # an overflow ends as a non-finite metric: one line below, not a warning
        if "fid" in wanted:
            results[fd_name] = frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"])
        if dist.is_main():
            if "isc" in wanted:
                results["is_mean"], results["is_std"] = inception_score(s1["logits"])
            if "kid" in wanted:
                results["kid_mean"], results["kid_std"] = kernel_inception_distance(
                    s1["pool"], s2["pool"], args.kid_subsets, args.kid_subset_size)
            if "prc" in wanted:
                results["precision"], results["recall"] = precision_recall(s1["pool"], s2["pool"])
    if dist.is_main():
        backbone = f"; {args.features} features, weights {args.weights}" if extractor else ""
        _check_finite(results, (fd_name, *SCORES), " and ".join(paths[r] for r in stats) + backbone)
        results["n"] = {role: s["n"] for role, s in stats.items()}
        results["inputs"] = {role: paths[role] for role in stats}
        images = sum(s["n"] or 0 for s in stats.values())
        results["images_per_s"] = images / max(elapsed, 1e-9)
        results["ranks"] = dist.world()
        results["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        for target in filter(None, (args.save_stats, args.json)):  # a killed earlier run's temporaries
            target = pathlib.Path(target)
            io.remove_stale(target.parent, recursive=False, of=target.name)
        if args.save_stats:
            write_stats(args.save_stats, s1["mu"], s1["sigma"], s1["n"])
        if args.json:
            io.write_json(args.json, results)
        shown = [f"{k} {results[k]:.6g}" for k in (fd_name, "is_mean", "kid_mean", "precision", "recall")
                 if k in results]
        counts = ", ".join(f"n={v}" for v in results["n"].values() if v is not None)
        log(" | ".join(shown) + f" ({counts}; {results['images_per_s']:.1f} img/s on {dist.world()} rank(s))")
    dist.barrier()
