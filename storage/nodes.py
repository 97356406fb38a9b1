"""Which nodes use a shared store, and how their caches do: one small record per node.

Each node rewrites ``<root>/nodes/<node>.json`` now and then (through ``tmp/`` and a rename, so
readers never see half a record): when it was last seen and its hit and miss counts since it started.
``<node>`` is the node's stable name (config ``node_id``, default its host name), so a restarted node
keeps one record; records silent for a day are pruned. Operators' ``metahub cache stats`` reads
them all. Records are advisory; nothing depends on them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass

from .files import replace_file

_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


@dataclass(frozen=True)
class NodeRecord:
    node: str
    last_seen: float
    hits: int
    misses: int


class NodeRecords:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(os.path.abspath(root), "nodes")
        self.tmp_dir = os.path.join(os.path.abspath(root), "tmp")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)

    def write(self, record: NodeRecord) -> None:
        if not _NODE.fullmatch(record.node):
            raise ValueError(f"invalid node name: {record.node!r:.100}")
        final = os.path.join(self.dir, record.node + ".json")
        replace_file(final, json.dumps(asdict(record)).encode(), self.tmp_dir, "node")

    def prune(self, seen_before: float) -> int:
        """Remove the records of nodes not seen since ``seen_before``; returns how many went."""
        removed = 0
        for record in self.read_all():
            if record.last_seen < seen_before:
                try:
                    os.unlink(os.path.join(self.dir, record.node + ".json"))
                    removed += 1
                except FileNotFoundError:
                    pass  # another node pruned it first
        return removed

    def read_all(self) -> list[NodeRecord]:
        records = []
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.dir, name)) as source:
                    records.append(NodeRecord(**json.load(source)))
            except (OSError, ValueError, TypeError):
                continue  # vanished or foreign: advisory data
        return records
