"""Machine types that name hardware: unknown CPUs and malformed capabilities are configuration errors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from metahub.config.file import ConfigError, parse_config
from metahub.hardware.machine import MachineType, machine_types


def load(tmp_path: Path, machine_type: dict[str, Any]) -> MachineType:
    config = parse_config({
        "storage": {"path": str(tmp_path / "s"), "index": str(tmp_path / "i")},
        "upstreams": {"up": {"url": "https://registry.example"}},
        "machine_types": {"gpu1": machine_type},
    }, str(tmp_path))
    return machine_types(config.machine_types)["gpu1"]


AMD64 = {"os": "linux", "architecture": "amd64"}


def test_compatible_is_the_default_and_known_names_load(tmp_path: Path) -> None:
    loaded = load(tmp_path, {"platform": AMD64, "features": ["cpu:skylake_avx512", "nvcap:8.6", "ib:hdr"]})
    assert loaded == MachineType("gpu1", "linux", "amd64", None, ("cpu:skylake_avx512", "nvcap:8.6", "ib:hdr"),
                                 "compatible")


def test_an_unknown_cpu_names_the_key_and_the_closest_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"platform": AMD64, "features": ["cpu:skylak"]})
    assert str(caught.value) == "machine_types.gpu1.features[0]: unknown CPU 'skylak' (did you mean skylake, skylake_avx512?)"


def test_an_unknown_cpu_without_close_names_says_where_names_come_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"platform": AMD64, "features": ["nvcap:8.0", "cpu:qqqqqq"]})
    assert str(caught.value).startswith("machine_types.gpu1.features[1]: unknown CPU 'qqqqqq' (see archspec")


@pytest.mark.parametrize("value", ["nvcap:8", "nvcap:sm_86", "nvcap:", "nvcap:8.6.1", "nvcap:a.b"])
def test_a_malformed_nvcap_is_a_config_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"platform": AMD64, "features": [value]})
    assert str(caught.value).startswith("machine_types.gpu1.features[0]: malformed CUDA compute capability")


@pytest.mark.parametrize("variant", ["v5", "v0", "x86-64-v2"])
def test_an_amd64_variant_must_be_a_level(tmp_path: Path, variant: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"platform": {**AMD64, "variant": variant}})
    assert str(caught.value) == "machine_types.gpu1.platform.variant: an amd64 variant is a level, one of v1, v2, v3, v4"


def test_the_literal_rules_keep_any_label(tmp_path: Path) -> None:
    """Under subset and exact, features are labels: a config written for them keeps loading."""
    for match in ("subset", "exact"):
        loaded = load(tmp_path, {"platform": {**AMD64, "variant": "v9"}, "features": ["cpu:skylak", "nvcap:5"],
                                 "match": match})
        assert loaded.match == match


def test_match_names_its_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {"platform": AMD64, "match": "compatibel"})
    assert "expected one of compatible, subset, exact" in str(caught.value)
