"""Finding peer programs, with the CI rule: a missing peer there is a failure, never a skip.

A developer without skopeo or containerd can still run the rest of the suite; in CI a skip would
hide that the integration tests never ran, so it fails loudly instead.
"""
import os
import shutil

import pytest


def require_binary(name: str) -> str:
    """The absolute path of program ``name``; skips the test (fails it when CI=true) if absent."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"peer program {name!r} is not installed (scripts/test installs it when run as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
