"""Bad input through the real `neon` command: one line naming what and where, exit != 0, no
traceback (unless --debug), nothing half-written."""
import pytest
from safetensors.torch import save_file

from .conftest import TOY, assert_one_line_error, neon, small_overrides


@pytest.mark.parametrize("override, needles", [
    ("trian.lr=1e-5", ["unknown key 'trian'", "did you mean 'train'"]),
    ("train.lr=fast", ["'train.lr' must be float, got 'fast'", "toy2d.yaml"]),
    ("sweep.w_min=3.0", ["empty w grid", "w_min=3.0"]),
])
def test_config_errors(run_dir, override, needles):
    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), "--set", override)
    assert_one_line_error(proc, *needles, exit_code=2)
    assert not run_dir.exists()


def test_missing_config_file(run_dir, tmp_path):
    proc = neon("run", "--config", str(tmp_path / "missing.yaml"), "--run-dir", str(run_dir))
    assert_one_line_error(proc, "missing.yaml: config file not found", exit_code=2)
    assert not run_dir.exists()


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_debug_shows_the_traceback(run_dir):
    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), "--set", "trian.lr=1", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "NeonError" in proc.stderr


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_weights_file_with_a_missing_key(run_dir, tmp_path):
    from neon_scale.specs.registry import get_spec

    spec = get_spec("toy2d_diffusion")
    state = spec.build(spec.parse_args({})).state_dict()
    del state["net.9.bias"]
    weights = tmp_path / "base.safetensors"
    save_file(state, str(weights))
    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), "--stage", "base",
                "--set", f"base.weights={weights}")
    assert_one_line_error(proc, str(weights), "missing key 'net.9.bias'", exit_code=2)
    assert not (run_dir / "base" / "model.safetensors").exists()
    assert not (run_dir / "base" / "done.json").exists()


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_stage_without_its_inputs(run_dir):
    proc = neon("train", "--config", str(TOY), "--run-dir", str(run_dir))
    assert_one_line_error(proc, "stage 'train' needs the output of 'synth'", exit_code=2)


@pytest.mark.slow  # neon train on a corrupt shard (about 8 s)
def test_truncated_shard_stops_train_naming_the_shard(run_dir):
    args = ["--config", str(TOY), "--run-dir", str(run_dir), *small_overrides()]
    proc = neon("run", "--stage", "base", "--stage", "synth", *args)
    assert proc.returncode == 0, proc.stderr
    shard = run_dir / "synth" / "zeta_1.1" / "shard-000002.tar"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 3])
    proc = neon("train", *args)
    assert_one_line_error(proc, str(shard), "corrupt or truncated shard", exit_code=2)
    assert not list((run_dir / "train").rglob("*.safetensors"))
    assert not list((run_dir / "train").rglob("done.json"))


def test_help_explains_commands():
    proc = neon("--help")
    assert proc.returncode == 0
    for word in ("run", "synth", "train", "sweep"):
        assert word in proc.stdout
    proc = neon("run", "--help")
    assert "--set" in proc.stdout and "--config" in proc.stdout
