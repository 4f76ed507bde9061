"""Hostile and broken inputs through the real commands: no pickle executed (resume included),
lying safetensors headers, hostile --w values and config floats, a full disk, output modes, and
stale temporary files. Kills at fixed system calls live in test_kills.py."""
import json
import os
import pathlib
import shutil
import struct
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from neon_scale.merge.extrapolate import extrapolate_state

from .conftest import TOY, assert_one_line_error, neon, small_overrides

SAMPLER = "zeta_1.1"


def _toy_args(run_dir, *extra):
    return ["--config", str(TOY), "--run-dir", str(run_dir),
            *small_overrides("synth.samplers=[{zeta: 1.1}]", "train.save_steps=[12]", "train.keep_last=3", *extra)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy run through base, synth and train (ZeRO 2 checkpoints at steps 6, 9, 12), made under
    umask 022 (test_outputs_get_the_mode_the_umask_gives reads its modes); tests copy it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    old = os.umask(0o022)
    try:
        proc = neon("run", "--stage", "base", "--stage", "synth", "--stage", "train", *_toy_args(run_dir))
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def _copy(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


# ------------------------------------------------------------------------------ pickles

class Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: pathlib.Path, marker: pathlib.Path) -> None:
    from neon_scale.io import torch_load
    from neon_scale.merge.zero import deepspeed_classes

    obj = torch_load(path, allow=deepspeed_classes())
    obj["payload"] = Payload(marker)
    torch.save(obj, path)


@pytest.mark.slow  # needs the trained toy run
def test_a_pickle_in_a_training_checkpoint_is_never_run(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    out = run_dir / "train" / SAMPLER
    ckpt = out / "ckpt"
    marker = tmp_path / "pwned"
    planted = ckpt / "step000009" / "mp_rank_00_model_states.pt"
    _plant(planted, marker)
    (ckpt / "latest").write_text("step000009")
    for done in (out / "done.json", run_dir / "train" / "done.json", out / "theta_s-step000012.safetensors"):
        done.unlink()

    proc = neon("train", *_toy_args(run_dir))  # resume reads the planted file
    assert_one_line_error(proc, str(planted), "open'", "not on the allow-list", "--trust-pickles", exit_code=2)
    proc = neon("consolidate", str(ckpt), "--tag", "step000009", "-o", str(tmp_path / "cons"))
    assert_one_line_error(proc, str(planted), "open'", exit_code=2)
    proc = neon("merge", str(run_dir / "base" / "model.safetensors"), str(ckpt), "--tag", "step000009", "--w", "1",
                "-o", str(tmp_path / "merged"))
    assert_one_line_error(proc, str(planted), "open'", exit_code=2)
    assert not marker.exists()
    assert not (tmp_path / "cons").exists() and not (tmp_path / "merged").exists()

    # the opt-in is real: the user who trusts the file gets it unpickled, and the run resumes
    proc = neon("train", *_toy_args(run_dir), "--trust-pickles")
    assert proc.returncode == 0, proc.stderr
    assert marker.exists() and "resuming from step 9" in proc.stdout


# ------------------------------------------------------------------------- safetensors headers

def _raw_safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _two_tensors(**offsets):
    a, b = offsets.get("a", [0, 16]), offsets.get("b", [16, 32])
    return {"a": {"dtype": "F32", "shape": [4], "data_offsets": a},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": b}}


@pytest.mark.parametrize("header, size, needle", [
    (_two_tensors(b=[8, 24]), 32, "'b' at data_offsets [8, 24] overlaps"),
    (_two_tensors(a=[-8, 8]), 32, "must be non-negative integers"),
    (_two_tensors(b=[16, 28]), 32, "'b' has 12 bytes for shape (4,)"),
    (_two_tensors(b=[20, 36]), 36, "leaves a gap of 4 bytes"),
    (_two_tensors(), 40, "trailing bytes"),
    ({"a": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}, 16, "unsupported safetensors dtype Q99"),
    ([1, 2], 0, "the header is not a JSON object"),
])
def test_merge_refuses_a_lying_safetensors_header(tmp_path, header, size, needle):
    _raw_safetensors(tmp_path / "base.safetensors", header, bytes(size))
    save_file({"a": torch.zeros(4), "b": torch.zeros(4)}, str(tmp_path / "self.safetensors"))
    proc = neon("merge", str(tmp_path / "base.safetensors"), str(tmp_path / "self.safetensors"), "--w", "1",
                "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "base.safetensors", needle, exit_code=2)
    assert proc.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "self.safetensors"]


# ------------------------------------------------------------------------------- --w values

@pytest.fixture
def pair(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, generator=gen), "m": torch.tensor([0.0, float("-inf")])}
    synth = {"w": base["w"] + 0.1 * torch.randn(64, generator=gen), "m": base["m"].clone()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(synth, str(tmp_path / "self.safetensors"))
    return tmp_path, base, synth


@pytest.mark.parametrize("ws, needle", [
    (["nan"], "--w nan: not a finite number"),
    (["inf"], "--w inf: not a finite number"),
    (["1e308"], "--w 1e+308 overflows torch.float32 in 'w'"),
    (["nan", "nan"], "not a finite number"),
    (["0.1", "0.1000001"], "repeated --w values"),
])
def test_hostile_w_values_write_nothing(pair, ws, needle):
    d, _, _ = pair
    args = [a for w in ws for a in ("--w", w)]
    proc = neon("merge", str(d / "base.safetensors"), str(d / "self.safetensors"), *args, "-o", str(d / "out"))
    assert_one_line_error(proc, needle, exit_code=2)
    assert proc.returncode == 2
    assert sorted(p.name for p in d.iterdir()) == ["base.safetensors", "self.safetensors"]


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_negative_w_with_or_without_equals(pair):
    d, base, synth = pair
    proc = neon("merge", str(d / "base.safetensors"), str(d / "self.safetensors"), "--w", "-0.5", "--w", "-1e-3",
                "--w=-2", "-o", str(d / "out"))
    assert proc.returncode == 0, proc.stderr
    for w in (-0.5, -1e-3, -2.0):
        got = load_file(str(d / "out" / f"w={w:g}" / "model.safetensors"))
        assert torch.equal(got["w"], extrapolate_state(base, synth, w)["w"])


# ------------------------------------------------------------------------- config values

@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
@pytest.mark.parametrize("setting, needle", [
    ("sweep.w_min=.nan", "'sweep.w_min' = nan is not a finite number"),
    ("sweep.w_max=.inf", "'sweep.w_max' = inf is not a finite number"),
    ("sweep.w_step=1e-9", "exceeds the bound of 10000 points"),
    ("train.lr=.nan", "'train.lr' = nan is not a finite number"),
    ("train.lr=.inf", "'train.lr' = inf is not a finite number"),
    ("base.lr=.nan", "'base.lr' = nan is not a finite number"),
    ("sweep.tol=.nan", "'sweep.tol' = nan is not a finite number"),
    ("eval.n=1", "'eval.n' = 1 is below the minimum 2"),
    ("synth.samplers=[{zeta: .nan}]", "is not a finite number"),
    ("sweep.repeats=1", "'sweep.repeats' = 1 gives no standard error"),
])
def test_config_values_that_cannot_work_are_refused_before_anything_is_written(run_dir, setting, needle):
    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), "--set", setting, timeout=60)
    assert_one_line_error(proc, needle, exit_code=2)
    assert proc.returncode == 2 and not run_dir.exists()


# ------------------------------------------------------------------------- modes and leftovers

def _modes_readable(root: pathlib.Path) -> list[str]:
    """Paths under root (root included) that group or others cannot read (or enter)."""
    bad = []
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        need = 0o055 if p.is_dir() else 0o044
        if mode & need != need:
            bad.append(f"{p} {oct(mode & 0o777)}")
    return bad


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.slow  # needs the trained toy run
def test_outputs_get_the_mode_the_umask_gives(trained, tmp_path, umask_022):
    run_dir = trained
    assert _modes_readable(run_dir) == []
    ckpt = run_dir / "train" / SAMPLER / "ckpt"
    assert neon("consolidate", str(ckpt), "-o", str(tmp_path / "cons")).returncode == 0
    proc = neon("merge", str(run_dir / "base" / "model.safetensors"), str(tmp_path / "cons" / "model.safetensors"),
                "--w", "1", "--w", "2", "-o", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    assert _modes_readable(tmp_path / "cons") == [] and _modes_readable(tmp_path / "merged") == []


@pytest.mark.slow  # needs the trained toy run
def test_stale_temporaries_of_killed_runs_are_removed(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    stale = [run_dir / "base" / ".done.json.k1l2.tmp", run_dir / "synth" / SAMPLER / ".manifest.json.abc.tmp",
             run_dir / "train" / SAMPLER / ".theta_s-step000012.safetensors.x.tmp",
             run_dir / "train" / SAMPLER / "ckpt" / ".latest.q.tmp"]
    for p in stale:
        p.write_bytes(b"half")
        os.utime(p, (1e9, 1e9))  # older than any process that will look at it
    kept = run_dir / "base" / "notes.tmp"  # not our naming pattern: never touched
    kept.write_text("mine")
    proc = neon("run", "--stage", "base", "--stage", "synth", "--stage", "train", *_toy_args(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert not any(p.exists() for p in stale) and kept.exists()
    assert "removed 4 temporary file(s)" in proc.stdout

    # merge: a killed run's partial folder goes; an interrupted swap gets its old OUT back
    out = tmp_path / "merged"
    base = str(run_dir / "base" / "model.safetensors")
    theta = str(run_dir / "train" / SAMPLER / "theta_s-step000012.safetensors")
    assert neon("merge", base, theta, "--w", "1", "-o", str(out)).returncode == 0
    partial = tmp_path / ".merged.partial-dead"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x" * 100)
    os.utime(partial, (1e9, 1e9))
    aside = tmp_path / ".merged.old-123-456"
    os.replace(out, aside)  # as if killed between the two renames of --overwrite
    proc = neon("merge", base, theta, "--w", "1", "-o", str(out))
    assert_one_line_error(proc, "already exists", exit_code=2)  # the old OUT is back, so no overwrite without asking
    assert load_file(str(out / "model.safetensors")) and not aside.exists() and not partial.exists()


# ------------------------------------------------------------------------------ full disk

@pytest.fixture
def small_disk(tmp_path, request):
    """A real small filesystem (tmpfs, 1.5 MiB unless the test asks for another size), so that
    writes meet ENOSPC; skipped where mounting is not allowed."""
    size = getattr(request, "param", "1536k")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_a_full_disk_is_one_line_naming_the_file(small_disk, tmp_path):
    big = {"w": torch.randn(600_000)}  # 2.4 MB: more than the disk holds
    save_file(big, str(tmp_path / "base.safetensors"))
    save_file({"w": big["w"] + 1}, str(tmp_path / "self.safetensors"))
    proc = neon("merge", str(tmp_path / "base.safetensors"), str(tmp_path / "self.safetensors"), "--w", "1",
                "-o", str(small_disk / "out"))
    assert_one_line_error(proc, str(small_disk / "out"), "no space left on device", exit_code=2)
    assert proc.returncode == 2 and list(small_disk.iterdir()) == []


@pytest.mark.slow  # a whole toy run on a small disk
@pytest.mark.parametrize("small_disk, settings, needle", [
    ("1536k", ["synth.n=20000", "synth.shard_size=20000"], "shard-000000.tar: no space left on device"),
    ("1000k", [], "step000003: no space left on device while DeepSpeed saved the checkpoint"),  # synth fits
], indirect=["small_disk"])
def test_a_run_on_a_full_disk_stops_with_one_line(small_disk, settings, needle):
    proc = neon("run", *_toy_args(small_disk / "run", "train.ckpt_every_images=1200", *settings))
    assert_one_line_error(proc, needle, exit_code=2)
    assert proc.returncode == 2


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_fid_outputs_clear_the_temporaries_of_a_killed_run(tmp_path):
    import numpy as np

    from neon_scale.metrics.fid import write_stats

    gen = np.random.default_rng(0)
    for name in ("a", "b"):
        x = gen.normal(size=(50, 4))
        write_stats(tmp_path / f"{name}.npz", x.mean(0), np.cov(x, rowvar=False), 50)
    stale = [tmp_path / ".fid.json.x1.tmp", tmp_path / ".s.npz.y2.tmp"]
    for p in stale:
        p.write_bytes(b"half")
        os.utime(p, (1e9, 1e9))
    proc = neon("fid", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"), "--weights", "unused.pth",
                "--json", str(tmp_path / "fid.json"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] > 0
    assert not stale[0].exists() and stale[1].exists()  # only the temporaries of the outputs written
