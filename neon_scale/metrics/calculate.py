"""FID / IS / KID / PR of image sets: `calculate(...)`, the body of `neon fid` (cli.py parses the options).

Inputs: folders of PNG/JPEG, ADM sample batches (.npz with arr_0), webdataset shards, or (input1
only, FID only) a statistics .npz with mu/sigma. Everything is checked before any image is decoded;
non-finite features or metrics are an error before anything is written (never a bare NaN in JSON).
Under `torchrun`/`deepspeed` every rank extracts a disjoint share; rank 0 writes the results.
`features` picks the backbone (`backbones.py`): Inception (FID, the default), DINOv2 (FD_DINOv2)
or the project's classifier; the Frechet distance is reported under the backbone's metric name.
Error messages name the command's options (--metrics, --ref, ...): this is what `neon fid` runs.
"""
from __future__ import annotations

import math
import os
import pathlib
import time
from collections.abc import Sequence

import numpy as np
import torch

from .. import dist, io
from ..console import log
from ..errors import NeonError
from .backbone_base import Backbone
from .backbones import METRIC_NAMES, check_name, load_backbone
from .features import FeatureStats, extract
from .fid import check_same_dim, frechet_distance, read_stats, write_stats
from .inputs import npz_keys, open_source
from .scores import PR_NEIGHBOURS, inception_score, kernel_inception_distance, precision_recall

METRICS = ("fid", "isc", "kid", "prc")
SCORES = ("is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall")  # besides the Frechet distance
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def calculate(input1: str, input2: str | None = None, *, weights: str | None = None, ref: str | None = None,
              features: str = "inception", metrics: str | Sequence[str] | None = None,
              save_stats: str | None = None, json_path: str | None = None, batch_size: int = 64,
              workers: int = DEFAULT_WORKERS, skip_bad: bool = False, kid_subset_size: int = 1000,
              kid_subsets: int = 100, device: str | torch.device | None = None) -> dict:
    """The metrics of input1 (against input2 or the statistics file `ref`), as `neon fid` computes them.

    `metrics`: a comma list or names of fid, isc, kid, prc (default: fid with a second input, else
    isc). `weights`: the backbone's file, needed unless both inputs are statistics files. Writes
    `save_stats` (input1's mu/sigma, ADM format) and `json_path` (the results) on rank 0, and logs
    one line. Returns the results: complete on rank 0 (the JSON's content)."""
    wanted = choose_metrics(metrics, features, input2, ref, batch_size, workers)
    inputs = resolve_inputs(input1, input2, ref, wanted)
    paths = {"input1": input1, "input2": input2 or ref}
    _check_options(inputs, paths, wanted, save_stats, kid_subset_size, kid_subsets)
    if any(kind == "images" for kind, _ in inputs.values()) and not weights:
        images = " and ".join(paths[r] for r, (kind, _) in inputs.items() if kind == "images")
        raise NeonError(f"--weights: the {features} weights file is needed to extract the features of {images} "
                        f"(only two statistics files need none)")
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:  # under a launcher: checked and joined
        dist.init()
    device = torch.device(device) if device else None
    extractor = None
    if any(kind == "images" for kind, _ in inputs.values()):  # loaded (and checked) before any image is decoded
        extractor = _load_extractor(features, weights, device, batch_size, wanted, explicit=bool(metrics))
    if "input2" in inputs:  # before any image is decoded
        _check_dims(inputs, paths, extractor)
    start = time.perf_counter()
    stats, skipped, seconds = extract_features(inputs, paths, extractor, wanted, workers, skip_bad, features, weights)
    elapsed = time.perf_counter() - start

    results: dict = {"skipped_bad": skipped} if skipped else {}
    results["features"] = features
    fd_name = METRIC_NAMES[features]
    results.update(compute_scores(wanted, stats["input1"], stats.get("input2"), fd_name, kid_subsets,
                                  kid_subset_size))
    if dist.is_main():
        backbone = f"; {features} features, weights {weights}" if extractor else ""
        _check_finite(results, (fd_name, *SCORES), " and ".join(paths[r] for r in stats) + backbone)
        _add_counts(results, stats, paths, elapsed, seconds)
        write_outputs(results, stats["input1"], save_stats, json_path)
        _log_summary(results, fd_name)
    dist.barrier()
    return results


# ------------------------------------------------------------------------------------ checks

def choose_metrics(metrics: str | Sequence[str] | None, features: str, input2: str | None, ref: str | None,
                   batch_size: int, workers: int) -> list[str]:
    """The metrics asked for (or the default), checked against the inputs given."""
    check_name(features, "--features")
    second = input2 or ref
    if input2 and ref:
        raise NeonError("give either INPUT2 or --ref, not both")
    if not metrics:
        wanted = ["fid"] if second else ["isc"]
    else:
        wanted = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    wanted = [m.strip() for m in wanted if m.strip()]
    for m in wanted:
        if m not in METRICS:
            raise NeonError(f"--metrics: unknown metric '{m}' (choose from {', '.join(METRICS)})")
    if any(m in wanted for m in ("fid", "kid", "prc")) and not second:
        raise NeonError(f"--metrics {','.join(wanted)}: needs a second input (INPUT2 or --ref)")
    if batch_size < 1 or workers < 0:
        raise NeonError(f"--batch-size must be >= 1 and --workers >= 0 (got {batch_size}, {workers})")
    return wanted


def _check_options(inputs: dict, paths: dict, wanted: list[str], save_stats: str | None,
                   kid_subset_size: int, kid_subsets: int) -> None:
    """What can be checked before any image is decoded: KID and PR against the inputs' image counts."""
    if save_stats and inputs["input1"][0] == "stats":
        raise NeonError(f"--save-stats: {paths['input1']} already is a statistics file")
    counts = {role: len(value) for role, (kind, value) in inputs.items() if kind == "images"}
    if "kid" in wanted:
        if kid_subset_size < 2 or kid_subsets < 1:
            raise NeonError(f"--kid-subset-size must be >= 2 and --kid-subsets >= 1, got {kid_subset_size}, "
                            f"{kid_subsets}")
        fewest = min(counts, key=counts.get)
        if kid_subset_size > counts[fewest]:
            raise NeonError(f"--kid-subset-size {kid_subset_size} exceeds the {counts[fewest]} images of "
                            f"{paths[fewest]}; give at most {counts[fewest]}; nothing computed")
    if "prc" in wanted:
        few = [f"{paths[r]} has {n}" for r, n in counts.items() if n <= PR_NEIGHBOURS]
        if few:
            raise NeonError(f"--metrics prc: precision/recall needs more than {PR_NEIGHBOURS} images per input "
                            f"({', '.join(few)}); nothing computed")


def _check_dims(inputs: dict, paths: dict, extractor: Backbone | None) -> None:
    """Both inputs in the same feature space: a statistics file's width against the backbone's."""
    dims = {role: value[0].shape[0] if kind == "stats" else extractor.dim for role, (kind, value) in inputs.items()}
    check_same_dim((paths["input1"], dims["input1"]), (paths["input2"], dims["input2"]))


def _check_finite(results: dict, names, where: str) -> None:
    """Non-finite metrics: one line naming them and `where` (the inputs), before anything is written."""
    bad = [f"{k} = {results[k]}" for k in names if k in results and not math.isfinite(results[k])]
    if bad:
        raise NeonError(f"{', '.join(bad)} for {where}: not a finite number; nothing written")


# ------------------------------------------------------------------------------------ inputs

def resolve_inputs(input1: str, input2: str | None, ref: str | None, wanted: list[str]) -> dict:
    """role ("input1", "input2") -> ("stats", (mu, sigma)) or ("images", source), checked before any work."""
    inputs = {"input1": _open(input1, "input1", wanted)}
    if input2:
        inputs["input2"] = _open(input2, "input2", wanted)
    elif ref:
        inputs["input2"] = load_reference(ref, wanted)
    return inputs


def load_reference(ref: str, wanted: list[str]) -> tuple[str, tuple]:
    """--ref: statistics only, so no metric that needs the reference images."""
    if "kid" in wanted or "prc" in wanted:
        raise NeonError(f"--ref {ref}: kid and prc need reference images (INPUT2), not statistics")
    return "stats", read_stats(ref)


def _open(path: str, role: str, wanted: list[str]):
    """-> ("stats", (mu, sigma)) or ("images", source)."""
    needs_images = [m for m in wanted if m in ("kid", "prc") or (m == "isc" and role == "input1")]
    keys = npz_keys(path) if path.endswith(".npz") and os.path.isfile(path) else None
    if keys is not None and {"mu", "sigma"} <= keys and not (needs_images and "arr_0" in keys):
        if needs_images:
            raise NeonError(f"{path}: is a statistics file; {','.join(needs_images)} need images")
        return "stats", read_stats(path)
    return "images", open_source(path)


# ---------------------------------------------------------------------------------- features

def _load_extractor(features: str, weights: str, device: torch.device | None, batch_size: int,
                    wanted: list[str], explicit: bool) -> Backbone:
    """The backbone, and the check that it has logits when the Inception Score is asked for."""
    extractor = load_backbone(features, weights, device, batch_size)
    if "isc" in wanted and extractor.logits_dim is None:
        default = "" if explicit else " (the default with one input)"
        raise NeonError(f"--metrics isc{default}: the {features} features have no class logits; the "
                        f"Inception Score needs --features inception or classifier")
    return extractor


def extract_features(inputs: dict, paths: dict, extractor: Backbone | None, wanted: list[str], workers: int,
                     skip_bad: bool, features: str, weights: str) -> tuple[dict, dict, dict]:
    """Every input's statistics (a statistics file as it is) -> (stats per role, images skipped
    per role, seconds per phase summed over the inputs)."""
    stats: dict[str, dict] = {}
    skipped: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for role, (kind, value) in inputs.items():
        if kind == "stats":
            stats[role] = {"mu": value[0], "sigma": value[1], "n": None}
            continue
        acc = FeatureStats.for_backbone(extractor, keep_pool="kid" in wanted or "prc" in wanted,
                                        keep_logits="isc" in wanted and role == "input1")
        timing = extract(value, extractor, acc, workers, skip_bad, label=f"{role} features")
        stats[role] = acc.finish(paths[role])
        if not (np.isfinite(stats[role]["mu"]).all() and np.isfinite(stats[role]["sigma"]).all()):
            # images are finite uint8: NaN/inf comes from the network (overflow, a negative BN variance)
            raise NeonError(f"{paths[role]}: the {features} features contain NaN/inf (backbone weights "
                            f"{weights}); nothing written")
        for k, v in timing.items():
            seconds[k] = seconds.get(k, 0.0) + v
        if stats[role]["bad"]:
            skipped[role] = stats[role]["bad"]
    return stats, skipped, seconds


# ------------------------------------------------------------------------------------ scores

def compute_scores(wanted: list[str], s1: dict, s2: dict | None, fd_name: str, kid_subsets: int,
                   kid_subset_size: int) -> dict:
    """The Frechet distance (every rank) and IS / KID / PR (rank 0, which holds the gathered rows)."""
    out: dict = {}
    with np.errstate(all="ignore"):  # an overflow ends as a non-finite metric: one line later, not a warning
        if "fid" in wanted:
            out[fd_name] = frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"])
        if dist.is_main():
            if "isc" in wanted:
                out["is_mean"], out["is_std"] = inception_score(s1["logits"])
            if "kid" in wanted:
                out["kid_mean"], out["kid_std"] = kernel_inception_distance(s1["pool"], s2["pool"], kid_subsets,
                                                                            kid_subset_size)
            if "prc" in wanted:
                out["precision"], out["recall"] = precision_recall(s1["pool"], s2["pool"])
    return out


# ----------------------------------------------------------------------------------- outputs

def _add_counts(results: dict, stats: dict, paths: dict, elapsed: float, seconds: dict) -> None:
    """Images per input, the inputs, throughput, ranks and phase times (after the metrics, as in the JSON)."""
    results["n"] = {role: s["n"] for role, s in stats.items()}
    results["inputs"] = {role: paths[role] for role in stats}
    images = sum(s["n"] or 0 for s in stats.values())
    if images:  # two statistics files: nothing extracted, no throughput to report
        results["images_per_s"] = images / max(elapsed, 1e-9)
    results["ranks"] = dist.world()
    results["seconds"] = {k: round(v, 3) for k, v in seconds.items()}


def write_outputs(results: dict, s1: dict, save_stats: str | None, json_path: str | None) -> None:
    """input1's statistics (ADM .npz) and the results (JSON), each where asked."""
    for target in filter(None, (save_stats, json_path)):  # a killed earlier run's temporaries
        target = pathlib.Path(target)
        io.remove_stale(target.parent, recursive=False, of=target.name)
    if save_stats:
        write_stats(save_stats, s1["mu"], s1["sigma"], s1["n"])
    if json_path:
        io.write_json(json_path, results)


def _log_summary(results: dict, fd_name: str) -> None:
    shown = [f"{k} {results[k]:.6g}" for k in (fd_name, "is_mean", "kid_mean", "precision", "recall")
             if k in results]
    counts = ", ".join(f"n={v}" for v in results["n"].values() if v is not None)
    speed = f"{results['images_per_s']:.1f} img/s on {dist.world()} rank(s)" if "images_per_s" in results else ""
    details = "; ".join(filter(None, (counts, speed)))
    log(" | ".join(shown) + (f" ({details})" if details else " (two statistics files)"))
