"""Repository names and references, checked against the distribution spec's grammar.

Names are checked before anything else, and references are either a tag (spec grammar) or a sha256 digest, so nothing from a URL reaches the filesystem or an
upstream URL unchecked.
"""
from __future__ import annotations

from metahub.oci import errors
from metahub.oci.grammar import (
    ANY_DIGEST,
    MAX_NAME_LENGTH,
    NAME,
    TAG,
    is_digest_reference,
)
from storage import ALGORITHM, algorithm_of, is_digest


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise errors.name_invalid(name[:MAX_NAME_LENGTH], f"repository name longer than {MAX_NAME_LENGTH} characters")
    if not NAME.fullmatch(name):
        raise errors.name_invalid(name, "invalid repository name: see the distribution spec's name grammar")
    return name


def check_digest(reference: str) -> str:
    """A digest reference: sha256 is served, another well-formed algorithm is refused clearly."""
    if is_digest(reference):
        return reference
    if ANY_DIGEST.fullmatch(reference) and algorithm_of(reference) != ALGORITHM:
        raise errors.digest_invalid(reference, "unsupported digest algorithm: only sha256 is accepted")
    raise errors.digest_invalid(reference, "invalid digest: expected sha256: followed by 64 lowercase hex")


def is_tag(reference: str) -> bool:
    return TAG.fullmatch(reference) is not None


def check_reference(reference: str) -> str:
    """A manifest reference: a tag, or a digest (anything with a ``:`` is read as a digest)."""
    if is_digest_reference(reference):
        return check_digest(reference)
    if not is_tag(reference):
        raise errors.manifest_unknown(reference, "invalid tag: see the distribution spec's tag grammar")
    return reference
