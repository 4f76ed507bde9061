"""Small conventions of the commands, through the real `neon` command or the real function: stage
commands and --stage, `neon fid` on two statistics files and its checks before any extraction, the
note on which state dict a .pt gave, the sampler folder names (and run directories of 0.1.0 that
use the old ones), and the configs' documentation of where each file comes from."""
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch

from neon_scale import io
from neon_scale.stages.common import RunContext, legacy_sampler_tag, sampler_tag

from .conftest import ROOT, SMALL, TOY, assert_one_line_error, neon, small_overrides, write_image_set

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


# ------------------------------------------------------------------------------- stage commands

def test_stage_command_refuses_stage(run_dir):
    proc = neon("base", "--config", str(TOY), "--run-dir", str(run_dir), "--stage", "sweep")
    assert_one_line_error(proc, "neon base runs the base stage only", "--stage sweep", "neon run", exit_code=2,
                          warnings_ok=False)
    assert not run_dir.exists()
    assert "--stage" not in neon("base", "--help").stdout
    assert "--stage" in neon("run", "--help").stdout


def test_version():
    proc = neon("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("neon_scale "), proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------ neon fid

def _stats(path: pathlib.Path, seed: int) -> str:
    x = np.random.default_rng(seed).normal(size=(40, 6))
    np.savez(path, mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    return str(path)


def test_fid_of_two_statistics_files_needs_no_weights(tmp_path):
    a, b = _stats(tmp_path / "a.npz", 0), _stats(tmp_path / "b.npz", 1)
    proc = neon("fid", a, "--ref", b, "--json", str(tmp_path / "out.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fid " in proc.stdout and "img/s" not in proc.stdout and "rank(s)" not in proc.stdout, proc.stdout
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["fid"] > 0 and "images_per_s" not in result and result["n"] == {"input1": None, "input2": None}
    assert neon("fid", a, b).returncode == 0  # the same as INPUT2


def test_fid_of_images_without_weights_is_one_line(tmp_path):
    images = write_image_set(tmp_path / "gen", 3, seed=0, brightness=1.0, size=(8, 8))
    proc = neon("fid", str(images), "--ref", _stats(tmp_path / "b.npz", 1), "--json", str(tmp_path / "out.json"))
    assert_one_line_error(proc, "--weights", "inception", str(images), exit_code=2)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("options, needles", [
    (["--metrics", "kid"], ["--kid-subset-size 1000 exceeds the 5 images of", "ref", "give at most 5"]),
    (["--metrics", "kid", "--kid-subset-size", "6"], ["--kid-subset-size 6 exceeds the 5 images of"]),
    (["--metrics", "kid", "--kid-subsets", "0", "--kid-subset-size", "4"], ["--kid-subsets >= 1"]),
    (["--metrics", "fid,prc"], ["precision/recall needs more than 3 images per input", "has 3"]),
])
def test_kid_and_pr_checked_before_extraction(tmp_path, options, needles):
    """Checked against the image counts before any weights are read or image decoded: the weights
    file does not even exist, and nothing is written."""
    gen = write_image_set(tmp_path / "gen", 6, seed=0, brightness=1.0, size=(8, 8))
    ref = write_image_set(tmp_path / "ref", 5 if "kid" in options else 3, seed=1, brightness=0.7, size=(8, 8))
    outs = [tmp_path / "out.json", tmp_path / "stats.npz"]
    proc = neon("fid", str(gen), str(ref), "--weights", str(tmp_path / "never-read.pth"), *options,
                "--json", str(outs[0]), "--save-stats", str(outs[1]))
    assert_one_line_error(proc, *needles, exit_code=2, warnings_ok=False)
    assert not any(p.exists() for p in outs)


# ------------------------------------------------------------------- which state dict a .pt gave

def test_several_state_dicts_say_which_was_taken(capsys):
    ema, model = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    assert io.pick_state_dict({"model": model, "ema": ema, "args": 3}, None, "DiT.pt") is ema
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1, out
    assert "DiT.pt" in out and "'ema'" in out and "'model'" in out and "--key" in out, out
    assert io.pick_state_dict({"model": model}, None, "one.pt") is model  # only one: nothing to say
    assert io.pick_state_dict({"model": model, "ema": ema}, "model", "DiT.pt") is model  # asked for
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------- sampler folders

SHELL_SAFE = re.compile(r"[A-Za-z0-9._%+-]+")


def _settings_back(tag: str) -> dict[str, str]:
    """The documented reading of a folder name: pairs at `__`, key and value at the last `_`, %XX decoded."""
    from urllib.parse import unquote

    return dict((k, unquote(v)) for k, v in (pair.rsplit("_", 1) for pair in tag.split("__")))


@pytest.mark.parametrize("settings, tag", [
    ({"zeta": 1.1}, "zeta_1.1"),
    ({"temperature": 0.5}, "temperature_0.5"),
    ({"cfg": 2.3, "num_steps": 4}, "cfg_2.3__num_steps_4"),
    ({"method": "ddim", "steps": 20, "cfg": 3.0}, "method_ddim__steps_20__cfg_3.0"),
    ({"eta": -0.5, "lr": 1e-05}, "eta_-0.5__lr_1e-05"),
    ({"method": "my_sampler", "note": "a b/c,d=e"}, "method_my%5Fsampler__note_a%20b%2Fc%2Cd%3De"),
    ({}, "default"),
])
def test_sampler_tag_is_shell_safe_and_reversible(settings, tag):
    assert sampler_tag(settings) == tag
    assert SHELL_SAFE.fullmatch(tag)
    if settings:
        assert _settings_back(tag) == {k: str(v) for k, v in settings.items()}
    assert legacy_sampler_tag({"cfg": 2.3, "num_steps": 4}) == "cfg=2.3,num_steps=4"


def _context(run_dir: pathlib.Path) -> RunContext:
    from neon_scale.config import load_config

    return RunContext.from_config(load_config(str(TOY), [f"run_dir={run_dir}"]))


def test_old_sampler_folders_are_read_when_the_new_ones_are_missing(tmp_path):
    ctx = _context(tmp_path / "run")
    new, old = {"zeta": 1.1}, {"zeta": 0.9}
    for stage in ("synth", "train"):
        (tmp_path / "run" / stage / "zeta=0.9").mkdir(parents=True)  # a 0.1.0 run dir: old names only
    assert ctx.synth_dir(new) == tmp_path / "run" / "synth" / "zeta_1.1"
    assert ctx.synth_dir(old) == tmp_path / "run" / "synth" / "zeta=0.9"
    assert ctx.train_dir(old) == tmp_path / "run" / "train" / "zeta=0.9"
    names = [c["name"] for c in ctx.checkpoints()]
    assert names == ["zeta_1.1/step-50", "zeta_1.1/step-250", "zeta=0.9/step-50", "zeta=0.9/step-250"]
    assert ctx.checkpoints()[2]["path"] == tmp_path / "run" / "train" / "zeta=0.9" / "theta_s-step000050.safetensors"
    (tmp_path / "run" / "train" / "zeta_0.9").mkdir()  # both: the new one wins
    assert ctx.train_dir(old) == tmp_path / "run" / "train" / "zeta_0.9"


@pytest.mark.slow  # copies the small toy run (every stage) and runs it again
def test_run_dir_of_version_0_1_0_resumes(small_toy_run, tmp_path):
    """A run directory with 0.1.0's folder names (`zeta=1.1`) and sweep cache: every stage reads the
    old folders (none is made with the new names), train and sweep redo nothing."""
    run_dir = tmp_path / "old"
    shutil.copytree(small_toy_run[0], run_dir)
    for stage in ("synth", "train"):
        for tag in ("zeta_1.1", "zeta_0.9"):
            (run_dir / stage / tag).rename(run_dir / stage / tag.replace("_", "="))
        (run_dir / stage / "done.json").unlink()  # the stages look into their sampler folders again
    results = run_dir / "sweep" / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    for row in rows:
        row["checkpoint"] = row["checkpoint"].replace("zeta_", "zeta=")
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "sweep" / "done.json").unlink()
    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train zeta=1.1: complete, skipped" in proc.stdout and "train zeta=0.9: complete, skipped" in proc.stdout
    for stage in ("synth", "train"):
        assert sorted(p.name for p in (run_dir / stage).iterdir() if p.is_dir()) == ["zeta=0.9", "zeta=1.1"]
    assert len(results.read_text().splitlines()) == len(rows)  # every point from the cache
    summary = json.loads((run_dir / "sweep" / "summary.json").read_text())
    assert [e["checkpoint"] for e in summary] == ["zeta=1.1/step-6", "zeta=1.1/step-12", "zeta=0.9/step-6",
                                                  "zeta=0.9/step-12"]


@pytest.mark.slow  # needs the small toy run (every stage)
def test_synthetic_set_keeps_its_random_stream(small_toy_run):
    """S is drawn from the stream keyed by 0.1.0's name (`zeta=1.1`), whatever its folder is called:
    the same synthetic set, hence the same theta_s and sweep, as before the rename."""
    from neon_scale import rng
    from neon_scale.config import load_config
    from neon_scale.data.shards import read_shard
    from neon_scale.stages.synth import sample_batches

    run_dir = small_toy_run[0]
    cfg = load_config(str(TOY), [*SMALL, f"run_dir={run_dir}"])
    ctx = RunContext.from_config(cfg)
    settings, syn = cfg.synth.samplers[0], cfg.synth
    parts = sample_batches(ctx, ctx.load_model(ctx.base_weights()), syn.shard_size,
                           rng.generator(syn.seed, "zeta=1.1", 0), ctx.spec.parse_sampler(settings), syn.batch_size, 0)
    drawn = torch.cat([p["x"] for p in parts]).numpy()
    stored = read_shard(run_dir / "synth" / "zeta_1.1" / "shard-000000.tar")[0]["x"]
    np.testing.assert_array_equal(stored, drawn)


# ------------------------------------------------------------------------------------- configs

IMAGE_CONFIGS = ["dit_xl2_in256.yaml", "xar_b_in256.yaml", "xar_l_in256.yaml", "xar_h_in256.yaml"]


@pytest.mark.parametrize("name", IMAGE_CONFIGS)
def test_image_configs_name_each_files_source(name):
    """Each file key has a comment naming where the official file comes from (a URL), the Inception
    file has the name torch-fidelity downloads, and the paper is cited, not a file outside the repo."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    lines = (ROOT / "configs" / name).read_text().splitlines()
    assert URL_INCEPTION_V3.endswith("/" + INCEPTION_FILE)
    text = "\n".join(lines)
    assert "arXiv:2510.03597" in text and "NEON.md" not in text
    assert "pt_inception" not in text and f"inception_weights: /path/to/{INCEPTION_FILE}" in text
    for key in ("weights:", "args:", "inception_weights:", "ref_stats:"):
        at = next(i for i, ln in enumerate(lines) if ln.strip().startswith(key))
        comment = []
        for ln in reversed(lines[:at]):
            if not ln.strip().startswith("#"):
                break
            comment.append(ln)
        assert any("https://" in c for c in comment), f"{name}: no source above {key}"
    assert URL_INCEPTION_V3 in text


def test_inception_file_has_one_name():
    """README, CLI help and configs: the name torch-fidelity downloads, never another."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    files = [ROOT / "README.md", ROOT / "neon_scale" / "cli.py", *sorted((ROOT / "configs").glob("*.yaml"))]
    for path in files:
        names = set(re.findall(r"[\w-]*inception-2015-12-05-6726825d\.pth", path.read_text()))
        assert names <= {INCEPTION_FILE}, (path, names)
    assert URL_INCEPTION_V3.rsplit("/", 1)[1] == INCEPTION_FILE
    assert not any("NEON.md" in p.read_text() for p in (ROOT / "configs").glob("*.yaml"))
