"""Hardware that knows what it can run, through real clients (issue 12, "The gap").

A mixed-cluster index (generic, x86-64-v3, Haswell, Skylake-AVX512, Ice Lake, sm_80, Haswell+sm_80,
sm_90) and an amd64-levels index (amd64, amd64/v2, v3, v4) are pushed into docker-registry with
skopeo and pulled through metahub by skopeo, podman and ctr logged in as machine types; each gets
the build that runs best on its hardware, byte for byte with upstream's digest.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from metahub.web.auth import hash_password
from storage import sha256_digest
from tests.peers import containerd, podman, skopeo
from tests.peers.isolation import isolated
from tests.peers.oci import build_text, make_bench_index, make_image, make_index
from tests.peers.registry import Registry
from tests.peers.require import require_binary

from .common import request
from .metahub_process import Metahub

PASSWORD = "correct horse"
AMD64 = {"os": "linux", "architecture": "amd64"}
CLUSTER = [
    dict(AMD64),
    {**AMD64, "features": ["cpu:x86_64_v3"]},
    {**AMD64, "features": ["cpu:haswell"]},
    {**AMD64, "features": ["cpu:skylake_avx512"]},
    {**AMD64, "features": ["cpu:icelake"]},
    {**AMD64, "features": ["nvcap:8.0"]},
    {**AMD64, "features": ["cpu:haswell", "nvcap:8.0"]},
    {**AMD64, "features": ["nvcap:9.0"]},
]
GENERIC, V3, HASWELL, SKX, ICELAKE, SM80, HASWELL_SM80, SM90 = range(8)
LEVELS = ["v1", "v2", "v3", "v4"]  # v1 is pushed without a variant, as plain amd64


def features(*names: str) -> dict[str, object]:
    return {"platform": dict(AMD64), "features": list(names)}


MACHINE_TYPES = {
    "broadwell": features("cpu:broadwell"),
    "cascadelake": features("cpu:cascadelake"),
    "zen3": features("cpu:zen3"),
    "a10": features("nvcap:8.6"),  # an A10 GPU node; its CPU is no concern of these builds
    "a10hsw": features("nvcap:8.6", "cpu:haswell"),
    "h100": features("nvcap:9.0", "cpu:icelake"),  # nvcap first: GPU builds preferred
    "nehalem": features("cpu:nehalem"),
    "legacy": {**features("cpu:broadwell"), "match": "subset"},  # the literal rule, for contrast
}
EXPECTED_CLUSTER = {"broadwell": HASWELL, "cascadelake": SKX, "zen3": V3, "a10": SM80, "a10hsw": HASWELL_SM80,
                    "h100": SM90, "nehalem": GENERIC, "legacy": GENERIC}
EXPECTED_LEVEL = {"broadwell": "v3", "cascadelake": "v4", "zen3": "v3", "a10": "v1", "a10hsw": "v3",
                  "h100": "v4", "nehalem": "v2", "legacy": "v1"}


def level_text(level: str) -> bytes:
    return f"This container is optimised for: linux/amd64 level {level}\n".encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardware")
    with Registry(root / "upstream") as upstream:
        cluster = make_bench_index(root / "cluster", "1.0", layers=[20_000], platforms=CLUSTER)
        skopeo.push(root / "cluster", "1.0", f"{upstream.host}/team/cluster:1.0")
        builds = [make_image(root / "levels", None, [20_000], {**AMD64, **({"variant": v} if v != "v1" else {})},
                             {"build.txt": level_text(v)}) for v in LEVELS]
        levels = make_index(root / "levels", "1.0", builds)
        skopeo.push(root / "levels", "1.0", f"{upstream.host}/team/levels:1.0")
        accounts = {"ops": {"password_hash": hash_password(PASSWORD), "machine_types": list(MACHINE_TYPES)}}
        with Metahub(root / "hub", {"local": {"url": upstream.url}}, anonymous="deny",
                     machine_types=MACHINE_TYPES, accounts=accounts) as hub:
            yield upstream, hub, cluster, levels, root


def creds(machine_type: str) -> str:
    return f"ops-{machine_type}:{PASSWORD}"


def basic(login: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{login}:{PASSWORD}".encode()).decode()}


@pytest.mark.parametrize("machine_type", sorted(EXPECTED_CLUSTER))
def test_skopeo_gets_the_best_cluster_build(world, machine_type: str) -> None:
    upstream, hub, cluster, _, _ = world
    chosen = cluster.images[EXPECTED_CLUSTER[machine_type]]
    raw = skopeo.inspect_raw(f"{hub.host}/team/cluster:1.0", creds=creds(machine_type))
    assert sha256_digest(raw) == chosen.digest, machine_type
    assert raw == chosen.manifest
    # That digest is upstream's own: it pulls by digest through metahub, untouched, and upstream.
    assert skopeo.inspect_raw(f"{hub.host}/team/cluster@{chosen.digest}", creds=creds(machine_type)) == raw
    assert skopeo.inspect_raw(f"{upstream.host}/team/cluster@{chosen.digest}") == raw


@pytest.mark.parametrize("machine_type", sorted(EXPECTED_LEVEL))
def test_skopeo_gets_the_highest_amd64_level_the_cpu_runs(world, machine_type: str) -> None:
    _, hub, _, levels, _ = world
    chosen = levels.images[LEVELS.index(EXPECTED_LEVEL[machine_type])]
    raw = skopeo.inspect_raw(f"{hub.host}/team/levels:1.0", creds=creds(machine_type))
    assert sha256_digest(raw) == chosen.digest, machine_type


def test_a_pull_by_digest_of_the_index_is_never_rewritten(world) -> None:
    _, hub, cluster, levels, _ = world
    for index, name in ((cluster, "cluster"), (levels, "levels")):
        raw = skopeo.inspect_raw(f"{hub.host}/team/{name}@{index.digest}", creds=creds("cascadelake"))
        assert raw == index.manifest


def test_podman_runs_the_right_build(world) -> None:
    _, hub, cluster, levels, root = world
    for machine_type in ("broadwell", "a10"):
        ref = f"{hub.host}/team/cluster:1.0"
        store = root / f"podman-{machine_type}"
        podman.pull(ref, store, creds=creds(machine_type))
        assert podman.read_file(ref, store, "build.txt") == build_text(CLUSTER[EXPECTED_CLUSTER[machine_type]])
    ref = f"{hub.host}/team/levels:1.0"
    store = root / "podman-cascadelake"
    podman.pull(ref, store, creds=creds("cascadelake"))
    assert podman.read_file(ref, store, "build.txt") == level_text("v4")


def test_containerd_gets_the_right_build(world) -> None:
    _, hub, cluster, levels, root = world
    with containerd.Containerd(root / "containerd") as daemon:
        ref = f"{hub.host}/team/cluster:1.0"
        containerd.ctr_pull(daemon.address, ref, user=creds("cascadelake"))
        assert containerd.image_digest(daemon.address, ref) == cluster.images[SKX].digest
        ref = f"{hub.host}/team/levels:1.0"
        containerd.ctr_pull(daemon.address, ref, user=creds("zen3"))
        assert containerd.image_digest(daemon.address, ref) == levels.images[LEVELS.index("v3")].digest


def test_inspect_and_resolve_say_what_each_build_needs_and_why(world) -> None:
    _, hub, cluster, _, _ = world
    cli = subprocess.run([Path(sys.executable).with_name("metahub"), "inspect", "--json", "--config",
                          hub.config_path, "team/cluster:1.0"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    report = json.loads(cli.stdout)
    status, _, body = request(hub.host, "GET", "/_metahub/v1/resolve?image=team/cluster:1.0",
                              basic("ops"))
    assert status == 200 and json.loads(body) == report
    assert report["entries"][SKX]["needs"].startswith(
        "linux/amd64: cpu skylake_avx512 or newer: cascadelake, icelake, sapphirerapids")
    assert report["entries"][HASWELL_SM80]["needs"].endswith("; nvcap 8.x ≥ 8.0")
    for machine_type, position in EXPECTED_CLUSTER.items():
        choice = report["machine_types"][machine_type]
        assert (choice["position"], choice["digest"]) == (position, cluster.images[position].digest)
    broadwell = report["machine_types"]["broadwell"]
    assert [b["position"] for b in broadwell["beat"]] == [V3, GENERIC]
    assert broadwell["beat"][0]["why"] == "a more specific cpu build: cpu:haswell against cpu:x86_64_v3"
    assert {r["position"]: r["why"] for r in broadwell["refused"]}[SKX] == (
        "needs cpu:skylake_avx512, which broadwell does not run")


def test_no_build_for_the_machine_type_is_manifest_unknown(world) -> None:
    upstream, hub, _, _, root = world
    only = make_index(root / "gpuonly", "multi", [make_image(root / "gpuonly", None, [],
                                                            {**AMD64, "features": ["nvcap:9.0"]})])
    skopeo.push(root / "gpuonly", "multi", f"{upstream.host}/team/gpuonly:multi")
    status, _, body = request(hub.host, "GET", "/v2/team/gpuonly/manifests/multi",
                              {**basic("ops-a10"), "Accept": "application/vnd.oci.image.index.v1+json"})
    assert status == 404, body
    error = json.loads(body)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "machine type a10" in error["message"] and "nvcap:9.0" in error["message"]
    assert only.images[0].digest in json.dumps(error["detail"])


def test_skopeo_copy_all_keeps_platform_features(world) -> None:
    """docs/machine-types.md tells operators to label builds and mirror them with ``skopeo copy --all``."""
    upstream, _, cluster, _, _ = world
    with isolated() as tools:
        subprocess.run([require_binary("skopeo"), "--registries-conf", tools.registries_conf, "--policy", tools.policy, "copy",
                        "--quiet", "--all", "--src-tls-verify=false", "--dest-tls-verify=false",
                        "--src-no-creds", "--dest-no-creds", f"docker://{upstream.host}/team/cluster:1.0",
                        f"docker://{upstream.host}/mirror/cluster:1.0"], check=True, env=tools.env,
                       capture_output=True, timeout=300)
    copied = skopeo.inspect_raw(f"{upstream.host}/mirror/cluster:1.0")
    assert copied == cluster.manifest
    assert [m["platform"].get("features") for m in json.loads(copied)["manifests"]][HASWELL_SM80] == [
        "cpu:haswell", "nvcap:8.0"]
