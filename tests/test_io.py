"""Atomic writes: complete files only, with the usual permissions (not mkstemp's private 0600)."""
import os

from neon_scale.io import write_json, write_text


def test_atomic_write_mode_follows_the_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "b.json", {"k": 1})
    for name in ("a.txt", "b.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]
