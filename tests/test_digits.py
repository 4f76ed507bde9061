"""Real images as a pipeline input: scikit-learn's digits (and class folders of PNGs) through a
pixel-space DiT trained from scratch by the DeepSpeed trainer, a classifier feature backbone, the
Neon sweep with repeated evaluation seeds, and the pictures; bad real-data input is one line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from neon_scale.data.real import load_real
from neon_scale.data.shards import read_shards
from neon_scale.io import load_state_dict
from neon_scale.metrics.classifier import ClassifierFeatures, load_classifier, save_classifier, train_classifier

from .conftest import LAUNCHER, ROOT, assert_one_line_error, neon, torchrun

CONFIG = ROOT / "configs" / "digits_dit.yaml"
# The shipped config, shrunk to seconds: same stages and code paths.
SMALL = ["model.args.hidden_size=32", "model.args.depth=1", "model.args.num_heads=2",
         "base.train.save_steps=[6,12]", "base.train.global_batch=32", "base.train.ckpt_every_images=128",
         "base.train.log_every=3",
         "synth.n=40", "synth.shard_size=20", "synth.batch_size=20",
         "train.save_steps=[3]", "train.global_batch=16", "train.log_every=1",
         "eval.n=60", "eval.chunk=30", "eval.sampler={method: ddim, steps: 4}",
         "synth.samplers=[{method: ddim, steps: 4, cfg: 3.0}, {method: ddim, steps: 4, cfg: 0.5}]",
         "sweep.mode=grid", "sweep.w_min=-0.5", "sweep.w_max=0.5", "sweep.w_step=0.5", "sweep.guidance=[1.0, 2.0]",
         "sweep.refine_w=0", "sweep.repeats=2"]


def _sets(*items):
    out = []
    for item in items:
        out += ["--set", item]
    return out


def _digit_folder(root, per_class=8, classes=3, size=None):
    """Class sub-folders of real digit PNGs (grey, 8x8 scaled to 0..255)."""
    real = load_real("digits")
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        idx = (real.labels == c).nonzero().flatten()[:per_class]
        for k, i in enumerate(idx.tolist()):
            Image.fromarray(real.images[i, 0].numpy()).save(folder / f"{k:03d}.png")
    return root


# ------------------------------------------------------------------------------------------- data

def test_builtin_digits_and_split():
    real = load_real("digits")
    assert real.images.shape == (1797, 1, 8, 8) and real.images.dtype == torch.uint8 and real.num_classes == 10
    assert int(real.images.max()) == 255  # 16 -> 255
    train, held = real.split(0.2, seed=0)
    assert len(train) + len(held) == 1797 and not set(train.tolist()) & set(held.tolist())
    for c in range(10):  # a fixed fraction of every class is held out
        members = int((real.labels == c).sum())
        assert int((real.labels[held] == c).sum()) == round(0.2 * members)
    assert torch.equal(real.split(0.2, seed=0)[1], held) and not torch.equal(real.split(0.2, seed=1)[1], held)


def test_class_folder_source(tmp_path):
    real = load_real(str(_digit_folder(tmp_path / "d")))
    assert real.images.shape == (24, 1, 8, 8) and real.num_classes == 3
    assert real.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8


def test_shard_source(tmp_path):
    """Webdataset shards of .png + .cls (e.g. a synth output written with save_images) as real data."""
    from neon_scale.data.shards import write_shard

    real = load_real("digits")
    for c in range(2):
        part = slice(c * 10, (c + 1) * 10)
        write_shard(tmp_path / f"shard-{c:06d}.tar", {"image": real.images[part], "cls": real.labels[part]}, {},
                    key_prefix=f"{c:06d}")
    loaded = load_real(str(tmp_path))
    assert torch.equal(loaded.images, real.images[:20]) and torch.equal(loaded.labels, real.labels[:20])
    assert loaded.num_classes == 10


# ------------------------------------------------------------------------------------- classifier

@pytest.mark.slow  # trains the classifier (minutes)
def test_classifier_backbone_reaches_stated_accuracy(tmp_path):
    """The classifier the sweep trains on the digits' training split: >= 95 % held-out accuracy
    (measured 99.4 % with the default split), saved and reloaded with the same features."""
    real = load_real("digits")
    train, held = real.split(0.2, seed=0)
    net, acc = train_classifier(real.images[train], real.labels[train], real.images[held], real.labels[held], 10)
    assert acc >= 0.95, acc
    save_classifier(tmp_path / "c.safetensors", net, acc, "digits")
    loaded, meta = load_classifier(tmp_path / "c.safetensors")
    assert float(meta["heldout_accuracy"]) == pytest.approx(acc)
    backbone = ClassifierFeatures(str(tmp_path / "c.safetensors"), batch_size=100)
    feats, logits = backbone(real.images[held])
    assert feats.shape == (len(held), backbone.dim) and torch.isfinite(feats).all()
    assert (logits.argmax(1) == real.labels[held]).double().mean().item() == pytest.approx(acc)
    rgb, _ = backbone(real.images[held].repeat(1, 3, 1, 1))  # grey PNGs decoded as RGB: same features
    assert torch.equal(rgb, feats)


# -------------------------------------------------------------------------------------- pipeline

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):  # every stage in about 30 s: in the fast loop too
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    proc = neon("run", "--config", str(CONFIG), "--run-dir", str(run_dir), *_sets(*SMALL), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc.stdout


@pytest.mark.slow  # needs the whole digits run
def test_pixel_dit_through_every_stage(digits_run):
    run_dir, out = digits_run
    cfg = (run_dir / "config.yaml").read_text()
    assert "image_size: 8" in cfg and "channels: 1" in cfg and "num_classes: 10" in cfg  # from the data
    # base: the DeepSpeed trainer on the real training split, checkpoints and metrics as the fine-tune's
    manifest = json.loads((run_dir / "base" / "real" / "manifest.json").read_text())
    assert manifest["n"] == 1438  # 1797 less round(0.2 x count) of each class
    real = read_shards(sorted((run_dir / "base" / "real").glob("shard-*.tar")))
    assert real["x"].shape == (1438, 1, 8, 8) and real["x"].min() >= -1 and real["x"].max() <= 1
    rows = [json.loads(ln) for ln in (run_dir / "base" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert (run_dir / "base" / "theta_r-step000006.safetensors").is_file()
    base = load_state_dict(run_dir / "base" / "model.safetensors")
    assert base["x_embedder.proj.weight"].shape == (32, 1, 4, 4)  # pixel space: 1 input channel, patch 4
    # metric: the classifier and the reference statistics, prepared once
    done = json.loads((run_dir / "metric" / "done.json").read_text())
    assert done["heldout_accuracy"] > 0.9 and done["ref_images"] == 1438
    assert "held-out accuracy" in out
    # sweep: both sampler settings, repeats with standard errors, both pictures
    summary = json.loads((run_dir / "sweep" / "summary.json").read_text())
    assert [s["sampler"]["cfg"] for s in summary] == [3.0, 0.5]
    for s in summary:
        r = s["repeats"]
        assert r["seeds"] == 2 and len(r["w0"]["values"]) == 2 and r["w0"]["se"] >= 0
        assert r["diff"]["mean"] == pytest.approx(r["best"]["mean"] - r["w0"]["mean"])
        assert s["best_guidance"] in (1.0, 2.0) and s["guidance_w0"] in (1.0, 2.0)
    for picture in ("samples.png", "fid_vs_w.png"):
        with Image.open(run_dir / "sweep" / picture) as img:
            assert img.size[0] > 200
    assert "fd_classifier" in out


@pytest.mark.slow  # needs the whole digits run
def test_rerun_skips_everything(digits_run):
    run_dir, _ = digits_run
    proc = neon("run", "--config", str(CONFIG), "--run-dir", str(run_dir), *_sets(*SMALL))
    assert proc.returncode == 0, proc.stderr
    for stage in ("base", "synth", "train", "sweep"):
        assert f"{stage}: complete, skipped" in proc.stdout


@pytest.mark.slow
def test_two_ranks_train_the_base_on_a_class_folder(tmp_path):
    folder = _digit_folder(tmp_path / "digits")
    run_dir = tmp_path / "run"
    proc = torchrun(LAUNCHER, "--config", str(CONFIG), "--run-dir", str(run_dir), "--stage", "base",
                    *_sets(*SMALL, f"data.source={folder}", "data.holdout=0.25"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((run_dir / "base" / "real" / "manifest.json").read_text())["n"] == 18
    state = load_state_dict(run_dir / "base" / "model.safetensors")
    assert state["y_embedder.embedding_table.weight"].shape[0] == 4  # 3 classes + the null class
    assert all(torch.isfinite(v).all() for v in state.values())


# ------------------------------------------------------------------------------------- bad input

@pytest.mark.slow  # neon on the digits config (10-20 s each)
def test_folder_with_mixed_sizes_is_one_line(tmp_path):
    folder = _digit_folder(tmp_path / "d")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "class_1" / "zz.png")
    proc = neon("run", "--config", str(CONFIG), "--run-dir", str(tmp_path / "r"), "--set", f"data.source={folder}")
    assert_one_line_error(proc, "zz.png", "[1, 10, 10]", "[1, 8, 8]", "same size", exit_code=2)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # neon on the digits config (10-20 s each)
def test_folder_without_images_is_one_line(tmp_path):
    (tmp_path / "d" / "empty_class").mkdir(parents=True)
    proc = neon("run", "--config", str(CONFIG), "--run-dir", str(tmp_path / "r"), "--set",
                f"data.source={tmp_path / 'd'}")
    assert_one_line_error(proc, str(tmp_path / "d"), "no images", exit_code=2)
    proc = neon("run", "--config", str(CONFIG), "--run-dir", str(tmp_path / "r"), "--set",
                f"data.source={tmp_path / 'nowhere'}")
    assert_one_line_error(proc, "data.source", "nowhere", "digits", exit_code=2)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # neon on the digits config (10-20 s each)
def test_missing_dinov2_weights_is_one_line(tmp_path):
    proc = neon("run", "--config", str(CONFIG), "--run-dir", str(tmp_path / "r"), "--set", "eval.features=dinov2",
                "--set", f"eval.dinov2_weights={tmp_path / 'dinov2_vitl14_pretrain.pth'}")
    assert_one_line_error(proc, "eval.dinov2_weights", "dinov2_vitl14_pretrain.pth", "file not found", exit_code=2)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # neon on the digits config (10-20 s each)
@pytest.mark.parametrize("override, needles", [
    ("model.args.image_size=16", ["model.args.image_size", "16", "data.source has 8"]),
    ("model.args.num_classes=7", ["model.args.num_classes", "7", "data.source has 10"]),
    ("base.train=null", ["'base.train' is required", "digits"]),
    ("model.args.vae=random", ["training from scratch", "pixel space"]),
    ("eval.sampler={method: ddpm}", ["eval.sampler.method", "learn_sigma"]),
    ("base.random_init=true", ["'base.train' is set", "base.random_init is true"]),
])
def test_config_errors(tmp_path, override, needles):
    proc = neon("run", "--config", str(CONFIG), "--run-dir", str(tmp_path / "r"), "--set", override)
    assert_one_line_error(proc, *needles, exit_code=2)


@pytest.mark.slow  # needs the whole digits run
def test_base_training_resumes_exactly(digits_run, tmp_path):
    """The base is trained by the fine-tune's trainer, so a killed base run resumes exactly: put
    `latest` back to the step-8 checkpoint (as a kill after it would leave it), drop what came
    after, and the re-run ends with the same theta_r, bit for bit."""
    import shutil

    from neon_scale.ckpt_files import tag_of

    run_dir, _ = digits_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    ckpt = copy / "base" / "train" / "ckpt"
    assert (ckpt / tag_of(8)).is_dir()
    (ckpt / "latest").write_text(tag_of(8))
    for path in (copy / "base" / "done.json", copy / "base" / "train" / "done.json", copy / "base" / "model.safetensors"):
        path.unlink()
    proc = neon("base", "--config", str(CONFIG), "--run-dir", str(copy), *_sets(*SMALL))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resuming from step 8" in proc.stdout
    before, after = (load_state_dict(d / "base" / "model.safetensors") for d in (run_dir, copy))
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("learn_sigma, method", [(True, "ddpm"), (True, "ddim"), (False, "ddim")])
def test_pixel_dit_samples_and_trains_with_cfg(learn_sigma, method):
    """Pixel space as latent DiT: the diffusion loss (MSE, + VLB with learned variance) on real
    images in [-1, 1], and DDPM/DDIM with CFG on both sides of 1, giving images of the data's shape."""
    from neon_scale import rng
    from neon_scale.specs.registry import get_spec

    spec = get_spec("dit")
    raw = spec.fit_data({"arch": "S/2", "depth": 1, "hidden_size": 32, "num_heads": 2, "vae": "none",
                         "learn_sigma": learn_sigma}, (1, 8, 8), 10, "test")
    args = spec.parse_args(raw)
    torch.manual_seed(0)
    model = spec.build(args)
    real = load_real("digits")
    batch = {**spec.from_images(real.images[:16], args), "cls": real.labels[:16]}
    assert batch["x"].min() == -1 and batch["x"].max() == 1
    loss = spec.loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.final_layer.linear.weight.grad.abs().sum() > 0  # (zero-initialised)
    for cfg in (0.5, 1.0, 3.0):
        samples = spec.sample(model.eval(), 20, rng.generator(0, cfg), spec.parse_sampler({"method": method, "steps": 4,
                                                                                          "cfg": cfg}))
        images = spec.images(samples, args)
        assert images.shape == (20, 1, 8, 8) and images.dtype == torch.uint8
        assert samples["cls"].tolist() == [i % 10 for i in range(20)]


@pytest.mark.slow  # neon fid with the trained classifier (about 1 min)
def test_neon_fid_with_the_classifier_backbone(tmp_path):
    """`neon fid --features classifier` on grey PNG folders (decoded as RGB, read back as grey):
    FD_classifier and IS from the classifier's logits; a set against itself gives 0."""
    real = load_real("digits")
    net, acc = train_classifier(real.images[:600], real.labels[:600], real.images[600:700], real.labels[600:700], 10,
                                steps=100)
    save_classifier(tmp_path / "c.safetensors", net, acc, "digits")
    for name, part in (("a", slice(0, 40)), ("b", slice(1000, 1040))):
        (tmp_path / name).mkdir()
        for i, img in enumerate(real.images[part]):
            Image.fromarray(img[0].numpy()).save(tmp_path / name / f"{i:03d}.png")
    args = ["--features", "classifier", "--weights", str(tmp_path / "c.safetensors"), "--workers", "0"]
    proc = neon("fid", str(tmp_path / "a"), str(tmp_path / "b"), *args, "--metrics", "fid,isc",
                "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["features"] == "classifier" and result["fd_classifier"] > 0 and result["is_mean"] > 1
    proc = neon("fid", str(tmp_path / "a"), str(tmp_path / "a"), *args, "--json", str(tmp_path / "s.json"))
    assert proc.returncode == 0, proc.stderr
    # 40 samples in 64 dimensions: a rank-deficient covariance, whose eigenvalue square roots round to ~1e-5
    assert abs(json.loads((tmp_path / "s.json").read_text())["fd_classifier"]) < 1e-4 * result["fd_classifier"]
