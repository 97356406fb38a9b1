"""The distribution spec's grammar for repository names, tags and image references.

Kept free of metahub imports so both the config loader and the request path can use one
definition; what a digest is, is storage's (the one check a store path relies on).
"""
from __future__ import annotations

import re

from storage.digest import is_digest

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
#: One path component of a repository name.
COMPONENT = re.compile(_COMPONENT)
NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
#: A digest of any algorithm, well formed (the image spec's grammar); the store takes sha256 only.
ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
MAX_NAME_LENGTH = 255


def is_digest_reference(reference: str) -> bool:
    """Whether a manifest reference names a digest rather than a tag: a tag cannot hold ``:``, a
    digest always does (which digest, and whether it is one the store takes, is checked apart)."""
    return ":" in reference


def split_reference(reference: str) -> tuple[str, str]:
    """``NAME[:TAG|@DIGEST]`` -> (name, tag or digest; ``latest`` when absent); ValueError if malformed."""
    name, at, digest = reference.partition("@")
    if at:
        if not is_digest(digest):
            raise ValueError(f"{reference!r}: a digest must be sha256: followed by 64 lowercase hex")
        tag = digest
    else:
        slash = name.rfind("/")
        colon = name.rfind(":")
        name, tag = (name[:colon], name[colon + 1 :]) if colon > slash else (name, "latest")
        if not TAG.fullmatch(tag):
            raise ValueError(f"{reference!r}: {tag!r} is not a valid tag")
    if len(name) > MAX_NAME_LENGTH or not NAME.fullmatch(name):
        raise ValueError(f"{reference!r}: {name!r} is not a valid repository name")
    return name, tag
