"""A user's DeepSpeed JSON: checked right after the config is loaded, before any stage (one line
naming file and key; loading the config itself never imports DeepSpeed), then
merged into the engine config (its values win; batch sizes must agree)."""
import json
import subprocess
import sys

import pytest

from neon_scale.config import load_config
from neon_scale.errors import NeonError
from neon_scale.train.deepspeed_config import check_user_json, deepspeed_config

from .conftest import TOY, assert_one_line_error, neon, small_overrides


def _write(tmp_path, user: dict):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    return path


def test_user_json_is_merged_and_its_values_win(tmp_path):
    path = _write(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1000, "overlap_comm": False},
                             "gradient_clipping": 0.5, "train_batch_size": 1000})
    ds = deepspeed_config(load_config(str(TOY), [f"train.deepspeed_json={path}"]).train, world=2)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "allgather_bucket_size": 50_000_000,
                                       "overlap_comm": False}  # ours, the user's values winning
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == 500
    assert ds["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_memory_defaults_are_valid_deepspeed_settings(stage):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = deepspeed_config(load_config(str(TOY), [f"train.zero_stage={stage}"]).train, world=2)["zero_optimization"]
    parsed = DeepSpeedZeroConfig(**zero)  # DeepSpeed's own model: a misspelt key or bad value fails here
    assert parsed.stage == stage
    if stage == 3:
        assert parsed.sub_group_size == 50_000_000 and parsed.max_live_parameters == 100_000_000
    if stage >= 1:
        assert parsed.reduce_bucket_size == 50_000_000


@pytest.mark.parametrize("user, message", [
    ({"zero_optimisation": {"stage": 2}}, r"unknown DeepSpeed key 'zero_optimisation' \(did you mean 'zero_optimization'\?\)"),
    ({"zero_optimization": {"stagee": 2}}, r"zero_optimization.stagee: Extra inputs are not permitted"),
])
def test_unknown_keys_fail_with_the_config(tmp_path, user, message):
    path = _write(tmp_path, user)
    with pytest.raises(NeonError, match=rf"{path}: {message}"):
        check_user_json(load_config(str(TOY), [f"train.deepspeed_json={path}"]))


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_loading_a_config_never_imports_deepspeed(tmp_path):
    path = _write(tmp_path, {"zero_optimization": {"stage": 2}})
    code = (f"import sys; from neon_scale.config import load_config; load_config({str(TOY)!r}, "
            f"['train.deepspeed_json={path}']); print('deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_batch_size_must_agree_with_the_config(tmp_path):
    path = _write(tmp_path, {"train_batch_size": 64})
    cfg = load_config(str(TOY), [f"train.deepspeed_json={path}"]).train
    with pytest.raises(NeonError, match=rf"{path}: 'train_batch_size' = 64 but the config gives 1000"):
        deepspeed_config(cfg, world=1)


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_unknown_key_through_the_command(tmp_path):
    path = _write(tmp_path, {"wall_clock_breakdwn": True})
    run_dir = tmp_path / "run"
    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides(f"train.deepspeed_json={path}"))
    assert_one_line_error(proc, str(path), "unknown DeepSpeed key 'wall_clock_breakdwn'", "wall_clock_breakdown",
                          exit_code=2)
    assert not run_dir.exists()  # checked with the config, before any stage
