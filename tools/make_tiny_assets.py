"""Write the files the tiny image configs (configs/dit_tiny.yaml, configs/xar_tiny.yaml) evaluate
with: random InceptionV3 weights in torch-fidelity's layout (batch norms calibrated) and
reference statistics (mu, sigma, n) of smooth random 64x64 images under those weights.

They exercise the whole FID path on a machine without the real Inception file; the numbers they
give are not FIDs of anything. Usage: python tools/make_tiny_assets.py [OUT_DIR]
(default runs/tiny-assets; existing files are kept).
"""
import pathlib
import sys

import torch
import torch.nn.functional as F

from neon_scale.metrics.features import FeatureStats, InceptionFeatures
from neon_scale.metrics.fid import write_stats
from neon_scale.metrics.inception import random_inception_weights

N_REF = 64


def smooth_images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=gen)
    img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    img = img + 0.08 * torch.randn(img.shape, generator=gen)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def main(out_dir: str = "runs/tiny-assets") -> None:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, ref = out / "inception-random.pth", out / "ref-stats.npz"
    if not weights.is_file():
        random_inception_weights(weights, seed=0)
    if not ref.is_file():
        stats = FeatureStats()
        images = smooth_images(N_REF, seed=1)
        stats.add_images(InceptionFeatures(str(weights), torch.device("cpu"), batch_size=32), images,
                         torch.arange(N_REF))
        result = stats.finish()
        write_stats(ref, result["mu"], result["sigma"], result["n"])
    print(f"tiny assets: {weights}, {ref}")


if __name__ == "__main__":
    main(*sys.argv[1:])
