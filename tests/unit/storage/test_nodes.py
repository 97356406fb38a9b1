"""Node records: one small file per node, replaced whole."""
from __future__ import annotations

import os

import pytest

from storage.nodes import NodeRecord, NodeRecords


def test_node_records_round_trip_and_replace(tmp_path) -> None:
    records = NodeRecords(str(tmp_path))
    records.write(NodeRecord("node-a", 10.0, 5, 1))
    records.write(NodeRecord("node-b", 11.0, 0, 2))
    records.write(NodeRecord("node-a", 12.0, 9, 1))
    (tmp_path / "nodes" / "junk.json").write_text("{not json")
    assert records.read_all() == [NodeRecord("node-a", 12.0, 9, 1), NodeRecord("node-b", 11.0, 0, 2)]
    assert [p.name for p in (tmp_path / "nodes").iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_write_leaves_the_old_record_and_no_temporary_file(tmp_path, monkeypatch) -> None:
    records = NodeRecords(str(tmp_path))
    records.write(NodeRecord("node-a", 10.0, 5, 1))

    def refuse(source: str, target: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(OSError):
        records.write(NodeRecord("node-a", 11.0, 6, 1))
    monkeypatch.undo()
    assert records.read_all() == [NodeRecord("node-a", 10.0, 5, 1)]
    assert os.listdir(tmp_path / "tmp") == []  # and a crash's leftover would be swept with tmp/


def test_records_silent_for_longer_than_the_cutoff_are_pruned(tmp_path) -> None:
    records = NodeRecords(str(tmp_path))
    records.write(NodeRecord("gone", 100.0, 1, 1))
    records.write(NodeRecord("alive", 200.0, 2, 2))
    assert records.prune(seen_before=150.0) == 1
    assert records.read_all() == [NodeRecord("alive", 200.0, 2, 2)]
    assert records.prune(seen_before=150.0) == 0
