"""ZeroCheckpointSource against DeepSpeed's own zero_to_fp32 on real 2-rank ZeRO 1/2/3 checkpoints."""
import pathlib
import shutil

import pytest
import torch

from neon_scale.errors import NeonError
from neon_scale.merge.open import open_source
from neon_scale.merge.zero import ZeroCheckpointSource, is_zero_checkpoint

from .conftest import torchrun
from .zero_ckpt_writer import CASES, Tiny, case_name

WRITER = pathlib.Path(__file__).with_name("zero_ckpt_writer.py")
RANK1_OPTIM = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("zero")
    proc = torchrun(WRITER, str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def reference(d: pathlib.Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(d))


@pytest.mark.slow  # the checkpoints come from a torchrun of real engines
@pytest.mark.parametrize("stage,precision", CASES)
def test_matches_zero_to_fp32_bit_for_bit(ckpts, stage, precision, monkeypatch):
    d = ckpts / case_name(stage, precision)
    ref = reference(d)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))
    assert is_zero_checkpoint(d, None)
    with open_source(d) as src:
        assert isinstance(src, ZeroCheckpointSource) and src.stage == stage and src.world == 2
        keys = src.keys()
        assert set(keys) == set(ref)
        assert keys == [k for k in Tiny().state_dict() if k in ref]  # the model's state_dict order
        for k in keys:
            t = src.get(k)
            assert src.meta(k).shape == tuple(t.shape) and src.meta(k).dtype == t.dtype, k
            assert t.dtype == ref[k].dtype and t.shape == ref[k].shape and torch.equal(t, ref[k]), k
            assert not t.requires_grad, k
        trainable = [k for k in keys if k not in ("frozen", "running", "count")]
        assert all(src.meta(k).dtype == torch.float32 for k in trainable)
    assert loads and all(kw.get("weights_only") is True and kw.get("mmap") is True for kw in loads)
    assert ("frozen" in keys) == (stage >= 2)  # ZeRO 1 saves no frozen parameters, like zero_to_fp32


@pytest.mark.slow  # the checkpoints come from a torchrun of real engines
def test_tag_argument_and_tag_directory(ckpts):
    d = ckpts / case_name(3, "bf16")
    tag = (d / "latest").read_text().strip()
    ref = reference(d)
    for src in (ZeroCheckpointSource(d, tag), open_source(d / tag)):
        assert torch.equal(src.get("a.weight"), ref["a.weight"])
        src.close()
    with pytest.raises(NeonError, match="nope: checkpoint tag directory not found"):
        ZeroCheckpointSource(d, "nope")


def broken_copy(ckpts: pathlib.Path, tmp_path: pathlib.Path, stage: int = 2) -> tuple[pathlib.Path, pathlib.Path]:
    d = shutil.copytree(ckpts / case_name(stage, "fp32"), tmp_path / "ckpt")
    return d, d / (d / "latest").read_text().strip()


def expect_error(d: pathlib.Path, culprit: pathlib.Path, words: str) -> None:
    with pytest.raises(NeonError) as err:
        ZeroCheckpointSource(d, None)
    msg = str(err.value)
    assert str(culprit) in msg and words in msg and "\n" not in msg, msg


@pytest.mark.slow  # the checkpoints come from a torchrun of real engines
def test_missing_latest(ckpts, tmp_path):
    d, _ = broken_copy(ckpts, tmp_path)
    (d / "latest").unlink()
    expect_error(d, d / "latest", "not found")
    assert not is_zero_checkpoint(d, None) and is_zero_checkpoint(d, "global_step2")


@pytest.mark.slow  # the checkpoints come from a torchrun of real engines
@pytest.mark.parametrize("stage", [2, 3])
def test_missing_rank_file(ckpts, tmp_path, stage):
    d, tagdir = broken_copy(ckpts, tmp_path, stage)
    (tagdir / RANK1_OPTIM).unlink()
    expect_error(d, tagdir / RANK1_OPTIM, "not found")


@pytest.mark.slow  # the checkpoints come from a torchrun of real engines
@pytest.mark.parametrize("name", [RANK1_OPTIM, "mp_rank_00_model_states.pt"])
def test_truncated_file(ckpts, tmp_path, name):
    d, tagdir = broken_copy(ckpts, tmp_path)
    f = tagdir / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_error(d, f, "truncated or corrupt")


def test_not_a_zero_checkpoint(tmp_path):
    assert not is_zero_checkpoint(tmp_path, None)
    with pytest.raises(NeonError, match="neither a safetensors directory"):
        open_source(tmp_path)


@pytest.mark.slow  # the checkpoints come from a torchrun of real engines
@pytest.mark.parametrize("stage", [2, 3])
def test_neon_merge_straight_from_the_zero_checkpoint_equals_merging_zero_to_fp32(ckpts, stage, tmp_path):
    """Acceptance: `neon merge BASE <zero dir>` == extrapolate(BASE, get_fp32_state_dict_from_zero_checkpoint)."""
    from safetensors.torch import save_file

    from neon_scale.merge.extrapolate import extrapolate_state
    from neon_scale.merge.sources import SafetensorsSource

    from .conftest import neon

    d = ckpts / case_name(stage, "fp32")
    ref_synth = reference(d)
    gen = torch.Generator().manual_seed(stage)
    base = {k: (v + 0.1 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v.clone()
            for k, v in ref_synth.items()}
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    proc = neon("merge", str(tmp_path / "base.safetensors"), str(d), "--w", "1.3", "--w", "-0.4", "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    for w in (1.3, -0.4):
        expected = extrapolate_state(base, ref_synth, w)
        got = SafetensorsSource(tmp_path / "out" / f"w={w:g}" / "model.safetensors")
        assert sorted(got.keys()) == sorted(expected)
        for k, v in expected.items():
            assert torch.equal(got.get(k), v), (w, k)


@pytest.mark.slow  # the checkpoints come from a torchrun of real engines
@pytest.mark.parametrize("stage,precision", CASES)
def test_neon_consolidate_equals_zero_to_fp32(ckpts, stage, precision, tmp_path):
    from neon_scale.merge.sources import SafetensorsSource

    from .conftest import neon

    d = ckpts / case_name(stage, precision)
    ref = reference(d)
    proc = neon("consolidate", str(d), "-o", str(tmp_path / "one"))
    assert proc.returncode == 0, proc.stderr
    proc = neon("consolidate", str(d), "-o", str(tmp_path / "sharded"), "--max-shard-size", "200B")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for out in (tmp_path / "one" / "model.safetensors", tmp_path / "sharded"):
        got = SafetensorsSource(out)
        assert sorted(got.keys()) == sorted(ref)
        for k, v in ref.items():
            assert torch.equal(got.get(k), v.contiguous()), (out, k)


@pytest.mark.slow  # the checkpoints come from a torchrun of real engines
def test_neon_consolidate_errors(ckpts, tmp_path):
    from .conftest import neon
    from .conftest import assert_one_line_error

    proc = neon("consolidate", str(tmp_path / "missing"), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "missing: no such checkpoint directory", exit_code=2)
    proc = neon("consolidate", str(ckpts / case_name(2, "fp32")), "-o", str(tmp_path / "out"), "--tag", "nope")
    assert_one_line_error(proc, "nope", exit_code=2)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Pages of mmapped partitions already read are given back (the reader's RSS stays ~ one tensor)


def _mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and head and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not pathlib.Path("/proc/self/smaps").is_file(), reason="needs Linux /proc")
def test_drop_pages_gives_back_read_pages_and_never_touches_anonymous_memory(tmp_path):
    from neon_scale.merge.zero import _drop_pages

    torch.save({"flat": torch.arange(2_000_000, dtype=torch.float32)}, tmp_path / "part.pt")
    t = torch.load(tmp_path / "part.pt", mmap=True, weights_only=True)["flat"]
    assert float(t.double().sum()) == float(torch.arange(2_000_000, dtype=torch.float64).sum())  # every page read
    before = _mapped_rss_kib((tmp_path / "part.pt").resolve())
    assert before >= 7_000  # ~7.6 MiB of file pages resident
    _drop_pages([t[1000:], t[:1000]], tmp_path)
    assert _mapped_rss_kib((tmp_path / "part.pt").resolve()) < 100
    assert torch.equal(t, torch.arange(2_000_000, dtype=torch.float32))  # read again from the file
    anon = torch.arange(2_000_000, dtype=torch.float32)
    _drop_pages([anon], tmp_path)  # not a mapping of the folder's files: untouched (DONTNEED would zero it)
    assert torch.equal(anon, torch.arange(2_000_000, dtype=torch.float32))
