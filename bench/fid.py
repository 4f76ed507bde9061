"""Feature extraction throughput: `neon fid` vs torch-fidelity on the same images, in this process.

Both read the same folder of PNGs and produce the same features (2048 pool + logits_unbiased):
- torch-fidelity: `calculate_metrics(input1=DIR, isc=True)` (its DataLoader, resize, network);
- neon: `extract()` as `neon fid DIR --metrics isc` runs it (DataLoader workers decode, the csrc
  pre-processing op, the batch-norm-folded channels-last network), and two ablations: the torch
  fallback of the pre-processing op, and the network without folding / channels-last.
Prints images/s, the ratio to torch-fidelity, and for neon the share of time spent waiting for
decoded images / pre-processing / in the network. With a GPU it also checks the CUDA op against
the CPU op. Random calibrated weights unless --weights is given (speed does not depend on them).

  python bench/fid.py [--n 128] [--size 256] [--batch-size 64] [--workers 2] [--weights W.pth]
"""
import argparse
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
import torch
import torch_fidelity
from PIL import Image

from neon_scale.metrics import features as feats
from neon_scale.metrics import preprocess as prep
from neon_scale.metrics.inception import load_inception, random_inception_weights
from neon_scale.metrics.inputs import FolderSource


def make_images(folder: str, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
        img = np.asarray(low.resize((size, size), Image.BILINEAR), dtype=np.float32)
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.png"))


def run_fidelity(folder: str, weights: str, batch_size: int, cuda: bool) -> float:
    t0 = time.perf_counter()
    torch_fidelity.calculate_metrics(input1=folder, isc=True, cuda=cuda, batch_size=batch_size, verbose=False,
                                     cache=False, feature_extractor_weights_path=weights)
    return time.perf_counter() - t0


def run_neon(folder: str, weights: str, batch_size: int, workers: int, variant: str) -> tuple[float, dict]:
    saved = prep.preprocess
    if variant == "torch preprocess":
        feats.preprocess = prep.preprocess_reference
    try:
        extractor = feats.InceptionFeatures(weights, batch_size=batch_size)
        if variant == "plain network":
            extractor.model = load_inception(weights, extractor.device, fold=False)
        t0 = time.perf_counter()
        timing = feats.extract(FolderSource(pathlib.Path(folder)), extractor,
                               feats.FeatureStats(keep_logits=True), workers=workers, label="neon")
        return time.perf_counter() - t0, timing
    finally:
        feats.preprocess = saved


def check_cuda_op() -> str:
    if not torch.cuda.is_available():
        return "no GPU: CUDA op not checked"
    x = torch.randint(0, 256, (16, 3, 256, 256), dtype=torch.uint8)
    cpu, gpu = prep.preprocess(x), prep.preprocess(x.cuda()).cpu()
    return f"CUDA op vs CPU op: max |diff| {(cpu - gpu).abs().max().item():.3g} (compiled: {prep.have_compiled_op()})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--weights")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        make_images(folder, args.n, args.size)
        weights = args.weights
        if weights is None:
            weights = os.path.join(tmp, "inception.pth")
            random_inception_weights(weights)
        rows = {}
        for _ in range(args.repeat):  # alternate, keep the best of each (the first pass warms caches)
            t = run_fidelity(folder, weights, args.batch_size, cuda)
            rows["torch-fidelity"] = min(rows.get("torch-fidelity", (1e9, None)), (t, None), key=lambda r: r[0])
            for variant in ("neon", "torch preprocess", "plain network"):
                t, timing = run_neon(folder, weights, args.batch_size, args.workers, variant)
                rows[variant] = min(rows.get(variant, (1e9, None)), (t, timing), key=lambda r: r[0])
    device = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores ({platform.processor()})"
    print(f"{args.n} PNGs {args.size}x{args.size}, batch {args.batch_size}, {args.workers} decode workers, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = args.n / rows["torch-fidelity"][0]
    print(f"{'pipeline':<28}{'images/s':>10}{'vs torch-fidelity':>19}   time shares (decode wait / preprocess / network)")
    for name, (t, timing) in rows.items():
        label = {"neon": "neon fid", "torch preprocess": "neon fid, torch preprocess",
                 "plain network": "neon fid, BN not folded"}.get(name, name)
        shares = ""
        if timing:
            total = timing["total"]
            shares = " / ".join(f"{100 * timing[k] / total:.0f}%" for k in ("decode", "preprocess", "network"))
        print(f"{label:<28}{args.n / t:>10.2f}{args.n / t / base:>18.2f}x   {shares}")
    print(check_cuda_op())


if __name__ == "__main__":
    main()
