"""`neon fid` on hostile and broken inputs: a stats `sigma` that is no covariance, backbone weights
holding NaN/inf, metrics that come out non-finite, an input left with fewer than 2 images. Each is
one error line naming the file (and key or metric), exit 2, and no --json / --save-stats file."""

import numpy as np
import pytest
import torch

from .conftest import assert_one_line_error, neon, write_image_set

pytestmark = pytest.mark.slow  # neon fid runs on random Inception weights (3-40 s each): not in the fast loop


@pytest.fixture
def outs(tmp_path):
    """(folder, its --json/--save-stats args): the folder must stay empty when the run is refused."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder, ["--json", str(folder / "result.json"), "--save-stats", str(folder / "stats.npz")]


def assert_refused(proc, folder, *needles):
    assert_one_line_error(proc, *needles, exit_code=2)
    assert proc.returncode == 2, proc.stderr
    assert not any(folder.iterdir()), sorted(folder.iterdir())  # no output, no temporary file either


def _stats(path, sigma, mu=None):
    np.savez(path, mu=np.zeros(len(sigma)) if mu is None else mu, sigma=sigma)
    return str(path)


def _indefinite(d):
    """Symmetric, eigenvalues 1 .. 0.1 and -1e-3 (small, but far beyond rounding), in a basis turned
    by a Householder reflection so that no diagonal entry gives it away."""
    v = np.random.default_rng(0).normal(size=d)
    h = np.eye(d) - 2 * np.outer(v, v) / (v @ v)
    return (h * np.r_[np.linspace(1.0, 0.1, d - 1), -1e-3]) @ h


def _asymmetric(d):
    s = np.eye(d)
    s[0, 1] = 1e-3
    return s


@pytest.mark.parametrize("sigma, needles", [
    (lambda d: -np.eye(d), ["not positive semi-definite", "smallest eigenvalue -1"]),
    (_indefinite, ["not positive semi-definite", "smallest eigenvalue -0.001"]),
    (_asymmetric, ["not symmetric", "max |sigma - sigma^T| = 0.001"]),
], ids=["minus_identity", "indefinite", "asymmetric"])
def test_ref_sigma_not_a_covariance(sigma, needles, image_sets, inception_weights, tmp_path, outs):
    ref = _stats(tmp_path / "ref.npz", sigma(2048))
    proc = neon("fid", str(image_sets[0]), "--ref", ref, "--weights", str(inception_weights), *outs[1])
    assert_refused(proc, outs[0], "ref.npz: 'sigma'", *needles)


@pytest.mark.parametrize("bad_role", ["input", "input2"])
def test_stats_inputs_sigma_checked(bad_role, inception_weights, tmp_path, outs):
    bad, good = _stats(tmp_path / "bad.npz", -np.eye(8)), _stats(tmp_path / "good.npz", np.eye(8))
    pair = (bad, good) if bad_role == "input" else (good, bad)
    proc = neon("fid", *pair, "--weights", str(inception_weights), "--json", str(outs[0] / "result.json"))
    assert_refused(proc, outs[0], "bad.npz: 'sigma' is not positive semi-definite")


def test_own_stats_files_pass(inception_weights, tmp_path):
    """A stats file `--save-stats` writes (10 images in 2048-d: rank-deficient, its zero eigenvalues
    negative by rounding) passes the covariance check, as written and stored as float32 as other
    tools do. (No FID here: its 2048-d eigvals is slow; test_fid_parity runs such a file as --ref.)"""
    from neon_scale.metrics.fid import read_stats

    gen = write_image_set(tmp_path / "gen", 10, seed=3, brightness=1.0)
    proc = neon("fid", str(gen), "--metrics", "isc", "--save-stats", str(tmp_path / "gen.npz"),
                "--weights", str(inception_weights), "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    mu, sigma = read_stats(tmp_path / "gen.npz")
    assert np.linalg.eigvalsh(sigma)[0] < 0  # the rounding the tolerance is there for
    _stats(tmp_path / "gen32.npz", sigma.astype(np.float32), mu.astype(np.float32))
    assert read_stats(tmp_path / "gen32.npz")[1].shape == (2048, 2048)


def _inception_nan(inception_weights, tmp_path):
    path = tmp_path / "hostile.pth"
    state = torch.load(inception_weights, weights_only=True)
    state["Mixed_7c.branch1x1.conv.weight"][0, 0, 0, 0] = float("nan")
    state["Conv2d_2a_3x3.bn.running_var"][3] = float("inf")  # earlier in the file: the one named
    torch.save(state, path)
    return path, [], "Conv2d_2a_3x3.bn.running_var' holds 1 non-finite value(s)"


def _dinov2_nan(_, tmp_path):
    from safetensors.torch import load_file, save_file

    from neon_scale.metrics.dinov2 import random_dinov2_weights

    path = tmp_path / "hostile.safetensors"
    random_dinov2_weights(path, (64, 1))
    state = load_file(str(path))
    state["blocks.0.attn.qkv.weight"][:2] = float("nan")
    save_file(state, str(path))
    return path, ["--features", "dinov2"], f"blocks.0.attn.qkv.weight' holds {2 * 64} non-finite value(s)"


def _classifier_nan(_, tmp_path):
    from neon_scale.metrics.classifier import SmallCNN, save_classifier

    net = SmallCNN(3, 8, 10)
    net.fc.bias.data[5] = -float("inf")
    path = tmp_path / "hostile.safetensors"
    save_classifier(path, net, 0.5, "test")
    return path, ["--features", "classifier"], "fc.bias' holds 1 non-finite value(s)"


@pytest.mark.parametrize("make", [_inception_nan, _dinov2_nan, _classifier_nan],
                         ids=["inception", "dinov2", "classifier"])
def test_weights_with_nan_or_inf(make, image_sets, inception_weights, tmp_path, outs):
    weights, features, needle = make(inception_weights, tmp_path)
    proc = neon("fid", *(str(p) for p in image_sets), "--weights", str(weights), *features, *outs[1])
    assert_refused(proc, outs[0], f"{weights.name} (", needle)


def test_non_finite_fid_from_stats(inception_weights, tmp_path, outs):
    """sigma = 1e200 I is a valid covariance, but sigma1 @ sigma2 overflows float64: no FID, and no NaN
    in the JSON (the old code raised LinAlgError)."""
    a, b = _stats(tmp_path / "a.npz", 1e200 * np.eye(4)), _stats(tmp_path / "b.npz", 1e200 * np.eye(4))
    proc = neon("fid", a, b, "--weights", str(inception_weights), "--json", str(outs[0] / "result.json"))
    assert_refused(proc, outs[0], "fid = nan for", "a.npz and", "b.npz", "nothing written")


def test_non_finite_inception_score(image_sets, inception_weights, tmp_path, outs):
    """Finite weights whose logits overflow float32 (pool features are >= 0): IS is NaN (it used to
    reach the JSON as a bare NaN)."""
    state = torch.load(inception_weights, weights_only=True)
    state["fc.weight"] = torch.full_like(state["fc.weight"], 3e38)
    torch.save(state, tmp_path / "huge_fc.pth")
    proc = neon("fid", str(image_sets[0]), "--metrics", "isc", "--weights", str(tmp_path / "huge_fc.pth"),
                "--workers", "0", *outs[1])
    assert_refused(proc, outs[0], "is_mean = nan", str(image_sets[0]), "huge_fc.pth", "nothing written")


def test_non_finite_features(image_sets, inception_weights, tmp_path, outs):
    """A negative batch-norm variance is finite in the file but NaN once folded: the features are
    NaN; one line names the input and the weights."""
    state = torch.load(inception_weights, weights_only=True)
    state["Conv2d_1a_3x3.bn.running_var"].fill_(-1.0)
    torch.save(state, tmp_path / "negvar.pth")
    proc = neon("fid", *(str(p) for p in image_sets), "--weights", str(tmp_path / "negvar.pth"),
                "--workers", "0", *outs[1])
    assert_refused(proc, outs[0], f"{image_sets[0]}: the inception features contain NaN/inf", "negvar.pth")


def test_fewer_than_two_images(image_sets, inception_weights, tmp_path, outs):
    """One image left after --skip-bad (INPUT2): the line names that input and the skipped count;
    a one-image folder (INPUT) names its path."""
    two = write_image_set(tmp_path / "two", 2, seed=4, brightness=1.0)
    few = write_image_set(tmp_path / "few", 3, seed=5, brightness=1.0)
    for name in ("00000.png", "00002.png"):
        (few / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    common = ["--weights", str(inception_weights), "--workers", "0", *outs[1]]
    proc = neon("fid", str(two), str(few), "--skip-bad", *common)
    assert_refused(proc, outs[0], f"{few}: need at least 2 samples for a covariance, got 1",
                   "(2 unreadable image(s) skipped by --skip-bad)")
    one = write_image_set(tmp_path / "one", 1, seed=6, brightness=1.0)
    proc = neon("fid", str(one), str(image_sets[1]), *common)
    assert_refused(proc, outs[0], f"{one}: need at least 2 samples for a covariance, got 1")
