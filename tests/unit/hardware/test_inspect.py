"""The reverse-query report (``metahub inspect``, ``/_metahub/v1/resolve``): its keys and its table."""
from __future__ import annotations

from pathlib import Path

import pytest

from metahub.config.file import Config, parse_config
from metahub.hardware.inspect import render, report
from metahub.oci import media
from tests.unit.fakes import minimal
from tests.unit.harness import digest_of, image_index, image_manifest

GENERIC = image_manifest(b"generic")
SKYLAKE = image_manifest(b"skylake")
INDEX = image_index(
    (GENERIC, {"os": "linux", "architecture": "amd64"}),
    (SKYLAKE, {"os": "linux", "architecture": "amd64", "features": ["cpu:skylake"]}),
)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    machine_types = {
        "old": {"platform": {"os": "linux", "architecture": "amd64"}},
        "new": {"platform": {"os": "linux", "architecture": "amd64"}, "features": ["cpu:skylake"]},
        "pi": {"platform": {"os": "linux", "architecture": "arm64"}},
    }
    return parse_config(minimal(tmp_path) | {"machine_types": machine_types}, str(tmp_path))


def test_an_index_lists_its_builds_and_what_each_machine_type_gets(config: Config) -> None:
    result = report("team/app:1", INDEX, media.OCI_INDEX, digest_of(INDEX), config)
    assert result["image"] == "team/app:1"
    assert (result["digest"], result["media_type"]) == (digest_of(INDEX), media.OCI_INDEX)
    assert [(e["position"], e["digest"], e["media_type"], e["features"]) for e in result["entries"]] == [
        (0, digest_of(GENERIC), media.OCI_MANIFEST, []),
        (1, digest_of(SKYLAKE), media.OCI_MANIFEST, ["cpu:skylake"]),
    ]
    assert all(isinstance(e["platform"], str) and "linux/amd64" in e["platform"] for e in result["entries"])
    choices = result["machine_types"]
    assert set(choices) == {"old", "new", "pi"}
    assert (choices["old"]["digest"], choices["old"]["position"]) == (digest_of(GENERIC), 0)
    assert (choices["new"]["digest"], choices["new"]["position"]) == (digest_of(SKYLAKE), 1)
    assert (choices["pi"]["digest"], choices["pi"]["position"]) == (None, None)
    assert all(isinstance(choice["why"], str) and choice["why"] for choice in choices.values())


def test_a_single_platform_image_goes_to_every_machine_type_as_it_is(config: Config) -> None:
    result = report("team/app:amd64", GENERIC, media.OCI_MANIFEST, digest_of(GENERIC), config)
    assert result["entries"] == []
    assert {name: choice["digest"] for name, choice in result["machine_types"].items()} == dict.fromkeys(
        ("old", "new", "pi"), digest_of(GENERIC)
    )
    assert "single-platform" in result["machine_types"]["pi"]["why"]


def test_the_table_shows_the_image_each_build_and_each_machine_type(config: Config) -> None:
    table = render(report("team/app:1", INDEX, media.OCI_INDEX, digest_of(INDEX), config))
    lines = table.splitlines()
    assert lines[0] == f"team/app:1  {digest_of(INDEX)}  ({media.OCI_INDEX})"
    assert any(digest_of(SKYLAKE) in line for line in lines)
    for name in ("old", "new", "pi"):
        assert any(line.strip().startswith(name) for line in lines), name


def test_the_table_says_when_no_machine_types_are_configured(tmp_path: Path) -> None:
    bare = parse_config(minimal(tmp_path), str(tmp_path))
    table = render(report("team/app:1", INDEX, media.OCI_INDEX, digest_of(INDEX), bare))
    assert table.splitlines()[-1] == "  (no machine types configured)"
