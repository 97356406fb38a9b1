"""Charliecloud's ``ch-image``, the HPC runtime, as a pulling client.

It speaks HTTPS only (so metahub serves an ``ssl:`` endpoint and the CA goes in
``REQUESTS_CA_BUNDLE``), runs with Debian's own Python (its ``lark`` is a Debian package), needs
``USER`` set, and takes a login from ``CH_IMAGE_USERNAME``/``CH_IMAGE_PASSWORD`` with ``--auth``.
The store is a directory of unpacked images, so a test reads a pulled file straight from it.
"""
import os
from pathlib import Path

from .process import run
from .require import require_binary

DEBIAN_PYTHON = "/usr/bin/python3"


def pull(ref: str, store: Path, ca_bundle: Path, username: str | None = None, password: str | None = None) -> Path:
    """``ch-image pull`` of ``ref`` into ``store``; returns the unpacked image's directory."""
    binary = require_binary("ch-image")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(store.parent), "USER": "metahub-tests",
           "REQUESTS_CA_BUNDLE": str(ca_bundle)}
    auth: list[str] = []
    if username is not None:
        env |= {"CH_IMAGE_USERNAME": username, "CH_IMAGE_PASSWORD": password or ""}
        auth = ["--auth"]
    store.parent.mkdir(parents=True, exist_ok=True)
    # --no-cache: the build cache is a git repository, and git wants an identity we do not set.
    run([DEBIAN_PYTHON, binary, "-s", store, "--no-cache", "pull", *auth, ref], env=env)
    # ch-image names an image's directory after its reference, with "/" as "%" and ":" as "+".
    return store / "img" / ref.replace("/", "%").replace(":", "+")
