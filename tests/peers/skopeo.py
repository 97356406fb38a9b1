"""skopeo as a pushing and pulling client.

Quirks that shape these helpers: skopeo does not treat 127.0.0.1 as insecure, so TLS verification
is switched off per side; it ignores CONTAINERS_REGISTRIES_CONF, so the (hidden) global
``--registries-conf`` flag points it at an empty file; and ``copy --all`` of an OCI layout keeps the
index byte for byte, ``platform.features`` included (``--format v2s2`` would drop them). Against a
registry serving HTTPS, ``cert_dir`` is a directory holding its CA as ``ca.crt`` (any ``*.crt``),
and verification is then on.
"""
from pathlib import Path

from .isolation import Isolated, isolated
from .process import run
from .require import require_binary


def _skopeo(arguments: list[str | Path], tools: Isolated) -> bytes:
    return run([require_binary("skopeo"), "--registries-conf", tools.registries_conf,
                "--policy", tools.policy, *arguments], env=tools.env)


def push(layout_dir: Path, tag: str, dest_ref: str, creds: str | None = None) -> None:
    """Copy ``oci:LAYOUT:TAG`` with all its platforms to ``docker://DEST_REF``."""
    with isolated() as tools:
        auth = ["--dest-creds", creds] if creds else ["--dest-no-creds"]
        _skopeo(["copy", "--quiet", "--all", "--dest-tls-verify=false", *auth,
                 f"oci:{layout_dir}:{tag}", f"docker://{dest_ref}"], tools)


def _tls(prefix: str, cert_dir: Path | None) -> list[str | Path]:
    """Verification off for plain-HTTP loopback registries, on against ``cert_dir``'s CA."""
    if cert_dir is None:
        return [f"--{prefix}tls-verify=false"]
    return [f"--{prefix}tls-verify=true", f"--{prefix}cert-dir", cert_dir]


def inspect_raw(ref: str, creds: str | None = None, tls_verify: bool = False,
                cert_dir: Path | None = None) -> bytes:
    """The manifest (or index) bytes exactly as the registry serves them for ``ref``."""
    with isolated() as tools:
        auth = ["--creds", creds] if creds else ["--no-creds"]
        tls = _tls("", cert_dir) if cert_dir else [f"--tls-verify={str(tls_verify).lower()}"]
        return _skopeo(["inspect", "--raw", *tls, *auth, f"docker://{ref}"], tools)


def copy_to_dir(ref: str, dest_dir: Path, creds: str | None = None, all_platforms: bool = False,
                override_arch: str | None = None, cert_dir: Path | None = None) -> None:
    """Pull ``ref`` into a ``dir:`` directory (manifest.json plus one file per blob).

    ``override_arch`` makes skopeo pick another platform from an index than the host's.
    """
    with isolated() as tools:
        auth = ["--src-creds", creds] if creds else ["--src-no-creds"]
        options = ["--all"] if all_platforms else []
        arch = ["--override-arch", override_arch] if override_arch else []
        _skopeo([*arch, "copy", "--quiet", *_tls("src-", cert_dir), *auth, *options,
                 f"docker://{ref}", f"dir:{dest_dir}"], tools)
