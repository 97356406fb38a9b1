"""Checks on a store directory that do not trust metahub's own code."""
from __future__ import annotations

import hashlib
import os


def assert_store_sound(store_path: str | os.PathLike[str]) -> int:
    """Every file under a blob's name holds exactly the bytes its name promises; returns how many."""
    count = 0
    for directory, _, files in os.walk(os.path.join(store_path, "blobs", "sha256")):
        for name in files:
            with open(os.path.join(directory, name), "rb") as blob:
                assert hashlib.sha256(blob.read()).hexdigest() == name, f"{name} holds other bytes"
            count += 1
    return count
