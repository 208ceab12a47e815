"""Atomic writes: all or nothing, usual file mode."""

from __future__ import annotations

import os

import pytest

from gma6.io import atomic_write, atomic_write_text


def test_failed_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_text(p, "old")

    def boom(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]


def test_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o644
