"""Resuming a ZeRO 1/2/3 checkpoint (fp32 and bf16) on another number of ranks, real DeepSpeed
engines on gloo (tests/reshard_worker.py; ZeRO 3 with sub-groups of 16 elements, so that each rank
holds several flat groups, as a large model does): a checkpoint saved after a few steps at N ranks (EMA,
WarmupLR) and loaded with `load_resharded` at M ranks holds exactly the saved state, bit for bit
(the full fp32 masters, Adam's exp_avg / exp_avg_sq and step, lr and scheduler, the engine's
counters, the full EMA, frozen parameters, buffers; bf16 module weights = masters cast to bf16);
one more step on the same full batch then agrees with the uninterrupted N-rank run to within
float rounding.

Why not bit for bit after the step: the N-rank run averages N per-rank gradient means (gloo's
all-reduce), the M-rank run M of them, so the gradients are summed in another order; in bf16
each rank's gradient is also rounded to bf16 before the reduction. Adam divides by sqrt(v), so
the step's error is that relative gradient error (fp32 ~1e-7, bf16 ~2^-8) times the update.
Measured on this model over the 12 cases, as a share of the step's largest update of that
parameter's master: masters fp32 <= 8.3e-6, bf16 <= 8.2e-3; EMA fp32 <= 6e-8, bf16 <= 1.7e-3
(tolerance for both: fp32 1e-4, bf16 5e-2); Adam's states as a share of their largest value:
fp32 <= 2.0e-7, bf16 <= 1.1e-2 (tolerances 1e-5, 1e-1).

The default suite runs ZeRO 2 fp32 2->1 and ZeRO 3 bf16 1->2 (3 launches, ~1 min); the rest of
the matrix (ZeRO 1/2/3 x fp32/bf16 x 2->1/1->2) is marked slow and matrix (`make bench-matrix`).
"""
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from neon_scale.errors import NeonError
from neon_scale.merge.zero import ZeroCheckpointSource

from .conftest import ROOT, torchrun
from .reshard_worker import STEPS, case_name

pytestmark = pytest.mark.slow  # torchrun launches of real engines: `pytest -m 'not slow'` skips them

WORKER = ROOT / "tests" / "reshard_worker.py"
FAST = [(2, "fp32", 2), (3, "bf16", 1)]  # (stage, dtype, world that saves); it loads on the other
ALL = [(s, d, w) for s in (1, 2, 3) for d in ("fp32", "bf16") for w in (2, 1)]
SLOW = [c for c in ALL if c not in FAST]
UPDATE_RTOL = {"fp32": 1e-4, "bf16": 5e-2}  # |resharded - uninterrupted| / largest update, masters and EMA
STATE_RTOL = {"fp32": 1e-5, "bf16": 1e-1}   # |resharded - uninterrupted| / largest value, Adam states


def launch(nproc: int, out: pathlib.Path, jobs: list[str]) -> None:
    proc = torchrun(WORKER, str(out), *jobs, nproc=nproc, timeout=600)
    assert proc.returncode == 0, (jobs, proc.stderr[-4000:])


def run_cases(out: pathlib.Path, cases: list[tuple[int, str, int]], errors_for=None) -> pathlib.Path:
    """Three launches cover any set of cases: 1 rank saves, 2 ranks load those and save theirs,
    1 rank loads those."""
    job = lambda action, c: f"{action}:{c[0]}:{c[1]}:{c[2]}"  # noqa: E731
    first = [job("save", c) for c in cases if c[2] == 1]
    second = [job("load", c) for c in cases if c[2] == 1] + [job("save", c) for c in cases if c[2] == 2]
    third = [job("load", c) for c in cases if c[2] == 2] + ([job("errors", errors_for)] if errors_for else [])
    for nproc, jobs in ((1, first), (2, second), (1, third)):
        if jobs:
            launch(nproc, out, jobs)
    return out


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory):
    return run_cases(tmp_path_factory.mktemp("reshard"), FAST, errors_for=(2, "fp32", 2))


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory):
    return run_cases(tmp_path_factory.mktemp("reshard_slow"), SLOW)


def read(d: pathlib.Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(d / f"{name}.safetensors")), json.loads((d / f"{name}.json").read_text())


def check_case(d: pathlib.Path, stage: int, dtype: str, saved_world: int) -> None:
    saved, saved_info = read(d, "saved")
    loaded, loaded_info = read(d, "loaded")
    assert saved_info["world"] == saved_world and loaded_info["world"] == 3 - saved_world

    # 1. the resharded engine holds exactly the saved state: copies, so bit for bit
    assert saved.keys() == loaded.keys()
    kinds = {k.split("/")[0] for k in saved}
    assert kinds == {"master", "exp_avg", "exp_avg_sq", "ema", "module", "buffer"}
    assert "module/model.cond.0.bias" in saved and "master/model.cond.0.bias" not in saved  # the frozen one
    for k in saved:
        assert saved[k].dtype == loaded[k].dtype and torch.equal(saved[k], loaded[k]), k
    for k in ("lr", "global_steps", "global_samples", "skipped_steps", "scheduler", "param_groups"):
        assert loaded_info[k] == saved_info[k], k
    assert saved_info["global_steps"] == STEPS and saved_info["scheduler"] == {"last_batch_iteration": STEPS - 1}
    assert loaded_info["adam_steps"] == [[float(STEPS)]] * loaded_info["world"]  # every rank, every flat group
    assert (saved_info["flat_groups"] > 1 and loaded_info["flat_groups"] > 1) == (stage == 3)  # ZeRO 3: sub-groups
    # the module's own weights are the masters cast to their dtype (bf16: rounded once)
    lp = torch.bfloat16 if dtype == "bf16" else torch.float32
    for k, v in loaded.items():
        if k.startswith("master/"):
            module = loaded["module/" + k.removeprefix("master/")]
            assert module.dtype == lp and torch.equal(module, v.to(lp)), k

    # 2. one more step on the same full batch: equal up to the gradient reduction's rounding
    after, _ = read(d, "after")
    resharded, resharded_info = read(d, "after-resharded")
    assert resharded_info["global_steps"] == STEPS + 1
    for k, v in after.items():
        kind, name = k.split("/", 1)
        err = (resharded[k].double() - v.double()).abs().max().item()
        if kind in ("master", "ema"):
            update = (after["master/" + name].double() - saved["master/" + name].double()).abs().max().item()
            assert err <= UPDATE_RTOL[dtype] * update, (k, err, update)
        elif kind in ("exp_avg", "exp_avg_sq"):
            assert err <= STATE_RTOL[dtype] * v.abs().max().item(), (k, err)
        elif kind == "module" and ("master/" + name) in resharded:
            assert torch.equal(resharded[k], resharded["master/" + name].to(lp)), k
        else:  # the frozen parameter and the buffer do not move
            assert torch.equal(resharded[k], v), k


@pytest.mark.parametrize("stage,dtype,saved_world", FAST, ids=[f"{case_name(*c)}" for c in FAST])
def test_resharded_resume_is_exact(fast_runs, stage, dtype, saved_world):
    check_case(fast_runs / case_name(stage, dtype, saved_world), stage, dtype, saved_world)


@pytest.mark.slow
@pytest.mark.matrix
@pytest.mark.parametrize("stage,dtype,saved_world", SLOW, ids=[f"{case_name(*c)}" for c in SLOW])
def test_resharded_resume_is_exact_all(slow_runs, stage, dtype, saved_world):
    check_case(slow_runs / case_name(stage, dtype, saved_world), stage, dtype, saved_world)


def test_wrong_world_or_model_is_one_line(fast_runs):
    d = fast_runs / case_name(2, "fp32", 2)
    errors = json.loads((d / "errors.json").read_text())
    tag_dir = d / "ckpt" / f"step{STEPS:06d}"
    assert errors["world"] == f"{tag_dir}: partitions of 2 rank(s), but the trainer state says 5"
    assert errors["model"] == f"{tag_dir}: 'cond.0.weight' has shape (7, 1) in the checkpoint, (9, 1) in the model"
    assert all("\n" not in e for e in errors.values())


def test_reader_gives_the_saved_optimizer_state(fast_runs):
    """The reader's full optimizer states, step, hyperparameters and counters are the engine's."""
    d = fast_runs / case_name(3, "bf16", 1)
    saved, info = read(d, "saved")
    with ZeroCheckpointSource(d / "ckpt") as src:  # keys without the trainer's wrapper prefix
        assert src.prefix == "model." and src.kind("mean1") == "trainable" and src.kind("calib") == "buffer"
        assert src.kind("cond.0.bias") == "frozen"
        assert torch.equal(src.module_tensor("cond.0.bias"), saved["module/model.cond.0.bias"])
        assert torch.equal(src.module_tensor("calib"), saved["buffer/model.calib"])
        assert src.optimizer_state_keys() == ["exp_avg", "exp_avg_sq"]
        for k in (k for k in src.keys() if src.kind(k) == "trainable"):
            name = "model." + k
            assert torch.equal(src.get_master(k), saved[f"master/{name}"])
            assert torch.equal(src.get_ema(k), saved[f"ema/{name}"])
            for which in src.optimizer_state_keys():
                assert torch.equal(src.optimizer_state(k, which), saved[f"{which}/{name}"]), (k, which)
        assert float(src.adam_step()) == STEPS
        assert [g["lr"] for g in src.param_groups()] == info["lr"]
        state = src.training_state()
        assert (state["global_steps"], state["global_samples"], state["lr_scheduler"]) == \
               (info["global_steps"], info["global_samples"], info["scheduler"])


def test_ema_partition_of_another_layout_is_refused(fast_runs, tmp_path):
    import shutil

    from safetensors.torch import save_file

    src_dir = fast_runs / case_name(2, "fp32", 2) / "ckpt"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src_dir, ckpt)
    tag_dir = ckpt / f"step{STEPS:06d}"
    ema0 = tag_dir / "ema-rank00000.safetensors"
    save_file({"group0": torch.zeros(3)}, str(ema0))
    with ZeroCheckpointSource(ckpt) as src, pytest.raises(NeonError) as e:
        src.get_ema("mean1")
    assert str(e.value).startswith(f"{ema0}: EMA group0 holds 3 elements, the fp32 partition")
