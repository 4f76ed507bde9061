"""`neon merge` through the real command: every input format, every policy branch, every error
(one line, exit != 0, no output left behind)."""
import argparse
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from neon_scale.merge.extrapolate import extrapolate_state
from neon_scale.merge.sources import SafetensorsSource

from .conftest import assert_one_line_error, neon


def _pair(seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = {
        "enc.w": torch.randn(37, 11, generator=gen),
        "enc.b": torch.randn(11, generator=gen).to(torch.bfloat16),
        "dec.w": torch.randn(5, 3, generator=gen).to(torch.float16),
        "dec.mask": torch.tensor([0.0, float("-inf"), 1.0]),
        "dec.steps": torch.tensor([3, 4]),
        "head.only_in_base": torch.randn(4, generator=gen),
    }
    synth = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.is_floating_point() else v + 1
             for k, v in base.items() if k != "head.only_in_base"}
    return base, synth


def _read(path):
    return {k: SafetensorsSource(path).get(k) for k in SafetensorsSource(path).keys()}


def _assert_equal_states(got, ref):
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        assert torch.equal(got[k], ref[k]), k


@pytest.fixture
def files(tmp_path):
    base, synth = _pair()
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(synth, str(tmp_path / "synth.safetensors"))
    return tmp_path, base, synth


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_safetensors_files_several_w_and_policy_summary(files):
    d, base, synth = files
    proc = neon("merge", str(d / "base.safetensors"), str(d / "synth.safetensors"), "--w", "1.5", "--w", "-0.5", "-o", str(d / "out"))
    assert proc.returncode == 0, proc.stderr
    for w in (1.5, -0.5):
        _assert_equal_states(_read(d / "out" / f"w={w:g}" / "model.safetensors"), extrapolate_state(base, synth, w))
    assert "warning: 'head.only_in_base' is not in" in proc.stdout
    assert "merged 4 tensors; copied 1 non-float and 1 missing from theta_s; 1 non-finite" in proc.stdout
    assert "enc" in proc.stdout and "dec" in proc.stdout and "relative move" in proc.stdout
    out = _read(d / "out" / "w=1.5" / "model.safetensors")
    assert out["dec.mask"][1].item() == float("-inf") and torch.equal(out["dec.steps"], base["dec.steps"])


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_sharded_output_with_index_and_dtype(files):
    d, base, synth = files
    proc = neon("merge", str(d / "base.safetensors"), str(d / "synth.safetensors"), "--w", "1", "-o", str(d / "out"),
                "--max-shard-size", "600B", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((d / "out" / "model.safetensors.index.json").read_text())
    files_ = sorted(set(index["weight_map"].values()))
    assert len(files_) >= 2 and files_[0].startswith("model-00001-of-")
    for f in files_:
        assert (d / "out" / f).stat().st_size <= 600 + 1024  # tensors <= 600 bytes + header
    got = _read(d / "out")
    merged = extrapolate_state(base, synth, 1.0)
    for k, r in merged.items():  # fp32 arithmetic, then one cast to bf16 (float tensors only)
        if not base[k].is_floating_point():
            assert torch.equal(got[k], r)
            continue
        assert got[k].dtype == torch.bfloat16
        if k not in synth:
            want = base[k].to(torch.bfloat16)
        else:
            want = extrapolate_state({k: base[k].float()}, {k: synth[k].float()}, 1.0)[k].to(torch.bfloat16)
        assert torch.equal(got[k], want), k
    # a sharded directory is an input too
    proc = neon("merge", str(d / "out"), str(d / "synth.safetensors"), "--w", "0", "-o", str(d / "again"))
    assert proc.returncode == 0, proc.stderr
    _assert_equal_states(_read(d / "again" / "model.safetensors"), got)


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_torch_files_with_key_selection(files):
    d, base, synth = files
    torch.save({"model": base, "ema": synth, "args": argparse.Namespace(lr=1.0)}, d / "two.pt")  # DiT's train.py
    torch.save({"model": base, "state_dict": synth}, d / "amb.pt")
    torch.save({"ema": synth, "opt": {"step": 3}}, d / "one.pt")
    torch.save(synth, d / "bare.pth")
    ref = extrapolate_state(base, synth, 2.0)
    for name, extra in (("one.pt", []), ("bare.pth", []), ("two.pt", []), ("two.pt", ["--key", "ema"]),
                        ("amb.pt", ["--key", "state_dict"])):
        out = d / f"out-{name}-{len(extra)}"
        proc = neon("merge", str(d / "base.safetensors"), str(d / name), "--w", "2", "-o", str(out), *extra)
        assert proc.returncode == 0, proc.stderr
        _assert_equal_states(_read(out / "model.safetensors"), ref)
    proc = neon("merge", str(d / "base.safetensors"), str(d / "amb.pt"), "--w", "2", "-o", str(d / "amb"))
    assert_one_line_error(proc, "amb.pt", "several state dicts ['model', 'state_dict']", "key", exit_code=2)
    proc = neon("merge", str(d / "base.safetensors"), str(d / "two.pt"), "--w", "2", "-o", str(d / "bad"), "--key", "emaa")
    assert_one_line_error(proc, "two.pt", "no sub-dict key 'emaa'", "'ema'", "'model'", exit_code=2)
    assert not (d / "amb").exists() and not (d / "bad").exists()


def _bad_synth(d, synth):
    save_file(synth, str(d / "bad.safetensors"))
    return str(d / "bad.safetensors")


@pytest.mark.parametrize("change, needles", [
    (lambda s: s.update({"enc.w": torch.zeros(37, 12)}), ["key 'enc.w'", "(37, 11)", "(37, 12)"]),
    (lambda s: s.update({"dec.steps": torch.zeros(2)}), ["key 'dec.steps'", "float vs non-float"]),
    (lambda s: s.update({"extra.w": torch.zeros(2)}), ["theta_s has key 'extra.w' that the base lacks"]),
])
def test_policy_errors_write_nothing(files, change, needles):
    d, base, synth = files
    change(synth)
    proc = neon("merge", str(d / "base.safetensors"), _bad_synth(d, synth), "--w", "1", "-o", str(d / "out"))
    assert_one_line_error(proc, *needles, exit_code=2)
    assert sorted(p.name for p in d.iterdir()) == ["bad.safetensors", "base.safetensors", "synth.safetensors"]


@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
def test_truncated_unreadable_and_existing_paths(files):
    d, base, synth = files
    raw = (d / "synth.safetensors").read_bytes()
    (d / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    proc = neon("merge", str(d / "base.safetensors"), str(d / "trunc.safetensors"), "--w", "1", "-o", str(d / "out"))
    assert_one_line_error(proc, "trunc.safetensors", exit_code=2)
    proc = neon("merge", str(d / "base.safetensors"), str(d / "nope.safetensors"), "--w", "1", "-o", str(d / "out"))
    assert_one_line_error(proc, "nope.safetensors: no such file or directory", exit_code=2)
    if os.geteuid() != 0:  # root reads everything
        (d / "locked.safetensors").write_bytes(raw)
        os.chmod(d / "locked.safetensors", 0)
        proc = neon("merge", str(d / "base.safetensors"), str(d / "locked.safetensors"), "--w", "1", "-o", str(d / "out"))
        assert_one_line_error(proc, "locked.safetensors: permission denied", exit_code=2)
    (d / "empty_dir").mkdir()
    proc = neon("merge", str(d / "base.safetensors"), str(d / "empty_dir"), "--w", "1", "-o", str(d / "out"))
    assert_one_line_error(proc, "empty_dir: neither a safetensors directory", exit_code=2)
    assert not (d / "out").exists()
    (d / "out").mkdir()
    proc = neon("merge", str(d / "base.safetensors"), str(d / "synth.safetensors"), "--w", "1", "-o", str(d / "out"))
    assert_one_line_error(proc, "already exists (use --overwrite", exit_code=2)
    leftovers = [p.name for p in d.iterdir() if "partial" in p.name]
    assert leftovers == []
