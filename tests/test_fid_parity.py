"""`neon fid` and the in-memory FID path against torch-fidelity 0.4's `calculate_metrics`, on the same
images and the same (random, batch-norm-calibrated) InceptionV3 weights file: FID and IS to 1e-4
relative. Also: every input form gives the same statistics, and saved stats reproduce the FID."""
import json

import numpy as np
import pytest
import torch
import torch_fidelity

from neon_scale.metrics.features import FeatureStats, InceptionFeatures
from neon_scale.metrics.fid import frechet_distance, read_stats, write_stats
from neon_scale.metrics.scores import inception_score

from .conftest import UInt8Images, neon

REL = 1e-4


def rel(a, b):
    return abs(a - b) / abs(b)


def fidelity(input1, input2, weights, **metrics):
    return torch_fidelity.calculate_metrics(input1=input1, input2=input2, cuda=False, verbose=False, cache=False,
                                            feature_extractor_weights_path=str(weights), **metrics)


@pytest.mark.slow  # InceptionV3 on CPU (the random weights made first)
def test_folder_inputs_match_torch_fidelity(image_sets, inception_weights, tmp_path):
    gen, ref = image_sets
    out = tmp_path / "fid.json"
    proc = neon("fid", str(gen), str(ref), "--weights", str(inception_weights), "--metrics", "fid,isc",
                "--batch-size", "16", "--workers", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(out.read_text())
    theirs = fidelity(str(gen), str(ref), inception_weights, fid=True, isc=True)
    assert ours["n"] == {"input1": 24, "input2": 20}
    assert ours["fid"] > 1.0 and ours["is_mean"] > 1.05  # features are not degenerate
    assert rel(ours["fid"], theirs["frechet_inception_distance"]) <= REL
    assert rel(ours["is_mean"], theirs["inception_score_mean"]) <= REL
    assert rel(ours["is_std"], theirs["inception_score_std"]) <= 1e-3
    assert "fid" in proc.stdout and "is_mean" in proc.stdout


def _random_images(n, seed, h, w, scale):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (up * 255 * scale + torch.rand(n, 3, h, w, generator=g) * 40).clamp(0, 255).to(torch.uint8)


@pytest.mark.slow  # InceptionV3 on CPU (the random weights made first)
def test_in_memory_batches_match_torch_fidelity(inception_weights):
    gen, ref = _random_images(30, 0, 37, 53, 0.9), _random_images(22, 1, 64, 64, 0.6)
    features = InceptionFeatures(str(inception_weights), batch_size=8)
    stats = {}
    for name, images in (("gen", gen), ("ref", ref)):
        acc = FeatureStats(keep_logits=True)
        for start in range(0, len(images), 7):  # batches as a sampler would hand them over
            batch = images[start:start + 7]
            acc.add_images(features, batch, torch.arange(start, start + len(batch)))
        stats[name] = acc.finish()
    fid = frechet_distance(stats["gen"]["mu"], stats["gen"]["sigma"], stats["ref"]["mu"], stats["ref"]["sigma"])
    is_mean, _ = inception_score(stats["gen"]["logits"])
    theirs = fidelity(UInt8Images(gen), UInt8Images(ref), inception_weights, fid=True, isc=True)
    assert rel(fid, theirs["frechet_inception_distance"]) <= REL
    assert rel(is_mean, theirs["inception_score_mean"]) <= REL
    # NHWC input (as decoded images arrive) gives the same features
    nhwc = FeatureStats()
    nhwc.add_images(features, gen.permute(0, 2, 3, 1).contiguous(), torch.arange(len(gen)), layout="nhwc")
    np.testing.assert_allclose(nhwc.finish()["mu"], stats["gen"]["mu"], rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # InceptionV3 on CPU (the random weights made first)
def test_every_input_form_gives_the_same_statistics(image_sets, inception_weights, tmp_path):
    from neon_scale.data.shards import write_shard
    from neon_scale.metrics.inputs import FolderSource

    gen, ref = image_sets
    images = np.stack([FolderSource(gen).load(i) for i in range(24)])
    np.savez(tmp_path / "samples.npz", arr_0=images)
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, part in enumerate((images[:10], images[10:])):
        chw = torch.from_numpy(part).permute(0, 3, 1, 2)  # the synth stage's image field is [N, C, H, W]
        write_shard(shards / f"shard-{k:05d}.tar", {"image": chw, "cls": torch.arange(len(part))}, {}, f"s{k}")
    stats = tmp_path / "ref_stats.npz"
    common = ["--weights", str(inception_weights), "--batch-size", "16", "--workers", "0"]
    proc = neon("fid", str(ref), "--save-stats", str(stats), "--metrics", "isc", *common)
    assert proc.returncode == 0, proc.stderr
    mu, sigma = read_stats(stats)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    fids = {}
    for form in (str(gen), str(tmp_path / "samples.npz"), str(shards)):
        out = tmp_path / "out.json"
        proc = neon("fid", form, "--ref", str(stats), "--json", str(out), *common)
        assert proc.returncode == 0, proc.stderr
        fids[form] = json.loads(out.read_text())
        assert fids[form]["n"]["input1"] == 24
    values = [r["fid"] for r in fids.values()]
    assert max(values) - min(values) <= 1e-6 * values[0], values
    proc = neon("fid", str(gen), str(ref), "--json", str(out), *common)  # stats file == images folder
    assert rel(json.loads(out.read_text())["fid"], values[0]) <= 1e-9


def test_stats_roundtrip_and_dimension_check(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    write_stats(tmp_path / "a.npz", a.mean(0), np.cov(a.T), 50)
    mu, sigma = read_stats(tmp_path / "a.npz")
    assert np.array_equal(mu, a.mean(0)) and np.array_equal(sigma, np.cov(a.T))
    with np.load(tmp_path / "a.npz") as f:  # the ADM layout: plain mu / sigma arrays
        assert f["mu"].dtype == np.float64 and int(f["n"]) == 50


@pytest.mark.slow  # InceptionV3 on CPU (the random weights made first)
@pytest.mark.parametrize("metrics", ["fid", "kid"])
def test_metric_needs_a_second_input(image_sets, inception_weights, metrics):
    from .conftest import assert_one_line_error

    proc = neon("fid", str(image_sets[0]), "--weights", str(inception_weights), "--metrics", metrics)
    assert_one_line_error(proc, "needs a second input", exit_code=2)
