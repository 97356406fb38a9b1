"""Charliecloud (``ch-image``), the HPC runtime, pulling through metahub over TLS as a machine type."""
from __future__ import annotations

import pytest

from metahub.web.auth import hash_password
from tests.peers import charliecloud, skopeo
from tests.peers.oci import build_text, make_bench_index
from tests.peers.ports import LOOPBACK
from tests.peers.registry import Registry
from tests.peers.tls import make_ca

from .common import BROADWELL, MACHINE_TYPES, PASSWORD, SKYLAKE
from .metahub_process import Metahub, ServerTLS


@pytest.mark.parametrize("machine_type, build", [("type1", BROADWELL), ("type2", SKYLAKE)])
def test_ch_image_gets_the_build_of_its_machine_type(tmp_path, machine_type: str, build: int) -> None:
    ca = make_ca(tmp_path / "ca")
    cert, key = ca.issue(tmp_path / "ca", "metahub")
    with Registry(tmp_path / "upstream") as upstream:
        index = make_bench_index(tmp_path / "layout", "1.0", layers=[20_000])
        skopeo.push(tmp_path / "layout", "1.0", f"{upstream.host}/team/bench:1.0")
        accounts = {"qnib": {"password_hash": hash_password(PASSWORD), "machine_types": list(MACHINE_TYPES)}}
        with Metahub(tmp_path / "hub", {"local": {"url": upstream.url}}, anonymous="deny",
                     machine_types=MACHINE_TYPES, accounts=accounts,
                     tls=ServerTLS(cert, key, ca.cert_path)) as hub:
            image = charliecloud.pull(f"{LOOPBACK}:{hub.port}/team/bench:1.0", tmp_path / "ch" / "store",
                                      ca.cert_path, f"qnib-{machine_type}", PASSWORD)
            assert "/v2/team/bench/manifests/1.0" in hub.log()
    assert (image / "build.txt").read_bytes() == build_text(index.images[build].platform)
