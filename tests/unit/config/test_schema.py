"""The JSON Schema editors get (``metahub config-schema``) describes the files metahub accepts.

jsonschema is not among the test dependencies, so :func:`problems` checks what an editor's
language server would flag first: unknown keys, missing required keys and the JSON type of values,
and patterns (sizes, durations), following ``$ref``, ``anyOf``, ``items`` and ``additionalProperties``.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from metahub.app.cli import main
from metahub.config.file import BUILTIN_DEFAULT, config_schema

REPO = Path(__file__).resolve().parents[3]
_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
                          "integer": int, "number": (int, float)}


def problems(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str = "") -> list[str]:
    if "$ref" in schema:
        return problems(value, root["$defs"][schema["$ref"].rsplit("/", 1)[1]], root, path)
    if "anyOf" in schema:
        found = [problems(value, option, root, path) for option in schema["anyOf"]]
        # Report against the option of the value's own type, not "not null" for a mapping.
        fitting = [f for f in found if not (len(f) == 1 and f[0].startswith(f"{path}: not "))]
        return [] if [] in found else (fitting or found)[0]
    kind = schema.get("type")
    if kind and (not isinstance(value, _TYPES[kind]) or (kind in ("integer", "number") and isinstance(value, bool))):
        return [f"{path}: not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: not one of {schema['enum']}"]
    if "pattern" in schema and not re.search(schema["pattern"], value):
        return [f"{path}: does not match {schema['pattern']}"]
    out = []
    if isinstance(value, dict):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        out += [f"{path}.{key}: required" for key in schema.get("required", ()) if key not in value]
        for key, item in value.items():
            if key in properties:
                out += problems(item, properties[key], root, f"{path}.{key}")
            elif extra is False:
                out.append(f"{path}.{key}: not allowed")
            elif isinstance(extra, dict):
                out += problems(item, extra, root, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += problems(item, schema["items"], root, f"{path}[{i}]")
    return out


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return config_schema()


def test_the_example_file_and_the_builtin_default_conform(schema: dict[str, Any]) -> None:
    example = yaml.safe_load((REPO / "metahub" / "config" / "example.yaml").read_text())
    assert problems(example, schema, schema) == []
    assert problems(dict(BUILTIN_DEFAULT), schema, schema) == []
    assert schema["required"] == ["storage", "upstreams"]


def test_the_schema_flags_what_the_loader_refuses(schema: dict[str, Any]) -> None:
    data = copy.deepcopy(dict(BUILTIN_DEFAULT))
    data["upstreams"]["ghcr.io"]["password"] = "inline"
    data["storage"] = {"path": "store", "indx": "index"}
    data["anonymous"] = "yes"
    data["cache"] = {"tag_ttl": "5 minutes"}
    data["machine_types"] = {"t": {"platform": {"os": "linux"}, "featurs": []}}
    assert sorted(problems(data, schema, schema)) == [
        ".anonymous: not one of ['allow', 'deny']",
        ".cache.tag_ttl: does not match ^(\\d+(\\.\\d+)?(ms|[dhms])?)+$",
        ".machine_types.t.featurs: not allowed",
        ".machine_types.t.platform.architecture: required",
        ".storage.index: required",
        ".storage.indx: not allowed",
        ".upstreams.ghcr.io.password: not allowed",
    ]


def test_a_key_left_empty_is_allowed_as_the_loader_allows_it(schema: dict[str, Any]) -> None:
    data = dict(BUILTIN_DEFAULT) | {"accounts": None, "cache": {"tag_ttl": None}}
    assert problems(data, schema, schema) == []
    assert problems(dict(BUILTIN_DEFAULT) | {"storage": None}, schema, schema) == [".storage: not object"]


def test_config_schema_prints_it(capsys: pytest.CaptureFixture[str], schema: dict[str, Any]) -> None:
    assert main(["config-schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == schema and printed["$schema"].startswith("https://json-schema.org/")
