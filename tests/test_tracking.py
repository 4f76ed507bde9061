"""Training and sweep curves (neon_scale.tracking): real TensorBoard event files, read back with
TensorBoard's own EventAccumulator; one toy run through `neon run` shared by the run tests."""
import json
import shutil

import pytest

from neon_scale.config import RunConfig
from neon_scale.errors import NeonError
from neon_scale.stages.common import sampler_tag
from neon_scale.tracking import WANDB_MISSING, open_tracker, tb_dir, wandb_available

from .conftest import TOY, neon, small_overrides


def read_events(folder):
    """Every scalar tag of a TensorBoard folder -> [(step, value)] in write order, and image tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, acc.Tags()["images"]


def figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig


# ------------------------------------------------------------------------------ the tracker

def test_scalars_and_figure_read_back(tmp_path):
    fig = figure()
    with open_tracker(tmp_path, RunConfig(), "train/zeta=1.1", config={"train": {"lr": 1e-5}}) as tracker:
        assert tracker.log_dir == tmp_path / "tb" / "train" / "zeta=1.1"
        for step in (3, 6, 9):
            tracker.scalars("train", {"loss": 1.0 / step, "lr": None, "grad_norm": 0.5 * step}, step)
        tracker.figure("fid_vs_w", fig, 0)
        tracker.flush()  # what a kill after a flush keeps: readable without close
        scalars, images = read_events(tracker.log_dir)
        assert scalars["train/loss"] == [(s, pytest.approx(1.0 / s, rel=1e-6)) for s in (3, 6, 9)]
    tracker.close()  # a second close is harmless
    scalars, images = read_events(tmp_path / "tb" / "train" / "zeta=1.1")
    assert set(scalars) == {"train/loss", "train/grad_norm"}  # None (lr) skipped
    assert scalars["train/grad_norm"] == [(s, pytest.approx(0.5 * s)) for s in (3, 6, 9)]
    assert images == ["fid_vs_w"]
    tracker.scalars("train", {"loss": 1.0}, 12)  # after close: nothing, no error


def test_closed_on_error_inside_with(tmp_path):
    with pytest.raises(RuntimeError, match="stage failed"):
        with open_tracker(tmp_path, RunConfig(), "sweep") as tracker:
            tracker.scalars("a", {"m": 2.0}, -750)  # sweep steps go negative: w = -0.75
            raise RuntimeError("stage failed")
    assert not tracker.active
    assert read_events(tmp_path / "tb" / "sweep")[0] == {"a/m": [(-750, 2.0)]}


def test_step_must_be_an_integer(tmp_path):
    with open_tracker(tmp_path, RunConfig(), "sweep") as tracker, pytest.raises(TypeError):
        tracker.scalars("a", {"m": 1.0}, 0.25)


def test_folder_names_stay_under_tb(tmp_path):
    assert tb_dir(tmp_path, "train/zeta=1.1,steps=20") == tmp_path / "tb" / "train" / "zeta=1.1,steps=20"
    assert tb_dir(tmp_path, "../x y/..") == tmp_path / "tb" / "__" / "x_y" / "__"
    assert tb_dir(tmp_path, "base") == tmp_path / "tb" / "base"


def test_resume_hides_the_killed_runs_later_steps(tmp_path):
    with open_tracker(tmp_path, RunConfig(), "base") as tracker:
        for step in range(10):
            tracker.scalars("train", {"loss": float(step)}, step)
    with open_tracker(tmp_path, RunConfig(), "base", purge_step=5) as tracker:  # resumed from step 5
        for step in range(5, 8):
            tracker.scalars("train", {"loss": 100.0 + step}, step)
    loss = read_events(tmp_path / "tb" / "base")[0]["train/loss"]
    assert loss == [(s, float(s)) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 8)]


def test_fresh_drops_earlier_events(tmp_path):
    for values in ({"m": 1.0}, {"m": 2.0}):
        with open_tracker(tmp_path, RunConfig(), "sweep", fresh=True) as tracker:
            tracker.scalars("c", values, 500)
    assert len(list((tmp_path / "tb" / "sweep").glob("events.out.tfevents.*"))) == 1
    assert read_events(tmp_path / "tb" / "sweep")[0] == {"c/m": [(500, 2.0)]}


def test_no_op_on_ranks_other_than_0(tmp_path, monkeypatch):
    # what torchrun sets; the process group is not needed: dist.rank() reads RANK until it exists
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with open_tracker(tmp_path, RunConfig(wandb=True), "train/zeta=1.1") as tracker:  # wandb: not even checked
        assert not tracker.active and tracker.log_dir is None
        tracker.scalars("train", {"loss": 1.0}, 1)
        tracker.figure("f", figure(), 0)
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_off_writes_nothing(tmp_path):
    with open_tracker(tmp_path, RunConfig(tensorboard=False), "sweep", config={"a": 1}) as tracker:
        assert not tracker.active
        tracker.scalars("c", {"m": 1.0}, 0)
        tracker.figure("f", figure(), 0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a fresh process (about 4 s)
@pytest.mark.skipif(wandb_available(), reason="the wandb package is installed")
def test_wandb_requested_but_not_installed(tmp_path):
    with pytest.raises(NeonError, match="wandb package is not installed"):
        open_tracker(tmp_path, RunConfig(wandb=True), "sweep")
    assert list(tmp_path.iterdir()) == []  # checked before the TensorBoard folder is made
    run_dir = tmp_path / "run"
    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), "--set", "run.wandb=true")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert WANDB_MISSING in lines[0], lines[0]
    assert not run_dir.exists()


def test_wandb_offline(tmp_path):
    """Only where wandb is installed (not in the pinned stack): an offline run with our keys and
    the custom step axis that lets w x 1000 go back and forth."""
    pytest.importorskip("wandb")
    run_dir = tmp_path / "myrun"
    with open_tracker(run_dir, RunConfig(tensorboard=False, wandb=True), "sweep", config={"a": 1}) as tracker:
        for step, value in ((0, 3.0), (500, 2.0), (-500, 2.5)):
            tracker.scalars("zeta=1.1/step-6", {"fd": value}, step)
        tracker.figure("fid_vs_w", figure(), 0)
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()  # protobuf records: the strings are stored as they are
    for needle in (b"myrun/sweep", b"zeta=1.1/step-6/fd", b"-500", b"fid_vs_w"):
        assert needle in data, needle
    assert not (run_dir / "tb").exists()


# ------------------------------------------------------------------------------ a toy run

@pytest.fixture(scope="module")
def toy_run(small_toy_run):
    """The session's small toy run (every stage, 2 samplers x 2 save steps)."""
    return small_toy_run[0]


def curve_from_results(run_dir) -> dict[str, dict[int, float]]:
    """results.jsonl's selection points (the curve) as {tag: {round(w x 1000): metric}}."""
    rows = [json.loads(line) for line in (run_dir / "sweep" / "results.jsonl").read_text().splitlines()]
    n = json.loads((run_dir / "sweep" / "summary.json").read_text())[0]["n"]
    curve: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["n"] == n and "seed" not in r:
            tag = f"{r['checkpoint']}/{r['metric_name']}" + (f"/g={r['guidance']}" if "guidance" in r else "")
            curve.setdefault(tag, {})[round(r["w"] * 1000)] = r["metric"]
    return curve


def assert_sweep_curve(run_dir):
    scalars, images = read_events(run_dir / "tb" / "sweep")
    expected = curve_from_results(run_dir)
    assert len(expected) == 4  # 2 samplers x 2 save steps
    curves = {tag: points for tag, points in scalars.items() if not tag.startswith("summary/")}
    assert set(curves) == set(expected)
    for tag, points in curves.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: a w logged twice"
        assert dict(points) == pytest.approx(expected[tag], rel=1e-6), tag  # float32 in the event file
    assert images == ["fid_vs_w"]
    return scalars


@pytest.mark.slow  # needs the whole small toy run
def test_sweep_curve_equals_results(toy_run):
    scalars = assert_sweep_curve(toy_run)
    summary = json.loads((toy_run / "sweep" / "summary.json").read_text())
    for s in summary:
        group = f"summary/{sampler_tag(s['sampler'])}"
        assert dict(scalars[f"{group}/best_w"])[s["steps"]] == pytest.approx(s["best_w"])
        assert dict(scalars[f"{group}/best_fd"])[s["steps"]] == pytest.approx(s["best_metric"], rel=1e-6)
        assert dict(scalars[f"{group}/fd_w0"])[s["steps"]] == pytest.approx(s["metric_w0"], rel=1e-6)
        assert dict(scalars[f"{group}/best_fd_se"])[s["steps"]] == pytest.approx(s["best_se"], rel=1e-6)
        assert dict(scalars[f"{group}/diff_se"])[s["steps"]] == pytest.approx(s["diff"]["se"], rel=1e-6)


@pytest.mark.slow  # needs the whole small toy run
def test_resumed_sweep_draws_the_whole_curve_once(toy_run, tmp_path):
    """A sweep killed after a few points: the rerun logs the cached ones too, into a fresh file."""
    run_dir = tmp_path / "run"
    shutil.copytree(toy_run, run_dir)
    results = run_dir / "sweep" / "results.jsonl"
    results.write_text("".join(results.read_text().splitlines(keepends=True)[:5]))
    for name in ("done.json", "summary.json", "fid_vs_w.png"):
        (run_dir / "sweep" / name).unlink()
    proc = neon("sweep", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list((run_dir / "tb" / "sweep").glob("events.out.tfevents.*"))) == 1
    assert_sweep_curve(run_dir)
    assert curve_from_results(run_dir) == curve_from_results(toy_run)


@pytest.mark.slow  # needs the whole small toy run
def test_train_loss_curve_equals_metrics(toy_run):
    for sampler in ("zeta_1.1", "zeta_0.9"):
        rows = [json.loads(line) for line in (toy_run / "train" / sampler / "metrics.jsonl").read_text().splitlines()]
        scalars, _ = read_events(toy_run / "tb" / "train" / sampler)
        assert dict(scalars["train/loss"]) == pytest.approx({r["step"]: r["loss"] for r in rows}, rel=1e-6)
