"""Finding peer programs, with the CI rule: a missing peer there is a failure, never a skip.

A developer without skopeo or containerd can still run the rest of the suite; in CI a skip would
hide that the integration tests never ran, so it fails loudly instead.
"""
import os
import shutil

import pytest


def in_ci() -> bool:
    """CI services set CI=true; "1" and other spellings of true count too."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes", "on"}


def missing(message: str) -> None:
    """A peer the test needs is not here: fail in CI, skip elsewhere."""
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_binary(name: str) -> str:
    """The absolute path of program ``name``; skips the test (fails it in CI) if absent."""
    path = shutil.which(name)
    if path is None:
        missing(f"peer program {name!r} is not installed (scripts/test installs it when run as root)")
    return path
