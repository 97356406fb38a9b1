"""The last confirmed tag -> digest of every node, as files in the shared store directory.

Each node keeps tags in its own LMDB index; this is the cluster's copy, so that when an upstream is
unreachable any node can serve a tag that any node resolved. Layout under the store root::

    tags/<upstream>/<repository path>/_tags/<tag>.json     {"digest": "sha256:...", "checked": 1.7e9}

The ``_tags`` directory keeps tag files and repository directories apart: a repository path
component (and an upstream name) never starts with ``_`` in the OCI grammar, while a tag file
``x.json`` right beside repository directories could collide with a repository component
``x.json``, which the grammar allows.

Protocol: a writer writes the record to a uniquely named temporary file in ``<root>/tmp`` (the same
filesystem), fsyncs it and renames it over the tag's file. Rename is atomic on POSIX filesystems, on
NFSv3/v4 and on sshfs (which uses OpenSSH's ``posix-rename`` extension), so a reader on any node sees
the old record or the new one, never a partial file. Concurrent writers of one tag: the last rename
wins; both records were true when written. A writer that dies leaves at most a temporary file, which
:meth:`storage.BlobStore.clean_temp` removes with the store's other crash leftovers.

Not guaranteed: a reader on another client may see the previous record for a while if its
directory entries are cached (NFS ``lookupcache=all``, sshfs's default ``dir_cache``); each read
opens the file afresh, so NFS close-to-open consistency otherwise gives the latest record. Records
carry the writer's clock in ``checked``; nodes' clocks should agree (NTP).

Names are validated by the caller (repository names and tags by the distribution spec's grammar);
this module still refuses anything that could leave its directory: empty, ``.``/``..`` or ``_``-
prefixed path components, absolute paths, NUL, ``/`` in an upstream or tag, and tags starting with
``.``.
"""
from __future__ import annotations

import json
import os

from .files import replace_file
from .digest import parse_digest
from .index import TagRecord

_TAG_DIR = "_tags"
_SUFFIX = ".json"
_MAX_RECORD = 4096


class InvalidTagPath(ValueError):
    """An upstream, repository or tag that could not safely become a path under ``tags/``."""


def _component(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidTagPath(f"empty {what}")
    if "\0" in value or "/" in value or "\\" in value:
        raise InvalidTagPath(f"invalid {what}: {value!r:.100}")
    if value in (".", "..") or value.startswith("_"):
        raise InvalidTagPath(f"invalid {what}: {value!r:.100}")
    return value


class SharedTags:
    """The shared tag records under ``<root>/tags``; ``root`` is the (shared) store directory."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.dir = os.path.join(self.root, "tags")
        self.tmp_dir = os.path.join(self.root, "tmp")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)

    def path(self, upstream: str, repository: str, tag: str) -> str:
        """The file of one tag; raises :class:`InvalidTagPath` for a name that could escape."""
        if not isinstance(repository, str) or repository.startswith("/"):
            raise InvalidTagPath(f"invalid repository: {repository!r:.100}")
        parts = [_component(upstream, "upstream")]
        parts += [_component(part, "repository component") for part in repository.split("/")]
        if not isinstance(tag, str) or tag.startswith(".") or tag in ("", "..", "."):
            raise InvalidTagPath(f"invalid tag: {tag!r:.100}")
        if "\0" in tag or "/" in tag or "\\" in tag:
            raise InvalidTagPath(f"invalid tag: {tag!r:.100}")
        path = os.path.join(self.dir, *parts, _TAG_DIR, tag + _SUFFIX)
        # Belt and braces: whatever got through must still be inside tags/.
        if os.path.commonpath([self.dir, os.path.normpath(path)]) != self.dir:
            raise InvalidTagPath(f"path escapes the tag directory: {path!r:.200}")
        return path

    def write(self, upstream: str, repository: str, tag: str, digest: str, checked: float) -> None:
        """Record that upstream confirmed ``tag`` -> ``digest`` at ``checked`` (atomic replace)."""
        parse_digest(digest)
        final = self.path(upstream, repository, tag)
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        replace_file(final, json.dumps({"digest": digest, "checked": checked}).encode(), self.tmp_dir, "tag")

    def read(self, upstream: str, repository: str, tag: str) -> TagRecord | None:
        """The last record any node wrote for this tag, or None (none, or unreadable)."""
        try:
            with open(self.path(upstream, repository, tag), "rb") as f:
                raw = f.read(_MAX_RECORD)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            record = json.loads(raw)
            digest, checked = record["digest"], record["checked"]
            parse_digest(digest)
            if isinstance(checked, bool) or not isinstance(checked, (int, float)):
                return None
        except (ValueError, KeyError, TypeError):
            return None  # not written by this module (atomic replace never leaves a partial file)
        return TagRecord(digest=digest, checked=float(checked))


__all__ = ["InvalidTagPath", "SharedTags"]
