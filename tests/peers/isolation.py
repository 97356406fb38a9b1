"""A throwaway HOME and config for the containers tools (skopeo, podman).

Without it they read and write the invoking user's ``auth.json``, ``registries.conf`` and
storage, so a developer's login or mirror settings could change what a test sees, and a test could
leave credentials behind. Every call gets its own directory, removed afterwards.
"""
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REGISTRIES_CONF = 'unqualified-search-registries = []\n'
POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}\n'


@dataclass(frozen=True)
class Isolated:
    """Paths and environment for one isolated tool run."""

    home: Path
    env: dict[str, str]
    registries_conf: Path
    policy: Path
    auth_file: Path


@contextmanager
def isolated() -> Iterator[Isolated]:
    with tempfile.TemporaryDirectory(prefix="metahub-peer-home-") as directory:
        home = Path(directory)
        registries_conf = home / "registries.conf"
        registries_conf.write_text(REGISTRIES_CONF)
        policy = home / "policy.json"
        policy.write_text(POLICY)
        auth_file = home / "auth.json"
        auth_file.write_text('{"auths": {}}')  # podman refuses a REGISTRY_AUTH_FILE that is absent
        runtime = home / "run"
        runtime.mkdir(mode=0o700)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
               "XDG_RUNTIME_DIR": str(runtime), "XDG_CONFIG_HOME": str(home / "config"),
               "XDG_DATA_HOME": str(home / "data"), "REGISTRY_AUTH_FILE": str(auth_file),
               "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
               "CONTAINERS_POLICY_JSON": str(policy), "TMPDIR": str(home)}
        yield Isolated(home, env, registries_conf, policy, auth_file)
