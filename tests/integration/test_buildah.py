"""buildah pulling through metahub logged in as a machine type: the build for that type."""
from __future__ import annotations

import pytest

from metahub.web.auth import hash_password
from tests.peers import buildah, skopeo
from tests.peers.oci import make_bench_index
from tests.peers.registry import Registry

from .common import BROADWELL, MACHINE_TYPES, PASSWORD, SKYLAKE
from .metahub_process import Metahub


@pytest.mark.parametrize("machine_type, build", [("type1", BROADWELL), ("type2", SKYLAKE)])
def test_buildah_gets_the_build_of_its_machine_type(tmp_path, machine_type: str, build: int) -> None:
    with Registry(tmp_path / "upstream") as upstream:
        index = make_bench_index(tmp_path / "layout", "1.0", layers=[20_000])
        skopeo.push(tmp_path / "layout", "1.0", f"{upstream.host}/team/bench:1.0")
        accounts = {"qnib": {"password_hash": hash_password(PASSWORD), "machine_types": list(MACHINE_TYPES)}}
        with Metahub(tmp_path / "hub", {"local": {"url": upstream.url}}, anonymous="deny",
                     machine_types=MACHINE_TYPES, accounts=accounts) as hub:
            digest = buildah.pull(f"{hub.host}/team/bench:1.0", tmp_path / "buildah",
                                  creds=f"qnib-{machine_type}:{PASSWORD}")
    assert digest == index.images[build].digest
