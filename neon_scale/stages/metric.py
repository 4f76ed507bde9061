"""What the sweep measures image models with, prepared once per run in <run>/metric/:

- the feature backbone's weights (`eval.features`): the configured local file, or, for
  `classifier` without `eval.classifier_weights`, a classifier trained here on the training split
  of `data.source` (its held-out accuracy is logged and kept in the file and in done.json);
- the reference statistics: `eval.ref_stats`, or the backbone's statistics of `data.source`'s
  images (`eval.ref_split`: the training split, the held-out split, or all).
Rank 0 does the work; the folder has its own fingerprint, so a change of data or backbone redoes it.
"""
from __future__ import annotations

import pathlib

import numpy as np

from .. import dist
from ..console import log
from ..data.real import load_real
from ..io import read_json
from ..metrics.backbones import load_backbone
from ..metrics.classifier import save_classifier, train_classifier
from ..metrics.fid import Moments, read_stats, write_stats
from .common import RunContext, StageDir

CLASSIFIER = "classifier.safetensors"
REF_STATS = "ref_stats.npz"


def _weights_path(ctx: RunContext, out: pathlib.Path) -> str:
    ev = ctx.cfg.eval
    configured = {"inception": ev.inception_weights, "dinov2": ev.dinov2_weights,
                  "classifier": ev.classifier_weights}[ev.features]
    return configured or str(out / CLASSIFIER)


def _build(ctx: RunContext, out: pathlib.Path) -> dict:
    ev, info = ctx.cfg.eval, {}
    weights = _weights_path(ctx, out)
    real = load_real(ctx.cfg.data.source) if ctx.cfg.data.source is not None else None
    train_idx, held_idx = real.split(ctx.cfg.data.holdout, ctx.cfg.data.seed) if real is not None else (None, None)
    if ev.features == "classifier" and ev.classifier_weights is None:
        net, acc = train_classifier(real.images[train_idx], real.labels[train_idx], real.images[held_idx],
                                    real.labels[held_idx], real.num_classes, seed=ctx.cfg.data.seed)
        save_classifier(weights, net, acc, ctx.cfg.data.source)
        log(f"metric: classifier trained on {len(train_idx)} images of {ctx.cfg.data.source}: held-out accuracy "
            f"{acc:.4f} ({len(held_idx)} images) -> {weights}")
        info["heldout_accuracy"] = acc
    if ev.ref_stats is None:
        idx = {"train": train_idx, "holdout": held_idx, "all": None}[ev.ref_split]
        images = real.images if idx is None else real.images[idx]
        backbone = load_backbone(ev.features, weights, batch_size=ev.batch_size)
        moments = Moments(backbone.dim)
        moments.add(backbone(images)[0])
        mu, sigma = moments.mean_cov()
        write_stats(out / REF_STATS, mu.numpy(), sigma.numpy(), len(images))
        log(f"metric: reference statistics of {len(images)} {ev.ref_split} images of {ctx.cfg.data.source} "
            f"({ev.features} features) -> {out / REF_STATS}")
        info["ref_images"] = len(images)
    return info


def prepare(ctx: RunContext) -> tuple[str, tuple[np.ndarray, np.ndarray], dict]:
    """(backbone weights path, (mu_ref, sigma_ref), info such as the classifier's held-out accuracy).
    Collective: rank 0 builds what is missing, every rank reads it."""
    stage = StageDir(ctx.run_dir / "metric", ctx.fingerprint("metric"), "metric")
    if not stage.is_done():
        stage.prepare()
        info = _build(ctx, stage.path) if dist.is_main() else {}
        stage.mark_done(**info)
    info = read_json(stage.path / "done.json")
    ref = ctx.cfg.eval.ref_stats or stage.path / REF_STATS
    return _weights_path(ctx, stage.path), read_stats(ref), info
