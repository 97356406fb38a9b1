from storage.nodes import NodeRecord, NodeRecords


def test_node_records_round_trip_and_replace(tmp_path) -> None:
    records = NodeRecords(str(tmp_path))
    records.write(NodeRecord("node-a", 10.0, 5, 1))
    records.write(NodeRecord("node-b", 11.0, 0, 2))
    records.write(NodeRecord("node-a", 12.0, 9, 1))
    (tmp_path / "nodes" / "junk.json").write_text("{not json")
    assert records.read_all() == [NodeRecord("node-a", 12.0, 9, 1), NodeRecord("node-b", 11.0, 0, 2)]
    assert [p.name for p in (tmp_path / "nodes").iterdir() if p.name.endswith(".tmp")] == []
