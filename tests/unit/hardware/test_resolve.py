"""Per-machine-type resolution: which entry of an index each machine type gets, and why not."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metahub.hardware.machine import MachineType
from metahub.hardware.resolve import Entry, choose, entries, explain, resolve
from metahub.oci import media
from metahub.oci.errors import RegistryError


def digest(label: str) -> str:
    return "sha256:" + hashlib.sha256(label.encode()).hexdigest()


# The qnib/bench list from the MetaHub blog post (its real digests), plus an arm64 build.
GENERIC = "sha256:b8914262d3517a80bccaf8e12c9e9fc5bca5ae804adf025ad175dea1106f0098"
SKYLAKE = "sha256:ff1738d040d2e7141a84c30cd780763544009dcf6758bed2a1d4f937eceae7aa"
BROADWELL = "sha256:e561d14bf57588b9d096b6bf09fce1ec7e86d3085d1dddfd1f376cce86f68ce6"
NVCAP = "sha256:3ff5a83983654319766e8f89a690b0ce28d03c9aa76623becfc2f46c922cf34f"
ARM64 = digest("arm64")
AMD64 = {"os": "linux", "architecture": "amd64"}


def seed_platforms() -> list[tuple[str, dict[str, Any]]]:
    return [
        (GENERIC, dict(AMD64)),
        (SKYLAKE, {**AMD64, "features": ["cpu:skylake"]}),
        (BROADWELL, {**AMD64, "features": ["cpu:broadwell"]}),
        (NVCAP, {**AMD64, "features": ["cpu:broadwell", "nvcap:5.2"]}),
        (ARM64, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
    ]


def index(platforms: list[tuple[str, dict[str, Any] | None]], docker: bool = False) -> bytes:
    """An index body: OCI image index, or Docker manifest list with ``docker=True``."""
    child = media.DOCKER_MANIFEST if docker else media.OCI_MANIFEST
    manifests = []
    for entry_digest, platform in platforms:
        descriptor: dict[str, Any] = {"mediaType": child, "digest": entry_digest, "size": 735}
        if platform is not None:
            descriptor["platform"] = platform
        manifests.append(descriptor)
    doc = {"schemaVersion": 2, "mediaType": media.DOCKER_LIST if docker else media.OCI_INDEX, "manifests": manifests}
    return json.dumps(doc).encode()


def amd64(name: str, *features: str, match: str = "subset") -> MachineType:
    return MachineType(name, "linux", "amd64", None, features, match)


def one_feature_each(*labels: str) -> bytes:
    return index([(digest(label), {**AMD64, "features": [label]}) for label in labels])


# --- the seed's index --------------------------------------------------------------------------

SEED_CASES = [
    (amd64("type1", "cpu:broadwell"), BROADWELL),
    (amd64("gpu", "cpu:broadwell", "nvcap:5.2"), NVCAP),
    (amd64("type2", "cpu:skylake"), SKYLAKE),
    (amd64("type9", "cpu:zen4"), GENERIC),
    (amd64("plain"), GENERIC),
    (MachineType("pi", "linux", "arm64", None, ("neon",)), ARM64),
    (MachineType("pi8", "linux", "arm64", "v8"), ARM64),
    (amd64("all", "cpu:broadwell", "nvcap:5.2", "cpu:skylake"), NVCAP),  # most features wins
]


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
@pytest.mark.parametrize(("machine_type", "expected"), SEED_CASES, ids=[m.name for m, _ in SEED_CASES])
def test_seed_index(docker: bool, machine_type: MachineType, expected: str) -> None:
    body = index(seed_platforms(), docker=docker)
    winner = resolve(body, machine_type, "qnib/bench:latest")
    assert winner.digest == expected
    assert winner.media_type == (media.DOCKER_MANIFEST if docker else media.OCI_MANIFEST)
    assert winner.size == 735
    assert choose(entries(body), machine_type) == winner


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
def test_entries_read_the_seed_index(docker: bool) -> None:
    found = entries(index(seed_platforms(), docker=docker))
    assert [e.position for e in found] == [0, 1, 2, 3, 4]
    assert [e.digest for e in found] == [GENERIC, SKYLAKE, BROADWELL, NVCAP, ARM64]
    assert found[3] == Entry(
        3, NVCAP, media.DOCKER_MANIFEST if docker else media.OCI_MANIFEST, 735,
        "linux", "amd64", None, frozenset({"cpu:broadwell", "nvcap:5.2"}),
    )
    assert [e.describe() for e in found] == [
        "linux/amd64 (generic)",
        "linux/amd64 [cpu:skylake]",
        "linux/amd64 [cpu:broadwell]",
        "linux/amd64 [cpu:broadwell, nvcap:5.2]",
        "linux/arm64/v8 (generic)",
    ]


SHUFFLED = ["f", "c", "e", "a", "d", "b"]  # six: a set's own order is hardly ever sorted by chance


def test_describe_sorts_features_and_names_a_missing_platform() -> None:
    found = entries(index([(digest("a"), {**AMD64, "features": SHUFFLED}), (digest("b"), None)]))
    assert [e.describe() for e in found] == ["linux/amd64 [a, b, c, d, e, f]", "no platform"]


def test_the_no_match_detail_sorts_features() -> None:
    with pytest.raises(RegistryError) as caught:
        resolve(index([(digest("a"), {**AMD64, "features": SHUFFLED})]), amd64("t"), "r")
    assert caught.value.detail["offered"][0]["features"] == sorted(SHUFFLED)


def test_a_platform_that_is_not_offered_gets_nothing() -> None:
    with pytest.raises(RegistryError):
        resolve(index(seed_platforms()), MachineType("win", "windows", "amd64"), "qnib/bench:latest")


# --- ties --------------------------------------------------------------------------------------


def test_a_tie_goes_to_the_entry_listed_first() -> None:
    both = amd64("both", "cpu:skylake", "cpu:broadwell")
    assert resolve(one_feature_each("cpu:skylake", "cpu:broadwell"), both, "r").digest == digest("cpu:skylake")
    assert resolve(one_feature_each("cpu:broadwell", "cpu:skylake"), both, "r").digest == digest("cpu:broadwell")


def test_listed_first_means_position_not_the_order_choose_is_given() -> None:
    both = amd64("both", "cpu:skylake", "cpu:broadwell")
    found = entries(one_feature_each("cpu:skylake", "cpu:broadwell"))
    assert choose(list(reversed(found)), both) == found[0]


def test_more_features_beat_being_listed_first() -> None:
    body = index([(digest("generic"), dict(AMD64)), (digest("bw"), {**AMD64, "features": ["cpu:broadwell"]})])
    assert resolve(body, amd64("t", "cpu:broadwell"), "r").digest == digest("bw")


@pytest.mark.parametrize("match", ["subset", "exact"])
def test_duplicate_builds_go_to_the_first(match: str) -> None:
    body = index([(digest("one"), {**AMD64, "features": ["x"]}), (digest("two"), {**AMD64, "features": ["x"]})])
    assert resolve(body, amd64("t", "x", match=match), "r").digest == digest("one")


# --- variants ----------------------------------------------------------------------------------

ARM_VARIANTS = [
    (digest("v7"), {"os": "linux", "architecture": "arm64", "variant": "v7"}),
    (digest("none"), {"os": "linux", "architecture": "arm64"}),
    (digest("v8"), {"os": "linux", "architecture": "arm64", "variant": "v8"}),
]


def test_a_machine_type_with_a_variant_gets_only_that_variant() -> None:
    pi = MachineType("pi", "linux", "arm64", "v8")
    assert resolve(index(ARM_VARIANTS), pi, "r").digest == digest("v8")
    with pytest.raises(RegistryError) as caught:
        resolve(index(ARM_VARIANTS[:2]), pi, "r")  # no variant is not v8: the variant must be equal
    assert "pi (linux/arm64/v8 (no features))" in caught.value.message


def test_a_machine_type_without_variant_takes_any_variant() -> None:
    arm = MachineType("arm", "linux", "arm64")
    assert resolve(index(ARM_VARIANTS), arm, "r").digest == digest("v7")
    assert resolve(index(ARM_VARIANTS[1:]), arm, "r").digest == digest("none")


def test_an_empty_variant_is_no_variant() -> None:
    [entry] = entries(index([(digest("a"), {**AMD64, "variant": ""})]))
    assert entry.variant is None and entry.describe() == "linux/amd64 (generic)"


def test_features_outweigh_variant_order() -> None:
    body = index([ARM_VARIANTS[0], (digest("sve"), {"os": "linux", "architecture": "arm64", "features": ["sve"]})])
    assert resolve(body, MachineType("arm", "linux", "arm64", None, ("sve",)), "r").digest == digest("sve")


# --- os.features -------------------------------------------------------------------------------


def test_os_features_are_features() -> None:
    body = index([
        (digest("nano"), {"os": "windows", "architecture": "amd64", "os.features": ["win32k"]}),
        (digest("plain"), {"os": "windows", "architecture": "amd64"}),
    ])
    [nano, plain] = entries(body)
    assert nano.features == frozenset({"win32k"}) and nano.describe() == "windows/amd64 [win32k]"
    assert resolve(body, MachineType("w", "windows", "amd64", None, ("win32k",)), "r") == nano
    assert resolve(body, MachineType("w", "windows", "amd64"), "r") == plain  # lacks win32k


def test_os_features_and_features_are_counted_together() -> None:
    body = index([
        (digest("one"), {**AMD64, "features": ["gpu"]}),
        (digest("two"), {**AMD64, "features": ["gpu"], "os.features": ["gpu", "kvm"]}),
    ])
    assert entries(body)[1].features == frozenset({"gpu", "kvm"})
    assert resolve(body, amd64("t", "gpu", "kvm"), "r").digest == digest("two")
    assert resolve(body, amd64("t", "gpu"), "r").digest == digest("one")


# --- exact -------------------------------------------------------------------------------------


def test_exact_rejects_a_subset_and_accepts_an_equal_set() -> None:
    body = index(seed_platforms())
    gpu = amd64("gpu", "cpu:broadwell", "nvcap:5.2", match="exact")
    assert resolve(body, gpu, "r").digest == NVCAP
    assert resolve(body, amd64("t1", "cpu:broadwell", match="exact"), "r").digest == BROADWELL
    with pytest.raises(RegistryError):  # subset would pick the cpu:broadwell entry
        resolve(body, amd64("t", "cpu:broadwell", "cpu:zen4", match="exact"), "r")


def test_exact_generic_only_for_a_type_without_features() -> None:
    body = index(seed_platforms())
    assert resolve(body, amd64("plain", match="exact"), "r").digest == GENERIC
    with pytest.raises(RegistryError):  # subset would fall back to the generic build
        resolve(body, amd64("type9", "cpu:zen4", match="exact"), "r")


def test_exact_still_checks_the_platform() -> None:
    body = index([(digest("arm"), {"os": "linux", "architecture": "arm64", "features": ["x"]})])
    assert choose(entries(body), amd64("t", "x", match="exact")) is None


# --- empty and missing features ----------------------------------------------------------------


@pytest.mark.parametrize("platform", [
    {**AMD64, "features": []},
    {**AMD64, "os.features": []},
    {**AMD64, "features": None, "os.features": None},
    dict(AMD64),
], ids=["features-empty", "os-features-empty", "null", "absent"])
def test_no_features_is_generic(platform: dict[str, Any]) -> None:
    [entry] = entries(index([(digest("g"), platform)]))
    assert entry.features == frozenset() and entry.describe() == "linux/amd64 (generic)"
    assert choose([entry], amd64("t", "cpu:zen4")) == entry
    assert choose([entry], amd64("t")) == entry


# --- entries that are not images ---------------------------------------------------------------


ATTESTATION = {"os": "unknown", "architecture": "unknown"}


@pytest.mark.parametrize("platform", [
    None,
    ATTESTATION,
    {"os": "linux", "architecture": "unknown"},
    {"os": "unknown", "architecture": "amd64"},
], ids=["no-platform", "unknown-unknown", "unknown-arch", "unknown-os"])
def test_entries_without_a_real_platform_are_never_candidates(platform: dict[str, Any] | None) -> None:
    body = index([(digest("odd"), platform)])
    for machine_type in (amd64("t"), MachineType("u", "unknown", "unknown"), MachineType("u", "linux", "unknown")):
        assert choose(entries(body), machine_type) is None


def test_no_platform_entries_keep_their_place_and_have_no_fields() -> None:
    [entry] = entries(index([(digest("a"), None)]))
    assert (entry.os, entry.architecture, entry.variant, entry.features) == (None, None, None, frozenset())


def test_attestations_do_not_get_in_the_way() -> None:
    body = index([(digest("att"), ATTESTATION), (digest("img"), dict(AMD64)), (digest("att2"), ATTESTATION)])
    assert resolve(body, amd64("t", "cpu:zen4"), "r").digest == digest("img")
    with pytest.raises(RegistryError) as caught:
        resolve(body, MachineType("pi", "linux", "arm64"), "r")
    assert caught.value.message.endswith("the index offers: linux/amd64 (generic)")  # no unknown/unknown
    assert [o["digest"] for o in caught.value.detail["offered"]] == [digest("img")]


@pytest.mark.parametrize("platform", [
    "linux/amd64",
    {**AMD64, "features": "cpu:broadwell"},
    {**AMD64, "features": ["cpu:broadwell", 5]},
    {**AMD64, "os.features": {"win32k": True}},
    {**AMD64, "variant": 8},
    {"os": "linux"},
    {"os": "", "architecture": "amd64"},
    {"os": 1, "architecture": "amd64"},
], ids=["string", "features-string", "features-non-string", "os-features-mapping", "variant-number",
        "no-architecture", "empty-os", "os-number"])
def test_an_unreadable_platform_counts_as_none(platform: Any) -> None:
    """A malformed feature list must not make a special build look generic."""
    [entry] = entries(index([(digest("odd"), platform)]))
    assert entry.os is None and entry.describe() == "no platform"
    assert choose([entry], amd64("t", "cpu:broadwell")) is None


def test_entries_without_a_digest_are_skipped_and_positions_kept() -> None:
    doc = {"manifests": [
        {"mediaType": media.OCI_MANIFEST, "size": 1, "platform": AMD64},
        {"digest": "", "platform": AMD64},
        {"digest": 7, "platform": AMD64},
        "not a descriptor",
        {"digest": digest("ok"), "platform": AMD64},
    ]}
    [entry] = entries(json.dumps(doc).encode())
    assert (entry.position, entry.digest) == (4, digest("ok"))
    assert (entry.media_type, entry.size) == ("", 0)  # missing: the child's fetch tells the truth


@pytest.mark.parametrize("size", ["735", True, None])
def test_a_bad_size_reads_as_zero(size: Any) -> None:
    doc = {"manifests": [{"digest": digest("a"), "size": size, "mediaType": 3}]}
    [entry] = entries(json.dumps(doc).encode())
    assert (entry.size, entry.media_type) == (0, "")


# --- malformed bodies --------------------------------------------------------------------------

MALFORMED = [
    b"",
    b"not json {",
    b"\xff\xfe",
    b"[]",
    b'"manifests"',
    json.dumps({"schemaVersion": 2}).encode(),
    json.dumps({"manifests": {"0": {"digest": GENERIC}}}).encode(),
    json.dumps({"manifests": None}).encode(),
    json.dumps({"mediaType": media.OCI_MANIFEST, "manifests": []}).encode(),
    json.dumps({"mediaType": ["x"], "manifests": []}).encode(),
]


@pytest.mark.parametrize("body", MALFORMED)
def test_malformed_bodies(body: bytes) -> None:
    assert entries(body) == []
    with pytest.raises(RegistryError) as caught:
        resolve(body, amd64("type1", "cpu:broadwell"), "team/bench:1.0")
    error = caught.value
    assert (error.status, error.code) == (404, "MANIFEST_UNKNOWN")
    assert error.message == (
        "team/bench:1.0 is not a valid image index or manifest list, so no build can be chosen "
        "for machine type type1"
    )
    assert error.detail == {"reference": "team/bench:1.0", "machine_type": "type1"}


def test_an_index_without_media_type_is_still_an_index() -> None:
    """``mediaType`` is optional in an OCI index."""
    body = json.dumps({"schemaVersion": 2, "manifests": [{"digest": GENERIC, "platform": AMD64}]}).encode()
    assert resolve(body, amd64("t"), "r").digest == GENERIC


def test_an_empty_index_offers_nothing() -> None:
    body = index([])
    assert entries(body) == []
    with pytest.raises(RegistryError) as caught:
        resolve(body, amd64("t"), "team/bench:1.0")
    assert caught.value.message == (
        "no build of team/bench:1.0 fits machine type t (linux/amd64 (no features)); "
        "the index offers no build with a platform"
    )
    assert caught.value.detail == {"machine_type": "t", "offered": []}


# --- the no-match error ------------------------------------------------------------------------


def test_no_match_names_the_type_and_lists_the_offers() -> None:
    body = index(seed_platforms()[1:])  # no generic build
    with pytest.raises(RegistryError) as caught:
        resolve(body, amd64("type9", "cpu:zen4"), "team/bench:1.0")
    error = caught.value
    assert (error.status, error.code) == (404, "MANIFEST_UNKNOWN")
    assert error.message == (
        "no build of team/bench:1.0 fits machine type type9 (linux/amd64 [cpu:zen4]); the index offers: "
        "linux/amd64 [cpu:skylake], linux/amd64 [cpu:broadwell], linux/amd64 [cpu:broadwell, nvcap:5.2], "
        "linux/arm64/v8 (generic)"
    )
    assert error.detail == {
        "machine_type": "type9",
        "offered": [
            {"platform": "linux/amd64", "features": ["cpu:skylake"], "digest": SKYLAKE},
            {"platform": "linux/amd64", "features": ["cpu:broadwell"], "digest": BROADWELL},
            {"platform": "linux/amd64", "features": ["cpu:broadwell", "nvcap:5.2"], "digest": NVCAP},
            {"platform": "linux/arm64/v8", "features": [], "digest": ARM64},
        ],
    }
    assert json.loads(error.body())["errors"][0]["detail"] == error.detail


def test_no_match_lists_a_repeated_build_once_in_the_message() -> None:
    body = index([(digest("a"), {**AMD64, "features": ["x"]}), (digest("b"), {**AMD64, "features": ["x"]})])
    with pytest.raises(RegistryError) as caught:
        resolve(body, amd64("t", "y"), "r")
    assert caught.value.message.endswith("the index offers: linux/amd64 [x]")
    assert len(caught.value.detail["offered"]) == 2  # the detail keeps both digests


def test_no_match_names_the_type_variant() -> None:
    with pytest.raises(RegistryError) as caught:
        resolve(index(seed_platforms()), MachineType("pi7", "linux", "arm64", "v7", ("neon",)), "r")
    assert "fits machine type pi7 (linux/arm64/v7 [neon]);" in caught.value.message


# --- explain -----------------------------------------------------------------------------------


def test_explain_the_only_candidate() -> None:
    found = entries(index(seed_platforms()))
    assert explain(found, MachineType("pi", "linux", "arm64")) == (
        "manifests[4] linux/arm64/v8 (generic): the only candidate"
    )


def test_explain_most_features() -> None:
    found = entries(index(seed_platforms()))
    assert explain(found, amd64("gpu", "cpu:broadwell", "nvcap:5.2")) == (
        "manifests[3] linux/amd64 [cpu:broadwell, nvcap:5.2]: the most features of 3 candidates"
    )


def test_explain_a_tie() -> None:
    found = entries(one_feature_each("a", "b", "c"))
    assert explain(found, amd64("t", "c", "b")) == (
        "manifests[1] linux/amd64 [b]: the most features of 2 candidates, listed before manifests[2] with as many"
    )


def test_explain_exact() -> None:
    found = entries(index(seed_platforms()))
    assert explain(found, amd64("t1", "cpu:broadwell", match="exact")) == (
        "manifests[2] linux/amd64 [cpu:broadwell]: the first entry whose features equal the machine type's"
    )


def test_explain_no_match() -> None:
    found = entries(index(seed_platforms()[:2]))
    assert explain(found, amd64("t", "cpu:zen4", match="exact")) == (
        "no match for t (linux/amd64 [cpu:zen4]); the index offers: linux/amd64 (generic), linux/amd64 [cpu:skylake]"
    )
    assert explain([], amd64("t")) == (
        "no match for t (linux/amd64 (no features)); the index offers no build with a platform"
    )


# --- the rule as a property --------------------------------------------------------------------

OSES = ["linux", "windows", "unknown"]
ARCHES = ["amd64", "arm64", "unknown"]
VARIANTS = [None, "v7", "v8"]
FEATURES = ["cpu:broadwell", "cpu:skylake", "nvcap:5.2", "avx512"]

feature_lists = st.lists(st.sampled_from(FEATURES), max_size=3)
platforms = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"os": st.sampled_from(OSES), "architecture": st.sampled_from(ARCHES)},
        optional={"variant": st.sampled_from(VARIANTS[1:]), "features": feature_lists, "os.features": feature_lists},
    ),
)
machine_types = st.builds(
    MachineType,
    name=st.just("m"),
    os=st.sampled_from(OSES[:2]),
    architecture=st.sampled_from(ARCHES[:2]),
    variant=st.sampled_from(VARIANTS),
    features=st.lists(st.sampled_from(FEATURES), unique=True).map(tuple),
    match=st.sampled_from(["subset", "exact"]),
)


def oracle_features(platform: dict[str, Any]) -> frozenset[str]:
    return frozenset(platform.get("features", [])) | frozenset(platform.get("os.features", []))


def oracle_fits(platform: dict[str, Any] | None, m: MachineType) -> bool:
    """The design's rule, restated from the raw JSON, independently of the module under test."""
    if platform is None or "unknown" in (platform["os"], platform["architecture"]):
        return False
    if (platform["os"], platform["architecture"]) != (m.os, m.architecture):
        return False
    if m.variant is not None and platform.get("variant") != m.variant:
        return False
    wanted = frozenset(m.features)
    return oracle_features(platform) == wanted if m.match == "exact" else oracle_features(platform) <= wanted


@settings(max_examples=300, deadline=None)
@given(st.lists(platforms, max_size=8), machine_types)
def test_the_winner_is_a_candidate_with_the_most_features(raw: list[dict[str, Any] | None], m: MachineType) -> None:
    body = index([(digest(str(i)), platform) for i, platform in enumerate(raw)])
    candidates = [i for i, platform in enumerate(raw) if oracle_fits(platform, m)]
    winner = choose(entries(body), m)
    if not candidates:
        assert winner is None
        with pytest.raises(RegistryError):
            resolve(body, m, "r")
        return
    assert winner is not None and winner.position in candidates
    assert winner.digest == digest(str(winner.position))
    most = max(len(oracle_features(raw[i])) for i in candidates)
    assert len(winner.features) == most
    assert winner.position == min(i for i in candidates if len(oracle_features(raw[i])) == most)
    assert resolve(body, m, "r") == winner
