"""Exclusive create: one winner, and sshfs's EPERM for a lost race read as 'taken'."""
from __future__ import annotations

import os

import pytest

from storage import create_exclusive


def test_one_creator_wins(tmp_path) -> None:
    path = str(tmp_path / "name")
    fd = create_exclusive(path, 0o600)
    assert fd is not None
    os.close(fd)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert create_exclusive(path) is None


def test_eperm_means_taken_only_when_the_name_exists(tmp_path, monkeypatch) -> None:
    def refuse(path, flags, *mode):
        raise PermissionError(1, "Operation not permitted", path)

    taken = tmp_path / "taken"
    taken.write_text("someone else's")
    monkeypatch.setattr(os, "open", refuse)
    assert create_exclusive(str(taken)) is None
    with pytest.raises(PermissionError):  # a real permission problem is not hidden
        create_exclusive(str(tmp_path / "free"))
