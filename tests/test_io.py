"""io: atomic writes (complete files only, with the usual permissions, not mkstemp's private 0600); and
our weights loaded into a model one tensor at a time (merge.sources.load_file_into)."""
import os

import pytest
import torch
from safetensors.torch import save_file

from neon_scale.errors import NeonError
from neon_scale.io import load_into, load_state_dict, write_json, write_text
from neon_scale.merge.sources import load_file_into


def test_atomic_write_mode_follows_the_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "b.json", {"k": 1})
    for name in ("a.txt", "b.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


# ---------------------------------------------------------------------------------------------
# load_file_into: our safetensors read one tensor at a time, checked before anything is copied


def _net() -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    net.register_buffer("scale", torch.ones(2))
    return net


def test_load_file_into_equals_load_into(tmp_path):
    torch.manual_seed(0)
    src = _net()
    state = {k: v.double() if k == "scale" else v for k, v in src.state_dict().items()}  # a dtype cast as well
    save_file(state, str(tmp_path / "w.safetensors"))
    a, b = _net(), _net()
    load_file_into(a, tmp_path / "w.safetensors")
    load_into(b, load_state_dict(tmp_path / "w.safetensors"), "w")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert va.dtype == vb.dtype and torch.equal(va, vb), k
        assert torch.equal(va, src.state_dict()[k].to(va.dtype)), k


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("2.bias"), "missing key '2.bias'"),
    (lambda s: s.update(extra=torch.zeros(1)), "unexpected key 'extra'"),
    (lambda s: s.update({"2.bias": torch.zeros(3)}), "key '2.bias' has shape (3,), the model expects (2,)"),
])
def test_load_file_into_refuses_before_copying(tmp_path, change, message):
    state = {k: torch.full_like(v, 7.0) for k, v in _net().state_dict().items()}
    change(state)
    save_file(state, str(tmp_path / "w.safetensors"))
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NeonError) as e:
        load_file_into(net, tmp_path / "w.safetensors")
    assert str(e.value) == f"{tmp_path / 'w.safetensors'}: {message}"
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing half-loaded


def test_load_file_into_a_broken_file(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NeonError, match="not a valid safetensors file"):
        load_file_into(_net(), tmp_path / "w.safetensors")


def test_load_file_into_a_truncated_file(tmp_path):
    save_file({k: v.contiguous() for k, v in _net().state_dict().items()}, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:-4])
    with pytest.raises(NeonError, match="truncated safetensors file"):
        load_file_into(_net(), tmp_path / "w.safetensors")
