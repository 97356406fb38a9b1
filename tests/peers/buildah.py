"""buildah as a pulling client, with its image store in a directory the test owns.

Like podman it reads ``storage.conf`` before its flags, so a complete one (driver ``vfs``: no
mounts, no privileges) points into ``root_dir``; the throwaway HOME keeps a developer's logins and
registries out.
"""
import json
from pathlib import Path

from .isolation import Isolated, isolated
from .process import run
from .require import require_binary


def _buildah(root_dir: Path, arguments: list[str | Path], tools: Isolated) -> bytes:
    storage_conf = tools.home / "storage.conf"
    storage_conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{root_dir / "graph"}"\n'
                            f'runroot = "{root_dir / "run"}"\n')
    env = {**tools.env, "CONTAINERS_STORAGE_CONF": str(storage_conf), "BUILDAH_ISOLATION": "chroot"}
    return run([require_binary("buildah"), *arguments], env=env)


def pull(ref: str, root_dir: Path, creds: str | None = None) -> str:
    """Pull ``ref`` over plain HTTP; returns the digest of the manifest buildah stored for it."""
    with isolated() as tools:
        options = ["--creds", creds] if creds else []
        _buildah(root_dir, ["pull", "--quiet", "--tls-verify=false", "--signature-policy", tools.policy,
                            *options, ref], tools)
        [info] = json.loads(_buildah(root_dir, ["images", "--json", "--digests", ref], tools))
    return str(info["digest"])
