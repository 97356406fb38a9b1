"""The configuration contract: what parses into what, and the one-line error for each kind of mistake."""
from __future__ import annotations

import copy
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from metahub.config.file import (
    Account,
    Config,
    ConfigError,
    StorageConfig,
    UpstreamConfig,
    builtin_config,
    config_summary,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from metahub.hardware.machine import MachineType, machine_types
from metahub.oci.sizes import format_size
from metahub.web.auth import hash_password
from tests.peers.tls import make_ca
from tests.unit.fakes import config_error as error
from tests.unit.fakes import minimal

REPO = Path(__file__).resolve().parents[3]
HASH = hash_password("pw", b"saltsaltsaltsalt")
PASSWORD = "s3cret-upstream-pw"

FULL = """\
listen: tcp:5000:interface=127.0.0.1
storage:
  path: store
  index: /var/lib/metahub/index
  max_size: 200GiB
upstreams:
  docker.io:
    url: https://registry-1.docker.io
  ghcr.io:
    url: https://ghcr.io/
    connect_timeout: 5s
    read_timeout: 2m
  private:
    url: http://registry.example.com:5000
    username: robot
    password_file: registry.pw
default_upstream: ghcr.io
cache:
  tag_ttl: 1h30m
anonymous: allow
machine_types:
  type1:
    platform: {os: linux, architecture: amd64}
    features: [cpu:broadwell]
  type2:
    platform: {os: linux, architecture: arm64, variant: v8}
    features: [cpu:neoverse, nvcap:5.2]
    match: exact
accounts:
  qnib:
    password_hash: "%s"
    machine_types: [type1, type2]
  ci:
    password_hash: "%s"
    repositories: ["ghcr.io/org/*"]
""" % (HASH, HASH)


def write(tmp_path: Path, text: str, name: str = "metahub.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# --- valid configs ---------------------------------------------------------------------------


def test_full_example_parses_into_the_right_values(tmp_path: Path) -> None:
    (tmp_path / "registry.pw").write_text(PASSWORD + "\n")
    config = load_config(write(tmp_path, FULL))

    assert config.listen == "tcp:5000:interface=127.0.0.1"
    assert config.storage == StorageConfig(
        path=str(tmp_path / "store"), index="/var/lib/metahub/index", max_size=200 * 2**30
    )
    assert list(config.upstreams) == ["docker.io", "ghcr.io", "private"]
    assert config.upstreams["docker.io"] == UpstreamConfig("docker.io", "https://registry-1.docker.io")
    ghcr = config.upstreams["ghcr.io"]
    assert (ghcr.url, ghcr.connect_timeout, ghcr.read_timeout) == ("https://ghcr.io", 5.0, 120.0)
    private = config.upstreams["private"]
    assert (private.url, private.host) == ("http://registry.example.com:5000", "registry.example.com:5000")
    assert (private.username, private.password) == ("robot", PASSWORD)
    assert config.default_upstream == "ghcr.io"
    assert config.tag_ttl == 5400.0
    assert config.anonymous == "allow"
    assert machine_types(config.machine_types) == {
        "type1": MachineType("type1", "linux", "amd64", None, ("cpu:broadwell",), "compatible"),
        "type2": MachineType("type2", "linux", "arm64", "v8", ("cpu:neoverse", "nvcap:5.2"), "exact"),
    }
    assert config.accounts == {
        "qnib": Account("qnib", HASH, ("type1", "type2"), None),
        "ci": Account("ci", HASH, (), ("ghcr.io/org/*",)),
    }
    assert config.source == str(tmp_path / "metahub.yaml")


def test_minimal_config_gets_the_defaults(tmp_path: Path) -> None:
    config = parse_config(minimal(tmp_path), str(tmp_path))
    assert config.listen == "tcp:5000"
    assert config.default_upstream == "docker.io"  # the only upstream
    assert config.tag_ttl == 300.0
    assert config.anonymous == "deny"
    assert config.storage.max_size is None
    assert config.machine_types == {} and config.accounts == {}
    assert config.upstreams["docker.io"].connect_timeout == 10.0
    assert config.upstreams["docker.io"].read_timeout == 60.0


def test_empty_sections_count_as_absent(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {"machine_types": None, "accounts": None, "cache": None}
    config = parse_config(data, str(tmp_path))
    assert config.accounts == {} and config.tag_ttl == 300.0


def test_example_file_parses_once_its_placeholder_hashes_are_replaced(tmp_path: Path) -> None:
    example = (REPO / "examples" / "metahub.yaml").read_text()
    (tmp_path / "metahub.yaml").write_text(example)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "registry.password").write_text("pw\n")
    # As written, the placeholders are refused: logins would otherwise fail with "incorrect password".
    with pytest.raises(ConfigError, match=r"accounts\.qnib\.password_hash: .*placeholder"):
        load_config(str(tmp_path / "metahub.yaml"))
    example = re.sub(r'"scrypt\$[^"]*REPLACE-WITH-OUTPUT[^"]*"', f'"{HASH}"', example)
    (tmp_path / "metahub.yaml").write_text(example)
    config = load_config(str(tmp_path / "metahub.yaml"))
    assert config.default_upstream in config.upstreams
    assert config.accounts and config.machine_types


def test_every_documented_key_is_in_the_docs() -> None:
    docs = (REPO / "docs" / "configuration.md").read_text()
    for key in (
        "listen", "storage.path", "storage.index", "storage.max_size", "url", "username",
        "password_file", "connect_timeout", "read_timeout", "default_upstream", "cache.tag_ttl",
        "anonymous", "platform", "features", "match", "password_hash", "repositories", "ca_file",
    ):
        assert f"`{key}`" in docs, key


@pytest.mark.parametrize(
    "text, size",
    [("200GiB", 200 * 2**30), ("500MB", 500 * 10**6), (1024, 1024), ("1024", 1024), ("1.5KiB", 1536),
     ("10 gb", 10**10), ("3TiB", 3 * 2**40), ("7B", 7)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text, seconds",
    [("5m", 300), ("30s", 30), ("1h", 3600), ("1h30m", 5400), (90, 90), (0, 0), ("2.5s", 2.5),
     ("250ms", 0.25), ("1d", 86400), ("45", 45)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_formatting_helpers_round_trip() -> None:
    assert format_size(200 * 2**30) == "200GiB"
    assert format_duration(5400) == "1h30m"
    assert parse_duration(format_duration(5400)) == 5400


# --- errors ----------------------------------------------------------------------------------


def test_unknown_key_at_depth_names_its_path(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {
        "machine_types": {"type1": {"platform": {"os": "linux", "architecture": "amd64"}, "featurs": []}}
    }
    assert error(data, tmp_path).startswith("machine_types.type1.featurs: unknown key")
    assert error(minimal(tmp_path) | {"virtual_imagez": []}, tmp_path).startswith("virtual_imagez: unknown key")
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"]["urll"] = "x"
    assert error(data, tmp_path).startswith("upstreams.docker.io.urll: unknown key")


@pytest.mark.parametrize("value", ["lots", "200G", "-5MB", "1.5B", True, [1], 0])
def test_bad_size(tmp_path: Path, value: object) -> None:
    data = minimal(tmp_path)
    data["storage"]["max_size"] = value
    message = error(data, tmp_path)
    assert message.startswith("storage.max_size: ")
    if value == "lots":
        assert message == "storage.max_size: expected a size such as 200GiB, 500MB or 1024 (bytes), got 'lots'"


@pytest.mark.parametrize("value", ["soon", "5 minutes", "-1s", -3, "1x", True])
def test_bad_duration(tmp_path: Path, value: object) -> None:
    message = error(minimal(tmp_path) | {"cache": {"tag_ttl": value}}, tmp_path)
    assert message.startswith("cache.tag_ttl: ")


def test_timeouts_must_be_positive(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"]["read_timeout"] = 0
    assert error(data, tmp_path).startswith("upstreams.docker.io.read_timeout: must be greater than 0")


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com", "registry.example.com", "https://", "https://example.com/v2",
     "https://example.com?x=1", "https://example.com:99999", 5000],
)
def test_bad_url(tmp_path: Path, url: object) -> None:
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"]["url"] = url
    assert error(data, tmp_path).startswith("upstreams.docker.io.url: ")


def test_url_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"]["url"] = f"https://robot:{PASSWORD}@example.com"
    message = error(data, tmp_path)
    assert message.startswith("upstreams.docker.io.url: ") and PASSWORD not in message


@pytest.mark.parametrize(
    "drop, path",
    [(("storage",), "storage"), (("upstreams",), "upstreams"), (("storage", "index"), "storage.index"),
     (("upstreams", "docker.io", "url"), "upstreams.docker.io.url")],
)
def test_missing_required_key(tmp_path: Path, drop: tuple[str, ...], path: str) -> None:
    data = copy.deepcopy(minimal(tmp_path))
    parent = data
    for key in drop[:-1]:
        parent = parent[key]
    del parent[drop[-1]]
    assert error(data, tmp_path) == f"{path}: required key is missing"


def test_required_key_without_value(tmp_path: Path) -> None:
    assert error(minimal(tmp_path) | {"storage": None}, tmp_path) == "storage: required, but has no value"


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {"machine_types": {"t": {"platform": {"os": "linux", "arch": "amd64"}}}}
    assert error(data, tmp_path) == "machine_types.t.platform.arch: unknown key (did you mean 'architecture'?)"


def test_missing_platform_keys(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {"machine_types": {"t": {"platform": {"os": "linux"}}}}
    assert error(data, tmp_path) == "machine_types.t.platform.architecture: required key is missing"


def test_wrong_types(tmp_path: Path) -> None:
    assert error(minimal(tmp_path) | {"storage": "/srv"}, tmp_path) == "storage: expected a mapping, got '/srv'"
    assert error(minimal(tmp_path) | {"listen": 5000}, tmp_path).startswith("listen: expected a Twisted endpoint")
    assert error(minimal(tmp_path) | {"anonymous": "yes"}, tmp_path) == (
        "anonymous: expected one of allow, deny, got 'yes'"
    )
    assert error(["storage"], tmp_path) == "(top level): expected a mapping, got a list"


def test_default_upstream_must_name_an_upstream(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {"default_upstream": "quay.io"}
    assert error(data, tmp_path) == "default_upstream: 'quay.io' is not an upstream (defined: docker.io)"


def test_default_upstream_required_with_several_upstreams(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["upstreams"]["ghcr.io"] = {"url": "https://ghcr.io"}
    assert error(data, tmp_path).startswith("default_upstream: required when there is more than one")


def test_no_upstreams(tmp_path: Path) -> None:
    assert error(minimal(tmp_path) | {"upstreams": {}}, tmp_path) == "upstreams: at least one upstream is required"


@pytest.mark.parametrize("name", ["Docker.io", "my registry", "-x", "a..b", "127.0.0.1:5000"])
def test_bad_upstream_name(tmp_path: Path, name: str) -> None:
    data = minimal(tmp_path)
    data["upstreams"] = {name: {"url": "https://example.com"}}
    assert error(data, tmp_path).startswith(f"upstreams.{name}: an upstream name is a repository path component")


def test_account_name_with_dash(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {"accounts": {"q-nib": {"password_hash": HASH}}}
    assert error(data, tmp_path).startswith("accounts.q-nib: account names must not contain '-'")


def test_machine_type_name_with_dash(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {"machine_types": {"type-1": {"platform": {"os": "linux", "architecture": "amd64"}}}}
    assert error(data, tmp_path).startswith("machine_types.type-1: machine type names must not contain '-'")


def test_account_referencing_unknown_machine_type(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {
        "machine_types": {"type1": {"platform": {"os": "linux", "architecture": "amd64"}}},
        "accounts": {"qnib": {"password_hash": HASH, "machine_types": ["type1", "type3"]}},
    }
    assert error(data, tmp_path) == "accounts.qnib.machine_types[1]: unknown machine type 'type3' (defined: type1)"


def test_duplicate_and_empty_features(tmp_path: Path) -> None:
    platform = {"os": "linux", "architecture": "amd64"}
    data = minimal(tmp_path) | {"machine_types": {"t": {"platform": platform, "features": ["a", "a"]}}}
    assert error(data, tmp_path) == "machine_types.t.features[1]: duplicate entry 'a'"
    data = minimal(tmp_path) | {"machine_types": {"t": {"platform": platform, "features": [""]}}}
    assert error(data, tmp_path).startswith("machine_types.t.features[0]: expected a non-empty string")


def test_inline_upstream_password_is_refused_without_echo(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"] |= {"username": "robot", "password": PASSWORD}
    message = error(data, tmp_path)
    assert message.startswith("upstreams.docker.io.password: ") and "password_file" in message
    assert PASSWORD not in message


def test_inline_account_password_is_refused_without_echo(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {"accounts": {"qnib": {"password": PASSWORD}}}
    message = error(data, tmp_path)
    assert message.startswith("accounts.qnib.password: ") and "hash-password" in message
    assert PASSWORD not in message


def test_password_hash_must_be_scrypt_and_is_not_echoed(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {"accounts": {"qnib": {"password_hash": PASSWORD}}}
    message = error(data, tmp_path)
    assert message.startswith("accounts.qnib.password_hash: ") and PASSWORD not in message


@pytest.mark.parametrize("value, problem", [
    ("scrypt$...", "expected scrypt$N$r$p$SALT$HASH"),
    ("scrypt$16384$8$1$c2FsdHNhbHRzYWx0$REPLACE-WITH-OUTPUT-OF-metahub-hash-password", "placeholder"),
    ("scrypt$16383$8$1$c2FsdHNhbHRzYWx0$" + "A" * 44, "power of two"),
    ("scrypt$1048576$64$1$c2FsdHNhbHRzYWx0$" + "A" * 44, "256 MiB"),
    ("scrypt$16384$0$1$c2FsdHNhbHRzYWx0$" + "A" * 44, "r must be"),
    ("scrypt$16384$8$1$c2Fsd$" + "A" * 44, "salt"),
    ("scrypt$16384$8$1$c2FsdHNhbHRzYWx0$" + "A" * 42 + "B=", "hash"),  # non-canonical: stray low bits
    ("scrypt$１６３８４$8$1$c2FsdHNhbHRzYWx0$" + "A" * 44, "power of two"),  # fullwidth digits
])
def test_password_hash_format_and_parameters_are_checked(tmp_path: Path, value: str, problem: str) -> None:
    data = minimal(tmp_path) | {"accounts": {"qnib": {"password_hash": value}}}
    message = error(data, tmp_path)
    assert message.startswith("accounts.qnib.password_hash: not a hash from `metahub hash-password`: ")
    assert problem in message and value not in message


def test_a_fresh_hash_passes(tmp_path: Path) -> None:
    data = minimal(tmp_path) | {"accounts": {"qnib": {"password_hash": hash_password("x")}}}
    assert parse_config(data, str(tmp_path)).accounts["qnib"].password_hash.startswith("scrypt$16384$8$1$")


def test_password_file_is_read_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\r\n")
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"] |= {"username": "robot", "password_file": "pw"}  # relative to base_dir
    assert parse_config(data, str(tmp_path)).upstreams["docker.io"].password == PASSWORD


def test_password_file_missing(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"] |= {"username": "robot", "password_file": "nope"}
    assert error(data, tmp_path) == (
        f"upstreams.docker.io.password_file: cannot read {tmp_path / 'nope'}: No such file or directory"
    )


def test_password_file_empty(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("\n")
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"] |= {"username": "robot", "password_file": "pw"}
    assert error(data, tmp_path) == f"upstreams.docker.io.password_file: {tmp_path / 'pw'} is empty"


def test_username_and_password_file_go_together(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x")
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"]["username"] = "robot"
    assert error(data, tmp_path).startswith("upstreams.docker.io.password_file: required with username")
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"]["password_file"] = "pw"
    assert error(data, tmp_path).startswith("upstreams.docker.io.username: required with password_file")


def test_ca_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    first, second = make_ca(tmp_path / "pki" / "a"), make_ca(tmp_path / "pki" / "b")
    (tmp_path / "pki" / "bundle.pem").write_bytes(first.cert_path.read_bytes() + b"\n" + second.cert_path.read_bytes())
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"]["ca_file"] = "pki/bundle.pem"
    config = parse_config(data, str(tmp_path))
    upstream = config.upstreams["docker.io"]
    assert upstream.ca_file == str(tmp_path / "pki" / "bundle.pem")
    assert upstream.ca_certificates == (first.cert_path.read_bytes(), second.cert_path.read_bytes())
    assert f"(trusting 2 CA certificates from {tmp_path / 'pki' / 'bundle.pem'})" in config_summary(config)
    assert parse_config(minimal(tmp_path), str(tmp_path)).upstreams["docker.io"].ca_certificates == ()


def test_ca_file_unreadable(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"]["ca_file"] = "nope.pem"
    assert error(data, tmp_path) == (
        f"upstreams.docker.io.ca_file: cannot read {tmp_path / 'nope.pem'}: No such file or directory"
    )
    data["upstreams"]["docker.io"]["ca_file"] = "."
    assert error(data, tmp_path) == f"upstreams.docker.io.ca_file: cannot read {tmp_path}: Is a directory"
    data["upstreams"]["docker.io"]["ca_file"] = 443
    assert error(data, tmp_path) == "upstreams.docker.io.ca_file: expected a non-empty string, got 443"


@pytest.mark.parametrize("content", [
    b"",
    b"not a certificate\n",
    b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",  # PEM framing, no certificate
    "key",  # a private key is PEM, but holds no certificate
    "der",  # a certificate, but not PEM
])
def test_ca_file_must_be_pem_certificates(tmp_path: Path, content: bytes | str) -> None:
    ca = make_ca(tmp_path / "pki")
    if content == "key":
        content = ca.issue(tmp_path / "pki", "leaf")[1].read_bytes()
    elif content == "der":
        content = ca.certificate.public_bytes(serialization.Encoding.DER)
    assert isinstance(content, bytes)
    (tmp_path / "ca.pem").write_bytes(content)
    data = minimal(tmp_path)
    data["upstreams"]["docker.io"]["ca_file"] = "ca.pem"
    assert error(data, tmp_path) == (
        f"upstreams.docker.io.ca_file: {tmp_path / 'ca.pem'} is not a PEM bundle of certificates "
        "(-----BEGIN CERTIFICATE----- blocks)"
    )


@pytest.mark.parametrize("index", ["store", "store/index", "./store/../store/lmdb"])
def test_index_inside_store_path(tmp_path: Path, index: str) -> None:
    data = minimal(tmp_path)
    data["storage"] = {"path": "store", "index": index}
    assert error(data, tmp_path).startswith("storage.index: must not be storage.path or inside it")


def test_index_beside_store_path_is_fine(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["storage"] = {"path": "store", "index": "store-index"}  # a common prefix is not "inside"
    assert parse_config(data, str(tmp_path)).storage.index == str(tmp_path / "store-index")


# --- files -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: cannot read config file: No such file or directory"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        listen: tcp:5000
        storage:
          path: store
            index: index
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4:") and "YAML syntax error" in message
    assert "\n" not in message and info.value.__suppress_context__


def test_control_character_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: tcp:5000\nanonymous: \x01\n")
    with pytest.raises(ConfigError, match=r":2: YAML syntax error: character U\+0001 is not allowed"):
        load_config(path)


def test_duplicate_key_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        storage: {path: a, index: b}
        upstreams: {docker.io: {url: "https://registry-1.docker.io"}}
        storage: {path: c, index: d}
        """)
    with pytest.raises(ConfigError, match=r":3:1: YAML syntax error: duplicate key 'storage'"):
        load_config(path)


def test_empty_file_names_the_required_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing yet\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: the file is empty; required keys: storage, upstreams"


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf", """\
        storage: {path: ../store, index: index}
        upstreams: {docker.io: {url: "https://registry-1.docker.io"}}
        """)
    config = load_config(path)
    assert config.storage.path == str(tmp_path / "store")
    assert config.storage.index == str(tmp_path / "conf" / "index")


# --- secrets ---------------------------------------------------------------------------------


def test_no_secret_in_repr_str_or_summary(tmp_path: Path) -> None:
    (tmp_path / "registry.pw").write_text(PASSWORD + "\n")
    config = load_config(write(tmp_path, FULL))
    summary = config_summary(config)
    for text in (repr(config), str(config), summary, repr(config.upstreams["private"]),
                 repr(config.accounts["qnib"])):
        assert PASSWORD not in text
        assert HASH not in text and "scrypt$" not in text


def test_summary_says_what_is_live(tmp_path: Path) -> None:
    (tmp_path / "registry.pw").write_text(PASSWORD + "\n")
    summary = config_summary(load_config(write(tmp_path, FULL)))
    assert "tcp:5000:interface=127.0.0.1" in summary
    assert str(tmp_path / "store") in summary and "/var/lib/metahub/index" in summary
    assert "private=http://registry.example.com:5000" in summary and "ghcr.io=https://ghcr.io (default)" in summary
    assert "machine types: 2" in summary and "accounts: 2" in summary
    assert len(summary.splitlines()) <= 8


def test_config_is_frozen(tmp_path: Path) -> None:
    config = parse_config(minimal(tmp_path), str(tmp_path))
    assert isinstance(config, Config)
    with pytest.raises(AttributeError):
        config.listen = "tcp:1"  # type: ignore[misc]


def test_virtual_images(tmp_path) -> None:
    spec = [{"image": "qnib/bench", "manifests": [
        {"image": "qnib/plain:cpu-skylake",
         "platform": {"os": "linux", "architecture": "amd64", "features": ["cpu:skylake"], "osfeatures": ["x"]}},
        {"image": "ghcr.io/org/app@sha256:" + "a" * 64, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    ]}]
    config = parse_config(minimal(tmp_path) | {"virtual_images": spec}, str(tmp_path))
    [image] = config.virtual_images
    assert image.image == "qnib/bench"
    assert image.manifests[0].platform.features == ("cpu:skylake",) and image.manifests[0].platform.osfeatures == ("x",)
    assert image.manifests[1].platform.variant == "v8"
    cases = {
        "virtual_images[0].image: 'Qnib/bench'": [{"image": "Qnib/bench", "manifests": spec[0]["manifests"]}],
        "virtual_images[0].manifests: expected a non-empty list, got an empty list":
            [{"image": "a/b", "manifests": []}],
        "virtual_images[0].manifests[0].platform.architecture: required key is missing":
            [{"image": "a/b", "manifests": [{"image": "x:y", "platform": {"os": "linux"}}]}],
        "virtual_images[0].image: a virtual image is named by NAME[:TAG]":
            [{"image": "a/b@sha256:" + "a" * 64, "manifests": spec[0]["manifests"]}],
    }
    for expected, value in cases.items():
        assert error(minimal(tmp_path) | {"virtual_images": value}, tmp_path).startswith(expected)


def test_the_builtin_default_is_the_documented_one(tmp_path) -> None:
    docs = (REPO / "docs" / "configuration.md").read_text()
    documented = yaml.safe_load(docs.split("serves a\nbuilt-in default", 1)[1].split("```yaml", 1)[1].split("```", 1)[0])
    assert parse_config(documented, str(tmp_path)) == builtin_config(str(tmp_path))
    config = builtin_config(str(tmp_path))
    assert config.listen == "tcp:5000:interface=127.0.0.1" and config.anonymous == "allow"
    assert config.storage.path == str(tmp_path / "store") and config.default_upstream == "docker.io"


def test_node_id(tmp_path) -> None:
    assert parse_config(minimal(tmp_path), str(tmp_path)).node_id is None  # the host name, at startup
    assert parse_config(minimal(tmp_path) | {"node_id": "gpu-07"}, str(tmp_path)).node_id == "gpu-07"
    assert error(minimal(tmp_path) | {"node_id": "../x"}, tmp_path).startswith("node_id: expected up to 64 letters")


def test_a_yaml_boolean_where_a_word_belongs_says_so(tmp_path) -> None:
    assert error(minimal(tmp_path) | {"anonymous": True}, tmp_path) == (
        "anonymous: expected one of allow, deny, got the boolean true "
        "(YAML reads unquoted yes, no, on, off as booleans)")


def test_access_log_switch(tmp_path) -> None:
    assert parse_config(minimal(tmp_path), str(tmp_path)).access_log is True
    assert parse_config(minimal(tmp_path) | {"access_log": False}, str(tmp_path)).access_log is False
    assert error(minimal(tmp_path) | {"access_log": "no"}, tmp_path).startswith("access_log: expected true or false")
