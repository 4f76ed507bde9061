import pytest

from neon_scale.config import load_config
from neon_scale.errors import NeonError

from .conftest import TOY


def test_toy_config_loads_with_overrides():
    cfg = load_config(str(TOY), ["train.lr=3e-5", "sweep.w_step=0.5", "synth.samplers=[{zeta: 1.2}]"])
    assert cfg.name == "toy2d" and cfg.run_dir.endswith("runs/toy2d")
    assert cfg.train.lr == 3e-5 and cfg.synth.samplers == [{"zeta": 1.2}]
    grid = cfg.sweep.w_grid()
    assert grid[0] == -2.0 and grid[-1] == 2.0 and 0.0 in grid and len(grid) == 9


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(NeonError, match=r"unknown key 'train.learning_rat'.*did you mean 'train.lr'|unknown key 'train.learning_rat'"):
        load_config(str(TOY), ["train.learning_rat=1e-5"])
    with pytest.raises(NeonError, match=r"unknown key 'sweep.w_stpe' \(did you mean 'sweep.w_step'\?\)"):
        load_config(str(TOY), ["sweep.w_stpe=0.5"])


def test_unknown_top_level_and_sampler_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TOY.read_text() + "\ntrian: {lr: 1.0}\n")
    with pytest.raises(NeonError, match=rf"{bad}: unknown key 'trian' \(did you mean 'train'\?\)"):
        load_config(str(bad))
    with pytest.raises(NeonError, match=r"unknown key 'synth.samplers\[0\].zetta' \(did you mean 'synth.samplers\[0\].zeta'\?\)"):
        load_config(str(TOY), ["synth.samplers=[{zetta: 1.1}]"])


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", r"'train.lr' must be float, got 'fast'"),
    ("train.zero_stage=2.5", r"'train.zero_stage' must be int, got 2.5"),
    ("train.zero_stage=4", r"'train.zero_stage' = 4 is above the maximum 3"),
    ("eval.n=0", r"'eval.n' = 0 is below the minimum 2"),
    ("train.dtype=fp8", r"'train.dtype' = 'fp8' is not one of"),
    ("synth.samplers=[{zeta: -1}]", r"'synth.samplers\[0\].zeta' = -1.0 is below the minimum 0.0"),
    ("train.save_steps=[0, 5]", r"'train.save_steps' must be a non-empty list of positive integers"),
])
def test_wrong_type_or_range_names_key_and_value(override, message):
    with pytest.raises(NeonError, match=message):
        load_config(str(TOY), [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(NeonError, match=r"nope.yaml: config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("override", ["sweep.w_max=-3.0", "sweep.w_step=0"])
def test_empty_w_grid(override):
    with pytest.raises(NeonError, match="empty w grid"):
        load_config(str(TOY), [override])


def test_unknown_model_name():
    with pytest.raises(NeonError, match=r"unknown model 'model.name' = 'toy2d_difusion' \(did you mean 'toy2d_diffusion'\?\)"):
        load_config(str(TOY), ["model.name=toy2d_difusion"])


@pytest.mark.parametrize("overrides, message", [
    (["sweep.mode=race", "eval.chunk=1000", "sweep.race.n0=1500"],
     r"'sweep.race.n0' = 1500 must be a multiple of eval.chunk = 1000"),
    (["sweep.mode=race", "eval.n=4000", "eval.chunk=1000", "sweep.race.n0=8000"], r"and at most eval.n = 4000"),
    (["sweep.race.z=-1"], r"'sweep.race.z' = -1.0 is below the minimum 0"),
    (["sweep.race.n00=5"], r"unknown key 'sweep.race.n00' \(did you mean 'sweep.race.n0'\?\)"),
])
def test_race_settings_that_cannot_work_are_named(overrides, message):
    with pytest.raises(NeonError, match=message):
        load_config(str(TOY), overrides)


def test_race_settings_load():
    cfg = load_config(str(TOY), ["sweep.mode=race", "eval.chunk=5000", "sweep.race.n0=5000", "sweep.race.z=3"])
    assert (cfg.sweep.mode, cfg.sweep.race.n0, cfg.sweep.race.z, cfg.sweep.tol) == ("race", 5000, 3.0, 0.003)
