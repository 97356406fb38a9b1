"""podman as a pulling client, with its image store in a directory the test owns.

podman reads ``storage.conf`` before its flags, and refuses to start when the one it reads names no
driver or runroot, so a complete one pointing into ``root_dir`` (driver ``vfs``: no mounts, no
privileges) is written for each call. Against a registry serving HTTPS, ``cert_dir`` holds its CA
as ``ca.crt`` and verification is on. ``pull`` works here; ``podman run`` does not. As root,
``podman image mount`` on vfs is just a directory path, which is how ``read_file`` looks inside.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from .isolation import Isolated, isolated
from .process import run
from .require import require_binary


@dataclass(frozen=True)
class PulledImage:
    """What podman recorded for a pull.

    ``digest`` is the digest the tag resolved to (the index for a multi-platform image);
    ``repo_digests`` also holds the digest of the platform manifest podman chose.
    """

    id: str
    digest: str
    repo_digests: list[str]
    architecture: str


def _podman(root_dir: Path, arguments: list[str | Path], tools: Isolated) -> bytes:
    storage_conf = tools.home / "storage.conf"
    storage_conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{root_dir / "graph"}"\n'
                            f'runroot = "{root_dir / "run"}"\n')
    env = {**tools.env, "CONTAINERS_STORAGE_CONF": str(storage_conf)}
    return run([require_binary("podman"), "--tmpdir", root_dir / "tmp", "--events-backend", "none",
                *arguments], env=env)


def pull(ref: str, root_dir: Path, creds: str | None = None, arch: str | None = None,
         cert_dir: Path | None = None) -> PulledImage:
    """Pull ``ref`` into the store under ``root_dir``: over plain HTTP, or over verified HTTPS
    when ``cert_dir`` is given."""
    with isolated() as tools:
        options: list[str | Path] = ["--creds", creds] if creds else []
        options += ["--arch", arch] if arch else []
        options += ["--tls-verify=true", "--cert-dir", cert_dir] if cert_dir else ["--tls-verify=false"]
        _podman(root_dir, ["pull", "--quiet", "--signature-policy", tools.policy, *options, ref],
                tools)
        [info] = json.loads(_podman(root_dir, ["image", "inspect", ref], tools))
    return PulledImage(info["Id"], info["Digest"], info["RepoDigests"], info["Architecture"])


def read_file(ref: str, root_dir: Path, path: str) -> bytes:
    """A file from the pulled image's filesystem, e.g. the ``build.txt`` naming its build."""
    with isolated() as tools:
        mountpoint = _podman(root_dir, ["image", "mount", ref], tools).decode().strip()
        try:
            return (Path(mountpoint) / path.lstrip("/")).read_bytes()
        finally:
            _podman(root_dir, ["image", "unmount", ref], tools)
