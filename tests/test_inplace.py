"""In-place merge: the sweep helper on a plain module, and each rank's ZeRO-3 partition merged in
place (2 ranks, gloo) equal to the offline `neon merge` result."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from neon_scale.merge.merge_files import merge_checkpoints
from neon_scale.merge.extrapolate import extrapolate_state
from neon_scale.merge.inplace import Extrapolator, apply_delta, delta_of, module_slots
from neon_scale.merge.open import open_source

from .conftest import ROOT, torchrun
from .inplace_zero3_worker import TinyNet


def _states(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = TinyNet().state_dict()
    synth = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    return base, synth


def test_apply_delta_is_the_reference_formula():
    from neon_scale.kernels.extrapolate import extrapolate_reference

    gen = torch.Generator().manual_seed(4)
    b, s = torch.randn(999, generator=gen), torch.randn(999, generator=gen)
    b[::50] = float("-inf")
    for w in (-1.7, 0.3, 2.0):
        assert torch.equal(apply_delta(*delta_of(b, s), w), extrapolate_reference(b, s, w))


@pytest.mark.parametrize("consume", [False, True])
def test_module_sweep_helper_matches_the_offline_merge_for_every_w(consume):
    base, synth = _states(0)
    base["b.bias"][1] = float("nan")
    kept = {k: v.clone() for k, v in synth.items()}
    given = {k: v.clone() for k, v in synth.items()}
    model = TinyNet()
    extrapolator = Extrapolator(module_slots(model, base, given, consume=consume))
    # consume: Delta lives in the given tensors' own memory (no copy); else they are left as they were
    assert all(any(s.delta.data_ptr() == v.data_ptr() for s in extrapolator.slots) == consume for v in given.values())
    assert all(torch.equal(given[k], kept[k]) for k in kept) != consume
    for w in (1.25, -0.5, 0.0, 2.0):
        extrapolator.set_w(w)
        ref = extrapolate_state(base, synth, w)
        got = model.state_dict()
        assert all(torch.equal(got[k], ref[k]) or (torch.isnan(got[k]).any() and torch.allclose(got[k], ref[k], equal_nan=True))
                   for k in ref)


@pytest.mark.slow  # real engines on 2 ranks through torchrun
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_in_place_merge_on_2_ranks_equals_offline_merge(tmp_path, precision):
    base, synth = _states(1)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(synth, str(tmp_path / "synth.safetensors"))
    ws = [1.5, -0.7]
    # What the engine holds: with bf16, DeepSpeed rounds the loaded weights to bf16 and starts the
    # fp32 masters from them; the offline merge gets the same theta_s.
    held = {k: v.to(torch.bfloat16).float() for k, v in synth.items()} if precision == "bf16" else synth
    save_file(held, str(tmp_path / "held.safetensors"))
    with open_source(tmp_path / "base.safetensors") as b, open_source(tmp_path / "held.safetensors") as s:
        merge_checkpoints(b, s, ws, tmp_path / "offline")  # fp32, as the fp32 masters
    with open_source(tmp_path / "base.safetensors") as b, open_source(tmp_path / "held.safetensors") as s:
        merge_checkpoints(b, s, ws, tmp_path / "offline16", dtype=precision)  # as the 16-bit parameters
    proc = torchrun(ROOT / "tests" / "inplace_zero3_worker.py", str(tmp_path / "base.safetensors"),
                    str(tmp_path / "synth.safetensors"), str(tmp_path), precision, *map(str, ws), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for w in ws:
        for kind, offline in (("params", "offline16"), ("masters", "offline")):
            ref = load_file(str(tmp_path / offline / f"w={w:g}" / "model.safetensors"))
            got = load_file(str(tmp_path / f"{kind}-w{w:g}.safetensors"))
            assert set(got) == set(ref)
            for k in ref:
                assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), (kind, w, k)
