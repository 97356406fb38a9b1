"""The configuration contract (see docs/configuration.md): YAML in, frozen dataclasses out.

Everything is checked here, once, at startup, so the rest of the server can trust its ``Config``: a
bad file stops metahub with one line ``PATH: problem`` (a :class:`ConfigError`) instead of a traceback
minutes later in a request handler. Each mapping is described by a small table of its keys
(``_Key``); one generic walker (:func:`_fields`) rejects unknown keys, refuses inline secrets,
reports missing required keys and runs each key's converter with the key's dotted path, so every
error names exactly what to fix (``machine_types.type1.featurs: unknown key``).

Secrets (upstream passwords, account password hashes) are fields with ``repr=False`` and are never
echoed in an error message or in :func:`config_summary`.
"""
from __future__ import annotations

import base64
import binascii
import copy
import difflib
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from importlib import resources
from typing import Any, Callable, Mapping, NoReturn, TypeVar
from urllib.parse import urlsplit

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from metahub.config import features
from metahub.oci.grammar import COMPONENT, split_reference
from metahub.oci.sizes import format_size

__all__ = [
    "Account",
    "Config",
    "ConfigError",
    "HttpConfig",
    "MachineType",
    "StorageConfig",
    "UpstreamConfig",
    "config_summary",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]


class ConfigError(Exception):
    """A bad configuration: the message is one line that names the key's path."""


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str  # scheme://host[:port], no trailing slash
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # read from password_file; never logged
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # ca_file, resolved; when set, its certificates (each PEM) are the only TLS trust roots for
    # every https connection this upstream makes (its URL, its token realm, hosts it redirects to).
    ca_file: str | None = None
    ca_certificates: tuple[bytes, ...] = field(default=(), repr=False)  # not secret, just long

    @property
    def host(self) -> str:
        """``host[:port]`` of the URL, what containerd sends as ``?ns=``."""
        return urlsplit(self.url).netloc


@dataclass(frozen=True)
class StorageConfig:
    path: str
    index: str
    max_size: int | None = None  # bytes
    lease_timeout: float = 30.0  # a download lease silent this long belongs to a dead node
    gc_interval: float = 600.0  # how often a node tries to collect (one node at a time)
    gc_grace: float = 3600.0  # blobs read this recently are never evicted
    io_threads: int = 8  # threads for store I/O, and as many again for reads of open files


@dataclass(frozen=True)
class MachineType:
    name: str
    os: str
    architecture: str
    variant: str | None = None
    features: tuple[str, ...] = ()
    match: str = "compatible"  # or "subset" (literal features) or "exact" (the original MetaHub rule)


@dataclass(frozen=True)
class Account:
    name: str
    password_hash: str = field(repr=False)
    machine_types: tuple[str, ...] = ()
    repositories: tuple[str, ...] | None = None  # None: every repository


@dataclass(frozen=True)
class VirtualEntry:
    """One build of a virtual image: a source image and the platform it is listed under."""

    image: str  # NAME[:TAG|@DIGEST] as a client would write it (routed like a client's name)
    os: str
    architecture: str
    variant: str | None = None
    features: tuple[str, ...] = ()
    os_features: tuple[str, ...] = ()


@dataclass(frozen=True)
class VirtualImage:
    """A manifest list nobody pushed: manifest-tool's ``image:``/``manifests:`` spec."""

    image: str  # NAME[:TAG] clients pull (tag defaults to latest)
    manifests: tuple[VirtualEntry, ...]


@dataclass(frozen=True)
class LoginLimits:
    """Failed logins per client address and per account (a token bucket each), and the KDF's pool."""

    failures_per_minute: float = 10.0
    burst: int = 10
    kdf_threads: int = 2
    kdf_queue: int = 16  # KDF runs that may wait for a thread; beyond that, 503 at once
    tracked: int = 10_000  # addresses, and unknown usernames, whose failures are remembered


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Loopback: by default only this host reads /metrics on the registry's port.
LOCAL_NETWORKS: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class MetricsConfig:
    allow: tuple[Network, ...] = LOCAL_NETWORKS  # clients that may read /metrics on the registry's port
    listen: str | None = None  # an endpoint of its own that serves only /metrics


@dataclass(frozen=True)
class HttpConfig:
    """Limits on the HTTP connections clients make (the ``http:`` section)."""

    header_timeout: float = 30.0  # seconds for a request line and headers, however they trickle in
    max_connections_per_address: int = 4096  # open connections from one client address


@dataclass(frozen=True)
class Config:
    storage: StorageConfig
    upstreams: dict[str, UpstreamConfig]
    default_upstream: str
    listen: str = "tcp:5000"
    http: HttpConfig = field(default_factory=HttpConfig)
    tag_ttl: float = 300.0  # seconds
    anonymous: str = "deny"  # or "allow"
    machine_types: dict[str, MachineType] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    virtual_images: tuple[VirtualImage, ...] = ()
    pin: tuple[str, ...] = ()  # image references whose blobs eviction never removes
    access_log: bool = True  # one log line per request (twisted.web's combined log format)
    node_id: str | None = None  # this node's name in the shared store; None: the host name
    logins: LoginLimits = LoginLimits()
    metrics: MetricsConfig = MetricsConfig()
    source: str | None = None  # the file it was loaded from, for logs and `check-config`


# --- public helpers ----------------------------------------------------------------------------

_SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")

_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|[dhms]))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|[dhms])")


def parse_size(value: object) -> int:
    """``200GiB`` / ``500MB`` / ``1024`` -> bytes. Raises ``ValueError``.

    Both IEC (KiB = 1024) and SI (kB = 1000) suffixes, case-insensitive; a bare number is bytes. A
    bare ``G`` or ``M`` is refused because operators mean both 10**9 and 2**30 by it.
    """
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("not a size")
    result = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]  # exact, unlike float
    if result.denominator != 1:
        raise ValueError("not a whole number of bytes")
    return int(result)


def parse_duration(value: object) -> float:
    """``5m`` / ``30s`` / ``1h30m`` / ``250ms`` / a number of seconds -> seconds. Raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION.fullmatch(value.strip()):
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value))
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", value):
        seconds = float(value)
    else:
        raise ValueError("not a duration")
    if not math.isfinite(seconds):
        raise ValueError("not a duration")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds back into the config's own notation, for logs (``5400`` -> ``1h30m``)."""
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or "0s"


# --- loading -----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping.

    Plain PyYAML keeps the last duplicate silently, so a second ``storage:`` further down a long
    file would quietly win; here it is an error with its line number.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


#: What serves with no config file: a cache of the public registries for this host, which needs no
#: decision from a new user. Paths are relative to METAHUB_HOME (default ``./.metahub``).
BUILTIN_DEFAULT: Mapping[str, Any] = {
    "listen": "tcp:5000:interface=127.0.0.1",
    "storage": {"path": "store", "index": "index"},
    "upstreams": {
        "docker.io": {"url": "https://registry-1.docker.io"},
        "ghcr.io": {"url": "https://ghcr.io"},
        "quay.io": {"url": "https://quay.io"},
    },
    "default_upstream": "docker.io",
    "cache": {"tag_ttl": "5m"},
    "anonymous": "allow",
}


def builtin_config(home: str) -> Config:
    """The embedded default, with its store and index under ``home``."""
    return parse_config(copy.deepcopy(dict(BUILTIN_DEFAULT)), os.path.abspath(home))


def example_text() -> str:
    """The commented example configuration (``examples/metahub.yaml``), installed with metahub."""
    return resources.files("metahub.config").joinpath("example.yaml").read_text(encoding="utf-8")


def load_config(path: str) -> Config:
    """Read and check a YAML config file; relative paths in it are relative to its directory.

    Every problem, including a missing file or a YAML syntax error, is a one-line
    :class:`ConfigError` (``FILE:LINE:COLUMN: ...`` for syntax), never a traceback.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = e.problem or e.context or "invalid YAML"
        if e.context and e.problem:
            problem = f"{problem} ({e.context})"
        raise ConfigError(_one_line(f"{where}: YAML syntax error: {problem}")) from None
    except yaml.reader.ReaderError as e:  # a control character: PyYAML gives only an offset
        line = text.count("\n", 0, e.position) + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise ConfigError(f"{path}:{line}: YAML syntax error: character U+{code:04X} is not allowed") from None
    except yaml.YAMLError as e:
        raise ConfigError(_one_line(f"{path}: YAML syntax error: {e}")) from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; required keys: {_required_keys(_TOP)}")
    config = parse_config(data, os.path.dirname(os.path.abspath(path)))
    return replace(config, source=os.path.abspath(path))


def parse_config(data: object, base_dir: str) -> Config:
    """Check already-parsed YAML (``data``) and build a :class:`Config`.

    ``base_dir`` anchors relative paths (store, index, password files), so a config and its
    secrets can move together and a test can point at ``tmp_path``.
    """
    ctx = _Context(os.path.abspath(base_dir))
    if data is None:
        _fail("(top level)", f"the configuration is empty; required keys: {_required_keys(_TOP)}")
    values = _fields(data, "", _TOP, ctx)
    upstreams: dict[str, UpstreamConfig] = values["upstreams"]
    machine_types: dict[str, MachineType] = values.get("machine_types", {})
    accounts: dict[str, Account] = values.get("accounts", {})
    default = values.get("default_upstream")
    if default is None:
        if len(upstreams) != 1:
            _fail("default_upstream", f"required when there is more than one upstream ({_names(upstreams)})")
        default = next(iter(upstreams))
    elif default not in upstreams:
        _fail("default_upstream", f"{default!r} is not an upstream (defined: {_names(upstreams)})")
    for account in accounts.values():
        for i, type_name in enumerate(account.machine_types):
            if type_name not in machine_types:
                _fail(
                    f"accounts.{account.name}.machine_types[{i}]",
                    f"unknown machine type {type_name!r} (defined: {_names(machine_types)})",
                )
    cache = values.get("cache", {})
    return Config(
        storage=values["storage"],
        upstreams=upstreams,
        default_upstream=default,
        listen=values.get("listen", Config.listen),
        http=values.get("http", HttpConfig()),
        tag_ttl=cache.get("tag_ttl", Config.tag_ttl),
        anonymous=values.get("anonymous", Config.anonymous),
        machine_types=machine_types,
        accounts=accounts,
        virtual_images=values.get("virtual_images", ()),
        pin=values.get("pin", ()),
        access_log=values.get("access_log", Config.access_log),
        node_id=values.get("node_id"),
        logins=values.get("logins", Config.logins),
        metrics=values.get("metrics", Config.metrics),
    )


def config_summary(config: Config) -> str:
    """A few lines for the startup log: enough to see which config is live, and no secret."""
    storage = config.storage
    bound = format_size(storage.max_size) if storage.max_size is not None else "unbounded"
    upstreams = ", ".join(
        f"{u.name}={u.url}"
        + (" (default)" if u.name == config.default_upstream else "")
        + (" (with credentials)" if u.password is not None else "")
        + (f" (trusting {len(u.ca_certificates)} CA certificates from {u.ca_file})" if u.ca_file else "")
        for u in config.upstreams.values()
    )
    access = f"anonymous pulls: {config.anonymous}"
    if config.anonymous == "deny" and not config.accounts:
        access += " (no accounts defined: every pull will be refused)"
    lines = [
        f"config: {config.source}" if config.source else None,
        f"listen: {config.listen}",
        f"storage: path={storage.path} index={storage.index} max_size={bound}",
        f"upstreams: {upstreams}",
        f"tag_ttl: {format_duration(config.tag_ttl)}; {access}",
        f"machine types: {len(config.machine_types)}; accounts: {len(config.accounts)}",
    ]
    return "\n".join(line for line in lines if line)


# --- the walker --------------------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class _Context:
    base_dir: str


Convert = Callable[[Any, str, _Context], Any]


@dataclass(frozen=True)
class _Key:
    """One row of a key table: how to convert the value, and whether it must be there.

    ``refuse`` marks a key people will try (an inline ``password``) that is rejected with advice
    rather than as merely unknown.
    """

    convert: Convert
    required: bool = False
    refuse: str | None = None


def _fail(path: str, problem: str) -> NoReturn:
    raise ConfigError(f"{path or '(top level)'}: {problem}")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe(value: object) -> str:
    """A short rendering of a wrong value for an error message (never used for secrets)."""
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, bool):
        # anonymous: yes is a boolean to YAML, and "got True" would leave the user guessing why.
        return f"the boolean {str(value).lower()} (YAML reads unquoted yes, no, on, off as booleans)"
    text = repr(value)
    return _one_line(text if len(text) <= 60 else text[:57] + "...")


def _names(mapping: Mapping[str, Any]) -> str:
    return ", ".join(mapping) or "none"


def _required_keys(table: Mapping[str, _Key]) -> str:
    return ", ".join(key for key, spec in table.items() if spec.required)


def _mapping(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(path, f"expected a mapping, got {_describe(value)}")
    for key in value:
        if not isinstance(key, str):
            _fail(_join(path, str(key)), f"keys must be strings, got {_describe(key)}")
    return value


def _fields(value: object, path: str, table: Mapping[str, _Key], ctx: _Context) -> dict[str, Any]:
    """Walk one mapping against its key table; returns the converted values of the keys present.

    A key set to nothing (``key:`` or ``~``) counts as absent, so commenting out every entry under
    ``accounts:`` leaves a valid file.
    """
    out: dict[str, Any] = {}
    for key, item in _mapping(value, path).items():
        key_path = _join(path, key)
        spec = table.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.5)
            _fail(key_path, "unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif spec.refuse:
            _fail(key_path, spec.refuse)
        elif item is not None:
            out[key] = spec.convert(item, key_path, ctx)
        elif spec.required:
            _fail(key_path, "required, but has no value")
    for key, spec in table.items():
        if spec.required and key not in out:
            _fail(_join(path, key), "required key is missing")
    return out


def _named(
    value: object, path: str, ctx: _Context, name_rule: Callable[[str], str | None],
    entry: Callable[[str, Any, str, _Context], T],
) -> dict[str, T]:
    """A mapping of user-chosen names to entries (upstreams, machine types, accounts)."""
    out: dict[str, T] = {}
    for name, item in _mapping(value, path).items():
        item_path = _join(path, name)
        problem = name_rule(name)
        if problem:
            _fail(item_path, problem)
        out[name] = entry(name, item, item_path, ctx)
    return out


# --- scalar converters -------------------------------------------------------------------------


def _string(value: object, path: str, ctx: _Context) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(path, f"expected a non-empty string, got {_describe(value)}")
    return value.strip()


def _choice(*choices: str) -> Convert:
    def convert(value: object, path: str, ctx: _Context) -> str:
        if value not in choices:
            _fail(path, f"expected one of {', '.join(choices)}, got {_describe(value)}")
        return value
    return convert


def _strings(value: object, path: str, ctx: _Context) -> tuple[str, ...]:
    """A list of distinct non-empty strings: a duplicate is always a typo or a paste error."""
    if not isinstance(value, list):
        _fail(path, f"expected a list, got {_describe(value)}")
    out: list[str] = []
    for i, item in enumerate(value):
        text = _string(item, _join(path, i), ctx)
        if text in out:
            _fail(_join(path, i), f"duplicate entry {text!r}")
        out.append(text)
    return tuple(out)


def endpoint_problem(description: str) -> str | None:
    """What is wrong with a Twisted server endpoint string, or None if it parses.

    Parsing builds the endpoint without listening (no reactor is used until ``listen``), and for
    ``ssl:`` loads the key and certificate, so a missing or unreadable file is found here, by
    ``check-config`` as at startup, not by a traceback. Relative paths are the process's: twistd's.
    """
    from OpenSSL import SSL, crypto  # Twisted's own TLS dependency (twisted[tls])
    from twisted.internet import endpoints

    try:
        endpoints.serverFromString(None, description)
    except OSError as error:
        return f"cannot read {error.filename}: {error.strerror}"
    except (SSL.Error, crypto.Error) as error:
        return f"cannot load its TLS key and certificate: {error}"
    except (ValueError, TypeError) as error:
        # Twisted names its private parser in these messages (``_parseTCP() got ...``).
        reason = re.sub(r"^_parse\w*\(\) ", "", str(error))
        return (f"not a Twisted endpoint string ({reason}); examples: tcp:5000:interface=127.0.0.1, "
                "ssl:5443:privateKey=key.pem:certKey=cert.pem, unix:/run/metahub.sock")
    return None


def _endpoint(value: object, path: str, ctx: _Context) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(path, f"expected a Twisted endpoint string such as tcp:5000, got {_describe(value)}")
    problem = endpoint_problem(value.strip())
    if problem is not None:
        _fail(path, problem)
    return value.strip()


def _path(value: object, path: str, ctx: _Context) -> str:
    return os.path.normpath(os.path.join(ctx.base_dir, _string(value, path, ctx)))


def _size(value: object, path: str, ctx: _Context) -> int:
    try:
        size = parse_size(value)
    except ValueError:
        _fail(path, f"expected a size such as 200GiB, 500MB or 1024 (bytes), got {_describe(value)}")
    if size <= 0:
        _fail(path, "must be greater than 0")
    return size


def _duration(minimum: float, strict: bool) -> Convert:
    def convert(value: object, path: str, ctx: _Context) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            _fail(path, f"expected a duration such as 5m, 30s, 1h30m or a number of seconds, got {_describe(value)}")
        if seconds < minimum or (strict and seconds == minimum):
            _fail(path, f"must be {'greater than' if strict else 'at least'} {minimum:g} seconds")
        return seconds
    return convert


def _url(value: object, path: str, ctx: _Context) -> str:
    """``http(s)://host[:port]``: a path would be silently dropped by the /v2/ client, so refuse it."""
    text = _string(value, path, ctx)
    if "@" in text:
        _fail(path, "credentials in the URL are not accepted; use username and password_file")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        _fail(path, f"not a valid URL: {text!r}")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        _fail(path, f"expected an http:// or https:// URL such as https://ghcr.io, got {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        _fail(path, f"expected scheme://host[:port] with no path or query, got {text!r}")
    return f"{scheme}://{parts.netloc}"


def _secret_file(value: object, path: str, ctx: _Context) -> str:
    """Read a secret at load time, so a missing file stops startup rather than the first pull."""
    file_path = _path(value, path, ctx)
    try:
        with open(file_path, encoding="utf-8") as f:
            secret = f.read().rstrip("\r\n")
    except OSError as e:
        _fail(path, f"cannot read {file_path}: {e.strerror or e}")
    except UnicodeDecodeError:
        _fail(path, f"{file_path} is not UTF-8 text")
    if not secret:
        _fail(path, f"{file_path} is empty")
    return secret


#: Bounds for the scrypt parameters of a ``password_hash``: what ``hash-password`` writes lies
#: well inside them, and a login must not be made to cost more than the 256 MiB the check allows.
_SCRYPT_LOG2_N = range(10, 21)
_SCRYPT_MAX_R, _SCRYPT_MAX_P, _SCRYPT_MAX_MEMORY = 64, 16, 256 * 1024 * 1024


def _base64_field(text: str, smallest: int) -> bytes | None:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    # Canonical only: b64decode ignores bits a different spelling of the same bytes would set.
    return raw if len(raw) >= smallest and base64.b64encode(raw).decode() == text else None


def password_hash_problem(value: str) -> str | None:
    """Why ``value`` is not a usable ``scrypt$N$r$p$SALT$HASH`` (never quoting it: it is secret)."""
    fields = value.split("$")
    if len(fields) != 6 or fields[0] != "scrypt":
        return "expected scrypt$N$r$p$SALT$HASH"
    n, r, p = (int(field) if field.isascii() and field.isdigit() and len(field) < 10 else 0 for field in fields[1:4])
    if n < 2 or n & (n - 1) or n.bit_length() - 1 not in _SCRYPT_LOG2_N:
        return f"N must be a power of two from 2^{_SCRYPT_LOG2_N.start} to 2^{_SCRYPT_LOG2_N.stop - 1}"
    if not 1 <= r <= _SCRYPT_MAX_R or not 1 <= p <= _SCRYPT_MAX_P:
        return f"r must be 1..{_SCRYPT_MAX_R} and p 1..{_SCRYPT_MAX_P}"
    if 128 * r * (n + p) > _SCRYPT_MAX_MEMORY:
        return "N and r ask for more than 256 MiB per login"
    if _base64_field(fields[4], 8) is None:
        return "the salt is not base64 of at least 8 bytes"
    if _base64_field(fields[5], 16) is None:
        return "the hash is not base64 of at least 16 bytes (a placeholder?)"
    return None


def _ca_file(value: object, path: str, ctx: _Context) -> tuple[str, tuple[bytes, ...]]:
    """Read a PEM CA bundle at load time: a typo must stop startup, not fail every pull with a TLS error."""
    file_path = _path(value, path, ctx)
    try:
        with open(file_path, "rb") as f:
            data = f.read()
    except OSError as e:
        _fail(path, f"cannot read {file_path}: {e.strerror or e}")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        # cryptography's message is about its parser; what to fix is the file's content.
        _fail(path, f"{file_path} is not a PEM bundle of certificates (-----BEGIN CERTIFICATE----- blocks)")
    return file_path, tuple(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _password_hash(value: object, path: str, ctx: _Context) -> str:
    # The value is secret: never echo it back.
    if not isinstance(value, str):
        _fail(path, "expected the string `metahub hash-password` prints")
    problem = password_hash_problem(value)
    if problem is not None:
        _fail(path, f"not a hash from `metahub hash-password`: {problem}")
    return value


# --- names -------------------------------------------------------------------------------------

# Logins are ACCOUNT-TYPE split at the first "-", and HTTP Basic splits at ":", so neither may appear.
_LOGIN_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]*")


_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _node_id(value: object, path: str, ctx: _Context) -> str:
    text = _string(value, path, ctx)
    if not _NODE_ID.fullmatch(text):
        _fail(path, f"expected up to 64 letters, digits, '.', '_' or '-' (a host name, say), got {_describe(text)}")
    return text


def _upstream_name(name: str) -> str | None:
    if COMPONENT.fullmatch(name):
        return None
    return (
        "an upstream name is a repository path component: lowercase letters and digits, "
        "separated by '.', '_' or '-' (e.g. docker.io, ghcr.io, private)"
    )


def _login_part(kind: str) -> Callable[[str], str | None]:
    def rule(name: str) -> str | None:
        if "-" in name:
            return f"{kind} names must not contain '-': the login ACCOUNT-TYPE is split at the first '-'"
        if not _LOGIN_PART.fullmatch(name):
            return f"{kind} names are letters, digits, '_' and '.', starting with a letter or digit"
        return None
    return rule


# --- sections ----------------------------------------------------------------------------------

_STORAGE = {
    "path": _Key(_path, required=True),
    "index": _Key(_path, required=True),
    "max_size": _Key(_size),
    "lease_timeout": _Key(_duration(0, strict=True)),
    "gc_interval": _Key(_duration(0, strict=True)),
    "gc_grace": _Key(_duration(0, strict=False)),
    "io_threads": _Key(lambda value, path, ctx: _count(value, path, ctx)),  # defined further down
}


def _storage(value: object, path: str, ctx: _Context) -> StorageConfig:
    values = _fields(value, path, _STORAGE, ctx)
    store, index = os.path.realpath(values["path"]), os.path.realpath(values["index"])
    if os.path.commonpath([store, index]) == store:
        _fail(
            _join(path, "index"),
            "must not be storage.path or inside it: the LMDB index is per node and belongs on local "
            "disk, the store may be shared",
        )
    return StorageConfig(**values)


_UPSTREAM = {
    "url": _Key(_url, required=True),
    "username": _Key(_string),
    "password_file": _Key(_secret_file),
    "password": _Key(_string, refuse="inline passwords are not accepted; put it in a file and use password_file"),
    "connect_timeout": _Key(_duration(0, strict=True)),
    "read_timeout": _Key(_duration(0, strict=True)),
    "ca_file": _Key(_ca_file),
}


def _upstream(name: str, value: object, path: str, ctx: _Context) -> UpstreamConfig:
    values = _fields(value, path, _UPSTREAM, ctx)
    if ("username" in values) != ("password_file" in values):
        missing = "password_file" if "username" in values else "username"
        other = "username" if missing == "password_file" else "password_file"
        _fail(_join(path, missing), f"required with {other}: they go together")
    ca_file, ca_certificates = values.get("ca_file", (None, ()))
    return UpstreamConfig(
        name=name,
        url=values["url"],
        username=values.get("username"),
        password=values.get("password_file"),
        connect_timeout=values.get("connect_timeout", UpstreamConfig.connect_timeout),
        read_timeout=values.get("read_timeout", UpstreamConfig.read_timeout),
        ca_file=ca_file,
        ca_certificates=ca_certificates,
    )


def _upstreams(value: object, path: str, ctx: _Context) -> dict[str, UpstreamConfig]:
    upstreams = _named(value, path, ctx, _upstream_name, _upstream)
    if not upstreams:
        _fail(path, "at least one upstream is required")
    return upstreams


def _count(value: object, path: str, ctx: _Context) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(path, f"expected a whole number of at least 1, got {_describe(value)}")
    return value


_HTTP = {
    "header_timeout": _Key(_duration(0, strict=True)),
    "max_connections_per_address": _Key(_count),
}


def _http(value: object, path: str, ctx: _Context) -> HttpConfig:
    return HttpConfig(**_fields(value, path, _HTTP, ctx))


_CACHE = {"tag_ttl": _Key(_duration(0, strict=False))}


def _cache(value: object, path: str, ctx: _Context) -> dict[str, Any]:
    return _fields(value, path, _CACHE, ctx)


_PLATFORM = {
    "os": _Key(_string, required=True),
    "architecture": _Key(_string, required=True),
    "variant": _Key(_string),
}
_MACHINE_TYPE = {
    "platform": _Key(lambda v, p, c: _fields(v, p, _PLATFORM, c), required=True),
    "features": _Key(_strings),
    "match": _Key(_choice("compatible", "subset", "exact")),
}


def _machine_type(name: str, value: object, path: str, ctx: _Context) -> MachineType:
    values = _fields(value, path, _MACHINE_TYPE, ctx)
    platform = values["platform"]
    if values.get("match", MachineType.match) == "compatible":
        # Only this rule gives cpu: and nvcap: a meaning; under subset and exact they are labels.
        for i, feature in enumerate(values.get("features", ())):
            if problem := features.machine_feature_problem(feature):
                _fail(_join(_join(path, "features"), i), problem)
        if platform["architecture"] == "amd64" and features.amd64_level(platform.get("variant")) is None:
            _fail(_join(_join(path, "platform"), "variant"),
                  f"an amd64 variant is a level, one of {', '.join(features.AMD64_LEVELS)}")
    return MachineType(
        name=name,
        os=platform["os"],
        architecture=platform["architecture"],
        variant=platform.get("variant"),
        features=values.get("features", ()),
        match=values.get("match", MachineType.match),
    )


_ACCOUNT = {
    "password_hash": _Key(_password_hash, required=True),
    "password": _Key(
        _string,
        refuse="plain passwords are not accepted; put the output of `metahub hash-password` in password_hash",
    ),
    "machine_types": _Key(_strings),
    "repositories": _Key(_strings),
}


def _account(name: str, value: object, path: str, ctx: _Context) -> Account:
    values = _fields(value, path, _ACCOUNT, ctx)
    return Account(
        name=name,
        password_hash=values["password_hash"],
        machine_types=values.get("machine_types", ()),
        repositories=values.get("repositories"),
    )


def _boolean(value: object, path: str, ctx: _Context) -> bool:
    if not isinstance(value, bool):
        _fail(path, f"expected true or false, got {_describe(value)}")
    return value


def _image_reference(digests: bool) -> Convert:
    def convert(value: object, path: str, ctx: _Context) -> str:
        text = _string(value, path, ctx)
        try:
            _, reference = split_reference(text)
        except ValueError as error:
            _fail(path, str(error))
        if reference.startswith("sha256:") and not digests:
            _fail(path, "a virtual image is named by NAME[:TAG], not a digest")
        return text
    return convert


_VIRTUAL_PLATFORM = {
    "os": _Key(_string, required=True),
    "architecture": _Key(_string, required=True),
    "variant": _Key(_string),
    "features": _Key(_strings),
    "osfeatures": _Key(_strings),
}
_VIRTUAL_ENTRY = {
    "image": _Key(_image_reference(digests=True), required=True),
    "platform": _Key(lambda v, p, c: _fields(v, p, _VIRTUAL_PLATFORM, c), required=True),
}
_VIRTUAL_IMAGE = {
    "image": _Key(_image_reference(digests=False), required=True),
    "manifests": _Key(lambda v, p, c: _list(v, p, c, _virtual_entry), required=True),
}


def _list(value: object, path: str, ctx: _Context, item: Callable[[object, str, _Context], T]) -> tuple[T, ...]:
    if not isinstance(value, list) or not value:
        _fail(path, f"expected a non-empty list, got {_describe(value)}")
    return tuple(item(element, _join(path, i), ctx) for i, element in enumerate(value))


def _virtual_entry(value: object, path: str, ctx: _Context) -> VirtualEntry:
    values = _fields(value, path, _VIRTUAL_ENTRY, ctx)
    platform = values["platform"]
    return VirtualEntry(
        image=values["image"],
        os=platform["os"],
        architecture=platform["architecture"],
        variant=platform.get("variant"),
        features=platform.get("features", ()),
        os_features=platform.get("osfeatures", ()),
    )


def _virtual_image(value: object, path: str, ctx: _Context) -> VirtualImage:
    values = _fields(value, path, _VIRTUAL_IMAGE, ctx)
    return VirtualImage(image=values["image"], manifests=values["manifests"])


def _number(minimum: float, integer: bool) -> Convert:
    """A number (an integer when ``integer``) of at least ``minimum``."""
    def convert(value: object, path: str, ctx: _Context) -> float:
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            _fail(path, f"expected {'an integer' if integer else 'a number'}, got {_describe(value)}")
        if value < minimum:
            _fail(path, f"must be at least {minimum:g}")
        return value
    return convert


_LOGINS = {
    "failures_per_minute": _Key(_number(0.01, integer=False)),
    "burst": _Key(_number(1, integer=True)),
    "kdf_threads": _Key(_number(1, integer=True)),
    "kdf_queue": _Key(_number(0, integer=True)),
    "tracked": _Key(_number(1, integer=True)),
}


def _logins(value: object, path: str, ctx: _Context) -> LoginLimits:
    return LoginLimits(**_fields(value, path, _LOGINS, ctx))


def _networks(value: object, path: str, ctx: _Context) -> tuple[Network, ...]:
    """Addresses or CIDR blocks (``10.0.0.0/8``, ``::1``); an empty list allows nobody."""
    if not isinstance(value, list):
        _fail(path, f"expected a list of addresses or CIDR blocks, got {_describe(value)}")
    networks: list[Network] = []
    for i, item in enumerate(value):
        try:
            networks.append(ipaddress.ip_network(_string(item, _join(path, i), ctx)))
        except ValueError as error:
            _fail(_join(path, i), f"expected an address or a CIDR block such as 10.0.0.0/8: {error}")
    return tuple(networks)


_METRICS = {
    "allow": _Key(_networks),
    "listen": _Key(_endpoint),
}


def _metrics(value: object, path: str, ctx: _Context) -> MetricsConfig:
    return MetricsConfig(**_fields(value, path, _METRICS, ctx))


_TOP = {
    "listen": _Key(_endpoint),
    "http": _Key(_http),
    "storage": _Key(_storage, required=True),
    "upstreams": _Key(_upstreams, required=True),
    "default_upstream": _Key(_string),
    "cache": _Key(_cache),
    "anonymous": _Key(_choice("allow", "deny")),
    "machine_types": _Key(lambda v, p, c: _named(v, p, c, _login_part("machine type"), _machine_type)),
    "accounts": _Key(lambda v, p, c: _named(v, p, c, _login_part("account"), _account)),
    "virtual_images": _Key(lambda v, p, c: _list(v, p, c, _virtual_image)),
    "pin": _Key(lambda v, p, c: _list(v, p, c, _image_reference(digests=True))),
    "access_log": _Key(_boolean),
    "node_id": _Key(_node_id),
    "logins": _Key(_logins),
    "metrics": _Key(_metrics),
}
