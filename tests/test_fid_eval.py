"""The sweep's in-memory evaluation of an image model: uint8 samples go straight from the sampler to
the Inception extractor (no PNG round trip) and the FID equals torch-fidelity's on the same images
against the same reference statistics."""
import pytest
import torch
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import (
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.utils import get_featuresdict_from_dataset

from neon_scale import rng
from neon_scale.metrics.backbones import load_backbone
from neon_scale.metrics.fid import read_stats, write_stats
from neon_scale.stages.evaluate import SampleMetric, evaluate
from neon_scale.specs.base import ModelSpec

from .conftest import UInt8Images

pytestmark = pytest.mark.slow  # InceptionV3 on CPU against torch-fidelity (1-2 min): not in the fast loop


class _Upsampler(torch.nn.Module):
    """A stand-in generator: noise [n, 3, 6, 6] -> uint8 images [n, 3, 40, 36]."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(0.8))

    def forward(self, z):
        up = torch.nn.functional.interpolate(z, size=(40, 36), mode="bilinear", align_corners=False)
        return (up * 255 * self.gain).clamp(0, 255).to(torch.uint8)


class _TinyImageSpec(ModelSpec):
    name = "tiny-images-test"
    makes_images = True

    def build(self, args):
        return _Upsampler()

    def loss(self, model, batch, gen):
        raise AssertionError("an evaluation never trains")

    def sample(self, model, n, gen, sampler, start=0):
        return {"image": model(torch.rand(n, 3, 6, 6, generator=gen))}

    def images(self, samples, args):
        return samples["image"]


def _fidelity_stats(extractor, dataset):
    feats = get_featuresdict_from_dataset(dataset, extractor, 16, False, True, False)["2048"]
    return fid_features_to_statistics(feats)


def test_image_model_eval_matches_torch_fidelity(image_sets, inception_weights, tmp_path):
    ref_folder = image_sets[1]
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(inception_weights))
    ref = _fidelity_stats(extractor, ImagesPathDataset(sorted(str(p) for p in ref_folder.glob("*.png"))))
    write_stats(tmp_path / "ref.npz", ref["mu"], ref["sigma"], 20)

    spec, model = _TinyImageSpec(), _Upsampler()
    backbone = load_backbone("inception", str(inception_weights), batch_size=8)
    ours = evaluate(SampleMetric(spec, backbone, read_stats(tmp_path / "ref.npz")), model, None, n=30, seed=5, chunk=12).metric

    images = torch.cat([spec.sample(model, c, rng.generator(5, "eval", i), None)["image"]
                        for i, c in enumerate((12, 12, 6))])
    theirs = fid_statistics_to_metric(_fidelity_stats(extractor, UInt8Images(images)), ref, False)
    theirs = theirs["frechet_inception_distance"]
    assert ours > 1.0
    assert abs(ours - theirs) <= 1e-4 * theirs, (ours, theirs)
