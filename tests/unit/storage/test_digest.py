"""Digest strings, made and checked in one place."""
from __future__ import annotations

import hashlib

import pytest

from storage import (
    InvalidDigest,
    algorithm_of,
    from_hex,
    is_digest,
    matches,
    parse_digest,
    sha256_digest,
)

DATA = b"a manifest"
SHA256 = "sha256:" + hashlib.sha256(DATA).hexdigest()
SHA512 = "sha512:" + hashlib.sha512(DATA).hexdigest()


def test_a_sha256_digest_is_made_and_taken_apart_by_the_same_spelling() -> None:
    assert sha256_digest(DATA) == SHA256 == from_hex(hashlib.sha256(DATA).hexdigest())
    assert parse_digest(SHA256) == SHA256[len("sha256:"):] and is_digest(SHA256)
    assert algorithm_of(SHA256) == "sha256" and algorithm_of(SHA512) == "sha512"


@pytest.mark.parametrize("digest", [SHA256, SHA512])
def test_a_body_matches_its_digest_by_the_algorithm_the_digest_names(digest: str) -> None:
    assert matches(digest, DATA)
    assert not matches(digest, DATA + b" ")


def test_a_digest_of_an_unregistered_algorithm_cannot_be_matched() -> None:
    with pytest.raises(InvalidDigest):
        matches("md5:" + hashlib.md5(DATA).hexdigest(), DATA)
