"""Inception Score, KID and precision/recall from features in input order (torch-fidelity 0.4's definitions).

- IS: logits_unbiased shuffled with RandomState(2020), 10 splits, exp(mean KL(p || mean p)), float64.
- KID: torch-fidelity's estimator (100 subsets of 1000, cubic polynomial kernel, unbiased MMD^2).
- Precision/recall: k-NN balls (k = 3) on the 2048-d pool features of both inputs, computed in
  blocks (torch-fidelity's memory-saving variant). torch-fidelity's default PR network is VGG16;
  ours uses Inception pool features, as ADM's evaluator does.
"""
from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

from ..errors import NeonError

SEED = 2020  # torch-fidelity's rng_seed, used for the IS shuffle and the KID subsets
PR_NEIGHBOURS = 3  # torch-fidelity's prc_neighborhood: the k of the k-NN balls


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    n = logits.shape[0]
    if n < splits:
        raise NeonError(f"Inception Score needs at least {splits} images (one per split), got {n}")
    perm = np.random.RandomState(SEED).permutation(n)
    logits = logits[torch.from_numpy(perm)].double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(dim=0, keepdim=True)
        kl = (p[lo:hi] * (log_p[lo:hi] - q.log())).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(feats1: torch.Tensor, feats2: torch.Tensor, subsets: int = 100,
                              subset_size: int = 1000) -> tuple[float, float]:
    if min(len(feats1), len(feats2)) < subset_size:
        raise NeonError(f"KID subset size {subset_size} exceeds the number of images ({len(feats1)}, {len(feats2)}); "
                        f"lower --kid-subset-size")
    out = kid_features_to_metric(feats1, feats2, kid_subsets=subsets, kid_subset_size=subset_size, rng_seed=SEED,
                                 verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def precision_recall(feats_gen: torch.Tensor, feats_real: torch.Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    if min(len(feats_gen), len(feats_real)) <= k:
        raise NeonError(f"precision/recall needs more than {k} images per input")
    return calculate_precision_recall_part(feats_gen.float(), feats_real.float(), neighborhood=k, batch_size=10000)
