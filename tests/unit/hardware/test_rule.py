"""The compatible rule (design.md, "Per-machine-type resolution"): feature families, amd64 levels and
the ranking, branch by branch, plus its properties. The literal rules (subset, exact) and the
parsing of indexes are in test_resolve.py."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import archspec.cpu
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metahub.config.file import parse_config
from metahub.hardware import inspect
from metahub.hardware.families import level_of, needs, runs_on, satisfied
from metahub.hardware.machine import MachineType
from metahub.hardware.resolve import choose, decide, entries, explain, resolve
from metahub.oci import media
from metahub.oci.errors import RegistryError

AMD64 = {"os": "linux", "architecture": "amd64"}


def digest(label: str) -> str:
    return "sha256:" + hashlib.sha256(label.encode()).hexdigest()


def index(platforms: list[dict[str, Any] | None]) -> bytes:
    """An OCI index whose entry N has digest ``digest(str(N))``."""
    manifests = []
    for position, platform in enumerate(platforms):
        descriptor: dict[str, Any] = {"mediaType": media.OCI_MANIFEST, "digest": digest(str(position)), "size": 1}
        if platform is not None:
            descriptor["platform"] = platform
        manifests.append(descriptor)
    return json.dumps({"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": manifests}).encode()


def build(*features: str, variant: str | None = None, architecture: str = "amd64") -> dict[str, Any]:
    platform: dict[str, Any] = {"os": "linux", "architecture": architecture}
    if features:
        platform["features"] = list(features)
    if variant:
        platform["variant"] = variant
    return platform


def machine(*features: str, variant: str | None = None, architecture: str = "amd64",
            match: str = "compatible") -> MachineType:
    return MachineType("m", "linux", architecture, variant, features, match)


def winner(platforms: list[dict[str, Any] | None], m: MachineType) -> int:
    return int(next(i for i in range(len(platforms)) if digest(str(i)) == resolve(index(platforms), m, "r").digest))


# The mixed-cluster index, in its order.
CLUSTER = [
    build(), build("cpu:x86_64_v3"), build("cpu:haswell"), build("cpu:skylake_avx512"), build("cpu:icelake"),
    build("nvcap:8.0"), build("cpu:haswell", "nvcap:8.0"), build("nvcap:9.0"),
]
GENERIC, V3, HASWELL, SKX, ICELAKE, SM80, HASWELL_SM80, SM90 = range(8)
LEVELS = [build(), build(variant="v2"), build(variant="v3"), build(variant="v4")]


# --- "The gap": each example gets the build that runs best on it --------------------------------


@pytest.mark.parametrize(("features", "expected", "subset_gave"), [
    (("cpu:broadwell",), HASWELL, GENERIC),
    (("cpu:cascadelake",), SKX, GENERIC),
    (("cpu:zen3",), V3, GENERIC),
    (("nvcap:8.6",), SM80, GENERIC),
    (("cpu:icelake",), ICELAKE, ICELAKE),
    (("nvcap:8.6", "cpu:haswell"), HASWELL_SM80, HASWELL),
], ids=["broadwell", "cascadelake", "zen3", "a10", "icelake", "a10-haswell"])
def test_the_gap(features: tuple[str, ...], expected: int, subset_gave: int) -> None:
    assert winner(CLUSTER, machine(*features)) == expected
    assert winner(CLUSTER, machine(*features, match="subset")) == subset_gave  # the literal rule, unchanged


@pytest.mark.parametrize(("features", "expected"), [
    (("cpu:broadwell",), 2), (("cpu:cascadelake",), 3), (("cpu:zen3",), 2), (("cpu:zen4",), 3),
    ((), 0), (("cpu:nehalem",), 1), (("cpu:core2",), 0), (("nvcap:8.6",), 0),
])
def test_amd64_levels_from_the_cpu(features: tuple[str, ...], expected: int) -> None:
    assert winner(LEVELS, machine(*features)) == expected
    # The literal rule takes any variant and, with no features to count, the first listed.
    assert winner(LEVELS, machine(*features, match="subset")) == 0


@pytest.mark.parametrize(("variant", "expected"), [("v1", 0), ("v2", 1), ("v3", 2), ("v4", 3)])
def test_the_machine_types_variant_is_its_level_whatever_its_cpu(variant: str, expected: int) -> None:
    assert winner(LEVELS, machine(variant=variant)) == expected
    assert winner(LEVELS, machine("cpu:icelake", variant=variant)) == expected  # the variant says so


def test_an_entry_above_the_level_is_refused_with_the_reason() -> None:
    decision = decide(entries(index(LEVELS[3:])), machine("cpu:broadwell"))
    assert decision.winner is None
    assert [why for _, why in decision.refused] == ["needs amd64 level v4, m has v3"]


@pytest.mark.parametrize("variant", ["v5", "x86-64-v3", "V3"])
def test_an_amd64_variant_that_is_not_a_level_is_never_a_candidate(variant: str) -> None:
    decision = decide(entries(index([build(variant=variant), build()])), machine("cpu:sapphirerapids"))
    assert decision.winner is not None and decision.winner.position == 1
    assert decision.refused[0][1] == f"variant {variant!r} is not an amd64 level (v1..v4)"


def test_other_architectures_keep_the_variant_rule() -> None:
    arm = [build(variant="v7", architecture="arm64"), build(architecture="arm64"),
           build(variant="v8", architecture="arm64")]
    assert winner(arm, machine(architecture="arm64", variant="v8")) == 2
    assert winner(arm, machine(architecture="arm64")) == 0  # no variant set: any, listed first
    decision = decide(entries(index(arm[1:2])), machine(architecture="arm64", variant="v8"))
    assert decision.winner is None and decision.refused[0][1] == "variant (none) is not v8"


# --- the families --------------------------------------------------------------------------------


@pytest.mark.parametrize(("needed", "host", "runs"), [
    ("cpu:haswell", "cpu:broadwell", True),
    ("cpu:x86_64_v3", "cpu:skylake", True),
    ("cpu:broadwell", "cpu:skylake", True),
    ("cpu:x86_64_v3", "cpu:zen3", True),
    ("cpu:haswell", "cpu:zen3", False),  # archspec: Zen 3 is not a Haswell descendant
    ("cpu:broadwell", "cpu:haswell", False),  # an older CPU never runs a newer build
    ("cpu:x86_64", "cpu:neoverse_v1", False),  # across families
    ("cpu:neoverse_n1", "cpu:neoverse_v2", True),
    ("cpu:haswell", "cpu:haswell", True),
])
def test_cpu_runs_its_ancestors_builds(needed: str, host: str, runs: bool) -> None:
    assert satisfied(needed, (host,)) is runs
    assert (archspec.cpu.TARGETS[host[4:]] >= archspec.cpu.TARGETS[needed[4:]]) is runs  # as archspec says


def test_a_cpu_archspec_does_not_know_matches_only_itself() -> None:
    assert satisfied("cpu:myriad9", ("cpu:myriad9",))
    assert not satisfied("cpu:myriad9", ("cpu:icelake",))
    assert not satisfied("cpu:icelake", ("cpu:myriad9",))


@pytest.mark.parametrize(("needed", "host", "runs"), [
    ("nvcap:8.0", "nvcap:8.6", True),
    ("nvcap:8.0", "nvcap:8.0", True),
    ("nvcap:8.6", "nvcap:8.0", False),  # a newer minor needs at least that minor
    ("nvcap:8.0", "nvcap:9.0", False),  # binary compatibility stops at the major version
    ("nvcap:9.0", "nvcap:8.9", False),
    ("nvcap:7.5", "nvcap:7.10", True),  # numbers, not strings
])
def test_nvcap_runs_within_a_major_version(needed: str, host: str, runs: bool) -> None:
    assert satisfied(needed, (host,)) is runs


@pytest.mark.parametrize("needed", ["nvcap:8", "nvcap:sm_80", "nvcap:8.0.1"])
def test_a_malformed_nvcap_in_an_entry_matches_only_itself(needed: str) -> None:
    assert not satisfied(needed, ("nvcap:8.6",))
    assert satisfied(needed, (needed,))


def test_other_features_are_literal() -> None:
    assert satisfied("infiniband", ("infiniband", "cpu:zen3"))
    assert not satisfied("infiniband", ("cpu:zen3",))
    assert not satisfied("net:ib", ("net:ib2",))


def test_level_of_a_cpu_is_its_highest_x86_64_ancestor() -> None:
    assert [level_of((f"cpu:{name}",), None) for name in ("core2", "nehalem", "haswell", "skylake_avx512")] == [1, 2, 3, 4]
    assert level_of(("cpu:neoverse_v1",), None) == 1 and level_of((), None) == 1
    assert level_of(("cpu:icelake",), "v2") == 2


# --- the ranking, step by step ---------------------------------------------------------------------


def test_a_more_features_beat_specificity() -> None:
    platforms = [build("cpu:icelake"), build("cpu:x86_64_v3", "nvcap:8.0")]
    assert winner(platforms, machine("cpu:icelake", "nvcap:8.6")) == 1


def test_b_the_family_listed_first_by_the_machine_type_is_preferred() -> None:
    platforms = [build("cpu:icelake"), build("nvcap:8.0")]
    assert winner(platforms, machine("nvcap:8.6", "cpu:icelake")) == 1  # a GPU node lists nvcap first
    assert winner(platforms, machine("cpu:icelake", "nvcap:8.6")) == 0  # a CPU-first order


def test_b_the_more_specific_cpu_wins() -> None:
    platforms = [build("cpu:x86_64_v3"), build("cpu:skylake_avx512"), build("cpu:haswell")]
    assert winner(platforms, machine("cpu:icelake")) == 1


def test_b_the_higher_capability_wins() -> None:
    assert winner([build("nvcap:8.0"), build("nvcap:8.6"), build("nvcap:8.9")], machine("nvcap:8.7")) == 1


def test_b_a_literal_family_only_counts_having_it() -> None:
    platforms = [build("cpu:haswell"), build("ib:hdr")]
    assert winner(platforms, machine("ib:hdr", "cpu:haswell")) == 1
    assert winner(platforms, machine("cpu:haswell", "ib:hdr")) == 0


def test_b_comes_before_c_the_amd64_level() -> None:
    platforms = [build("nvcap:8.0", variant="v3"), build("cpu:x86_64_v3")]
    assert winner(platforms, machine("cpu:haswell", "nvcap:8.0")) == 1
    assert winner(platforms, machine("nvcap:8.0", "cpu:haswell")) == 0


def test_c_the_higher_level_wins_between_equal_features() -> None:
    assert winner([build("cpu:haswell"), build("cpu:haswell", variant="v3")], machine("cpu:broadwell")) == 1


def test_d_the_first_listed_wins_a_full_tie() -> None:
    assert winner([build("cpu:haswell"), build("cpu:haswell")], machine("cpu:broadwell")) == 0


def test_the_seed_examples_resolve_as_before() -> None:
    seed = [build(), build("cpu:skylake"), build("cpu:broadwell"), build("cpu:broadwell", "nvcap:5.2"),
            build(variant="v8", architecture="arm64")]
    expected = {("cpu:broadwell",): 2, ("cpu:skylake",): 1, ("cpu:broadwell", "nvcap:5.2"): 3,
                ("cpu:zen4",): 0, (): 0}
    for features, position in expected.items():
        assert winner(seed, machine(*features)) == position, features
        assert winner(seed, machine(*features, match="subset")) == position, features
    assert winner(seed, machine(architecture="arm64", variant="v8")) == 4


# --- reasons ---------------------------------------------------------------------------------------


def test_decide_says_whom_the_winner_beat_and_why_the_rest_were_refused() -> None:
    decision = decide(entries(index(CLUSTER + [build(architecture="arm64"), None])), machine("cpu:broadwell"))
    assert decision.winner is not None and decision.winner.position == HASWELL
    assert [(e.position, why) for e, why in decision.beaten] == [
        (V3, "a more specific cpu build: cpu:haswell against cpu:x86_64_v3"),
        (GENERIC, "more features: 1 feature against 0 features"),
    ]
    refused = {e.position: why for e, why in decision.refused}
    assert refused[SKX] == "needs cpu:skylake_avx512, which m does not run"
    assert refused[HASWELL_SM80] == "needs nvcap:8.0, which m does not run"
    assert refused[8] == "linux/arm64 is not linux/amd64"
    assert refused[9].startswith("no platform")
    assert sorted([*refused, *(e.position for e in decision.candidates)]) == list(range(10))


def test_explain_names_the_winner_and_each_beaten_candidate() -> None:
    assert explain(entries(index(CLUSTER)), machine("cpu:zen3")) == (
        "manifests[1] linux/amd64 [cpu:x86_64_v3]: the best of 2 candidates; "
        "beat manifests[0] by more features: 1 feature against 0 features"
    )


def test_no_candidate_is_manifest_unknown_naming_the_type_and_the_offers() -> None:
    with pytest.raises(RegistryError) as caught:
        resolve(index([build("cpu:icelake"), build("nvcap:9.0")]), MachineType("bw", "linux", "amd64", None,
                                                                                ("cpu:broadwell",)), "t/app:1")
    assert (caught.value.status, caught.value.code) == (404, "MANIFEST_UNKNOWN")
    assert caught.value.message == (
        "no build of t/app:1 fits machine type bw (linux/amd64 [cpu:broadwell]); the index offers: "
        "linux/amd64 [cpu:icelake], linux/amd64 [nvcap:9.0]"
    )


def test_needs_in_words() -> None:
    assert needs(["nvcap:8.0"]) == ["nvcap 8.x ≥ 8.0"]
    [skx] = needs(["cpu:skylake_avx512"])
    assert skx.startswith("cpu skylake_avx512 or newer: cascadelake, icelake")
    assert "sapphirerapids" in runs_on("cpu:skylake_avx512") and "skylake" not in runs_on("cpu:skylake_avx512")
    assert needs(["cpu:x86_64_v3"])[0].endswith(", ...")  # dozens of CPUs: the sentence stays short
    assert "archspec does not know" in needs(["cpu:myriad9"])[0]
    assert needs(["ib:hdr"]) == ["ib:hdr (listed by the machine type)"]


def test_the_report_keeps_its_keys_and_adds_needs_beat_and_refused(tmp_path: Path) -> None:
    config = parse_config({
        "storage": {"path": str(tmp_path / "s"), "index": str(tmp_path / "i")},
        "upstreams": {"up": {"url": "https://registry.example"}},
        "machine_types": {"a10": {"platform": AMD64, "features": ["nvcap:8.6"]}},
    }, str(tmp_path))
    body = index(CLUSTER + [build(variant="v3")])
    result = inspect.report("t/app:1", body, media.OCI_INDEX, digest("index"), config)
    assert result["entries"][HASWELL_SM80]["needs"] == (
        "linux/amd64: " + needs(["cpu:haswell"])[0] + "; nvcap 8.x ≥ 8.0")
    assert result["entries"][8]["needs"] == "linux/amd64/v3: amd64 level v3 or higher"
    a10 = result["machine_types"]["a10"]
    assert {"digest", "position", "why", "beat", "refused", "match"} <= set(a10)
    assert (a10["position"], a10["digest"], a10["match"]) == (SM80, digest(str(SM80)), "compatible")
    assert [b["position"] for b in a10["beat"]] == [GENERIC]
    assert {r["position"]: r["why"] for r in a10["refused"]}[SM90] == "needs nvcap:9.0, which a10 does not run"
    assert {r["position"]: r["why"] for r in a10["refused"]}[8] == "needs amd64 level v3, a10 has v1"
    assert "needs linux/amd64: nvcap 8.x ≥ 8.0" in inspect.render(result)


# --- properties ------------------------------------------------------------------------------------

CPUS = ["x86_64", "x86_64_v2", "x86_64_v3", "x86_64_v4", "haswell", "broadwell", "skylake", "skylake_avx512",
        "cascadelake", "icelake", "zen2", "zen3", "zen4", "neoverse_v1"]
ENTRY_FEATURES = [*(f"cpu:{c}" for c in CPUS), "cpu:myriad9", "nvcap:8.0", "nvcap:8.6", "nvcap:9.0", "nvcap:x",
                  "ib:hdr"]
platforms = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"os": st.sampled_from(["linux", "windows"]), "architecture": st.sampled_from(["amd64", "arm64"])},
        optional={"variant": st.sampled_from(["v2", "v3", "v4", "v8", "zz"]),
                  "features": st.lists(st.sampled_from(ENTRY_FEATURES), max_size=3)},
    ),
)
machine_types = st.builds(
    MachineType, name=st.just("m"), os=st.just("linux"), architecture=st.sampled_from(["amd64", "arm64"]),
    variant=st.sampled_from([None, "v2", "v3"]),
    features=st.lists(st.sampled_from([*(f"cpu:{c}" for c in CPUS), "nvcap:8.6", "nvcap:9.0", "ib:hdr"]),
                      unique=True, max_size=3).map(tuple),
)


def oracle_fits(platform: dict[str, Any] | None, m: MachineType) -> bool:
    """The design's candidate rule, restated from the raw JSON with archspec, apart from the module."""
    if platform is None or (platform["os"], platform["architecture"]) != (m.os, m.architecture):
        return False
    variant = platform.get("variant")
    if m.architecture == "amd64":
        if variant not in (None, "v1", "v2", "v3", "v4"):
            return False
        if m.variant is not None:
            level = int(m.variant[1])
        else:
            names = {a.name for f in m.features if f.startswith("cpu:")
                     for a in [archspec.cpu.TARGETS[f[4:]], *archspec.cpu.TARGETS[f[4:]].ancestors]}
            level = max([int(n[-1]) for n in names if n in ("x86_64_v2", "x86_64_v3", "x86_64_v4")], default=1)
        if int((variant or "v1")[1]) > level:
            return False
    elif m.variant is not None and variant != m.variant:
        return False

    def runs(feature: str) -> bool:
        if feature in m.features:
            return True
        if feature.startswith("cpu:") and feature[4:] in archspec.cpu.TARGETS:
            return any(f.startswith("cpu:") and archspec.cpu.TARGETS[f[4:]] >= archspec.cpu.TARGETS[feature[4:]]
                       for f in m.features)
        if feature.startswith("nvcap:") and feature != "nvcap:x":
            major, minor = feature[6:].split(".")
            return any(f.startswith(f"nvcap:{major}.") and int(f.split(".")[1]) >= int(minor) for f in m.features)
        return False

    return all(runs(feature) for feature in platform.get("features", []))


@settings(max_examples=300, deadline=None)
@given(st.lists(platforms, max_size=8), machine_types)
def test_the_winner_is_always_a_candidate(raw: list[dict[str, Any] | None], m: MachineType) -> None:
    candidates = [i for i, platform in enumerate(raw) if oracle_fits(platform, m)]
    found = entries(index(raw))
    decision = decide(found, m)
    assert sorted(e.position for e in decision.candidates) == candidates
    if not candidates:
        assert choose(found, m) is None
        return
    assert decision.winner == choose(found, m) == resolve(index(raw), m, "r")
    most = max(len(set(raw[i].get("features", []))) for i in candidates)  # type: ignore[union-attr]
    assert len(decision.winner.features) == most  # step (a) is never overruled


@settings(max_examples=300, deadline=None)
@given(st.lists(platforms, min_size=1, max_size=6), machine_types, platforms, st.integers(0, 6))
def test_adding_an_incompatible_entry_never_changes_the_winner(
    raw: list[dict[str, Any] | None], m: MachineType, extra: dict[str, Any] | None, where: int,
) -> None:
    if oracle_fits(extra, m):
        extra = {**(extra or AMD64), "os": "windows"}  # now surely not this linux machine's
    before = choose(entries(index(raw)), m)
    where = min(where, len(raw))
    grown = raw[:where] + [extra] + raw[where:]
    after = choose(entries(index(grown)), m)
    if before is None:
        assert after is None
    else:
        assert after is not None
        assert after.position == before.position + (1 if before.position >= where else 0)
