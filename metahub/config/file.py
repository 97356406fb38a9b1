"""The configuration contract (see docs/configuration.md): YAML in, frozen, checked values out.

The file's shape is declared once, as pydantic dataclasses (frozen, ``extra="forbid"``): pydantic
walks it, and :func:`config_schema` prints it as a JSON Schema for editors. What stays ours is what
users read: each problem is one line ``PATH: problem`` (a :class:`ConfigError`) naming exactly the
key to fix (``machine_types.type1.featurs: unknown key (did you mean 'features'?)``), in the words
below, never pydantic's; sizes and durations in human units; paths relative to the file.

Why pydantic rather than attrs + cattrs: one declaration gives validation, error locations for
every nested key and a JSON Schema; cattrs has no schema output, so the schema would be hand-written
beside the classes and drift from them.

Secrets (upstream passwords, account password hashes) are fields with ``repr=False`` and are never
echoed in an error message or in :func:`config_summary`.
"""
from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import difflib
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Literal, Mapping
from urllib.parse import urlsplit

import pydantic
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainValidator,
    ValidationInfo,
)
from pydantic_core import ArgsKwargs, PydanticCustomError

from metahub.config import features
from metahub.oci.grammar import COMPONENT, split_reference
from metahub.oci.sizes import format_size

if TYPE_CHECKING:
    from twisted.internet.interfaces import IStreamServerEndpoint

__all__ = [
    "Account",
    "Config",
    "ConfigError",
    "HttpConfig",
    "MachineTypeEntry",
    "StorageConfig",
    "UpstreamConfig",
    "VirtualEntry",
    "VirtualImage",
    "config_schema",
    "config_summary",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]


class ConfigError(Exception):
    """A bad configuration: the message is one line that names the key's path."""


# --- human units -------------------------------------------------------------------------------

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


# --- problems, in our words --------------------------------------------------------------------


def _problem(text: str, *at: str | int) -> PydanticCustomError:
    """A problem pydantic carries to :func:`_line` verbatim; ``at`` extends the location
    (a key the check is about, below the value being checked)."""
    return PydanticCustomError("metahub", "{problem}", {"problem": text, "at": at})


def _describe(value: object) -> str:
    """A short rendering of a wrong value for an error message (never used for secrets)."""
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list" if value else "an empty list"
    if isinstance(value, bool):
        # anonymous: yes is a boolean to YAML, and "got True" would leave the user guessing why.
        return f"the boolean {str(value).lower()} (YAML reads unquoted yes, no, on, off as booleans)"
    text = repr(value)
    return _one_line(text if len(text) <= 60 else text[:57] + "...")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _names(mapping: Mapping[str, Any]) -> str:
    return ", ".join(mapping) or "none"


def _path(loc: tuple[str | int, ...]) -> str:
    path = ""
    for key in loc:
        path = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
    return path or "(top level)"


def _line(error: pydantic.ValidationError) -> str:
    """pydantic's first error as ``PATH: problem``.

    Most problems are ours (:func:`_problem`, from the validators below); pydantic's own kinds
    that a file can reach are worded here, and its wording is kept only for kinds we never expect.
    """
    item = error.errors(include_url=False)[0]
    ctx, kind, value = item.get("ctx") or {}, item["type"], item.get("input")
    problem = {
        "metahub": str(ctx.get("problem")),
        "missing": "required key is missing",
        "tuple_type": f"expected a list, got {_describe(value)}",
        "bool_type": f"expected true or false, got {_describe(value)}",
        "int_type": f"expected an integer, got {_describe(value)}",
        "float_type": f"expected a number, got {_describe(value)}",
        "finite_number": f"expected a number, got {_describe(value)}",
        "greater_than_equal": f"must be at least {ctx.get('ge', 0):g}",
        "too_short": f"expected a non-empty list, got {_describe(value)}",
    }.get(kind, item["msg"])
    return f"{_path((*item['loc'], *ctx.get('at', ())))}: {_one_line(problem)}"


# --- value types: each a validator in our words, and the JSON Schema type it accepts ------------


def _value(check: Callable[..., Any], accepts: Any) -> PlainValidator:
    """``Annotated`` metadata: ``check`` replaces pydantic's validation; ``accepts`` is the schema's type."""
    return PlainValidator(check, json_schema_input_type=accepts)


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _problem(f"expected a non-empty string, got {_describe(value)}")
    return value.strip()


def _distinct(values: tuple[str, ...]) -> tuple[str, ...]:
    """A duplicate in a list of names is always a typo or a paste error."""
    for i, value in enumerate(values):
        if value in values[:i]:
            raise _problem(f"duplicate entry {value!r}", i)
    return values


def _choice(*choices: str) -> Any:
    def check(value: object) -> str:
        if value not in choices:
            raise _problem(f"expected one of {', '.join(choices)}, got {_describe(value)}")
        return str(value)
    return _value(check, Literal[choices])


def _size(value: object) -> int:
    try:
        size = parse_size(value)
    except ValueError:
        raise _problem(f"expected a size such as 200GiB, 500MB or 1024 (bytes), got {_describe(value)}") from None
    if size <= 0:
        raise _problem("must be greater than 0")
    return size


def _duration(strict: bool) -> Any:
    def check(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise _problem(
                f"expected a duration such as 5m, 30s, 1h30m or a number of seconds, got {_describe(value)}"
            ) from None
        if seconds < 0 or (strict and seconds == 0):
            raise _problem(f"must be {'greater than' if strict else 'at least'} 0 seconds")
        return seconds
    return _value(check, float | Annotated[str, Field(pattern=r"^(\d+(\.\d+)?(ms|[dhms])?)+$")])


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _problem(f"expected a whole number of at least 1, got {_describe(value)}")
    return value


def _file_path(value: object, info: ValidationInfo) -> str:
    """Relative to the config file's directory (the loader's ``base_dir``)."""
    base = (info.context or {}).get("base_dir", "")
    return os.path.normpath(os.path.join(base, _text(value)))


class EndpointProblem(ValueError):
    """A Twisted server endpoint string that cannot be built; the message says why, for a user."""


def server_endpoint(reactor: object, description: str) -> IStreamServerEndpoint:
    """The server endpoint ``description`` names, built without listening.

    For ``ssl:`` this loads the key and certificate, so a missing or unreadable file is found here,
    by ``check-config`` as at startup, not by a traceback; :class:`EndpointProblem` says what is
    wrong. Relative paths are the process's: twistd's.
    """
    from OpenSSL import SSL, crypto  # Twisted's own TLS dependency (twisted[tls])
    from twisted.internet import endpoints

    try:
        endpoint: IStreamServerEndpoint = endpoints.serverFromString(reactor, description)
    except OSError as error:
        raise EndpointProblem(f"cannot read {error.filename}: {error.strerror}") from None
    except (SSL.Error, crypto.Error) as error:
        raise EndpointProblem(f"cannot load its TLS key and certificate: {error}") from None
    except (ValueError, TypeError) as error:
        # Twisted names its private parser in these messages (``_parseTCP() got ...``).
        reason = re.sub(r"^_parse\w*\(\) ", "", str(error))
        raise EndpointProblem(
            f"not a Twisted endpoint string ({reason}); examples: tcp:5000:interface=127.0.0.1, "
            "ssl:5443:privateKey=key.pem:certKey=cert.pem, unix:/run/metahub.sock"
        ) from None
    return endpoint


def endpoint_problem(description: str) -> str | None:
    """What is wrong with a Twisted server endpoint string, or None if it parses (no reactor is
    used until ``listen``)."""
    try:
        server_endpoint(None, description)
    except EndpointProblem as problem:
        return str(problem)
    return None


def _endpoint(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _problem(f"expected a Twisted endpoint string such as tcp:5000, got {_describe(value)}")
    problem = endpoint_problem(value.strip())
    if problem is not None:
        raise _problem(problem)
    return value.strip()


def _url(value: object) -> str:
    """``http(s)://host[:port]``: a path would be silently dropped by the /v2/ client, so refuse it."""
    text = _text(value)
    if "@" in text:
        raise _problem("credentials in the URL are not accepted; use username and password_file")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _problem(f"not a valid URL: {text!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise _problem(f"expected an http:// or https:// URL such as https://ghcr.io, got {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _problem(f"expected scheme://host[:port] with no path or query, got {text!r}")
    return f"{scheme}://{parts.netloc}"


def _secret_file(value: object, info: ValidationInfo) -> str:
    """Read a secret at load time, so a missing file stops startup rather than the first pull."""
    file_path = _file_path(value, info)
    try:
        with open(file_path, encoding="utf-8") as f:
            secret = f.read().rstrip("\r\n")
    except OSError as e:
        raise _problem(f"cannot read {file_path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise _problem(f"{file_path} is not UTF-8 text") from None
    if not secret:
        raise _problem(f"{file_path} is empty")
    return secret


def _ca_file(value: object, info: ValidationInfo) -> tuple[str, tuple[bytes, ...]]:
    """Read a PEM CA bundle at load time: a typo must stop startup, not fail every pull with a TLS error."""
    file_path = _file_path(value, info)
    try:
        with open(file_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _problem(f"cannot read {file_path}: {e.strerror or e}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        # cryptography's message is about its parser; what to fix is the file's content.
        raise _problem(
            f"{file_path} is not a PEM bundle of certificates (-----BEGIN CERTIFICATE----- blocks)"
        ) from None
    return file_path, tuple(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


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


def _password_hash(value: object) -> str:
    # The value is secret: never echo it back.
    if not isinstance(value, str):
        raise _problem("expected the string `metahub hash-password` prints")
    problem = password_hash_problem(value)
    if problem is not None:
        raise _problem(f"not a hash from `metahub hash-password`: {problem}")
    return value


_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _node_id(value: object) -> str:
    text = _text(value)
    if not _NODE_ID.fullmatch(text):
        raise _problem(f"expected up to 64 letters, digits, '.', '_' or '-' (a host name, say), got {_describe(text)}")
    return text


def _image_reference(digests: bool) -> Any:
    def check(value: object) -> str:
        text = _text(value)
        try:
            _, reference = split_reference(text)
        except ValueError as error:
            raise _problem(str(error)) from None
        if reference.startswith("sha256:") and not digests:
            raise _problem("a virtual image is named by NAME[:TAG], not a digest")
        return text
    return _value(check, str)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Loopback: by default only this host reads /metrics on the registry's port.
LOCAL_NETWORKS: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _networks(value: object) -> tuple[Network, ...]:
    """Addresses or CIDR blocks (``10.0.0.0/8``, ``::1``); an empty list allows nobody."""
    if not isinstance(value, (list, tuple)):
        raise _problem(f"expected a list of addresses or CIDR blocks, got {_describe(value)}")
    networks: list[Network] = []
    for i, item in enumerate(value):
        try:
            networks.append(item if isinstance(item, Network) else ipaddress.ip_network(_text(item)))
        except PydanticCustomError as error:  # not a string: a ValueError too, but already worded
            raise _problem(error.message(), i) from None
        except ValueError as error:
            raise _problem(f"expected an address or a CIDR block such as 10.0.0.0/8: {error}", i) from None
    return tuple(networks)


Text = Annotated[str, _value(_text, str)]
Strings = Annotated[tuple[Text, ...], AfterValidator(_distinct)]
Size = Annotated[int, _value(_size, int | Annotated[str, Field(pattern=r"^\d+(\.\d+)?\s*(([kKmMgGtTpP][iI]?)?[bB])?$")])]
Duration = Annotated[float, _duration(strict=True)]  # greater than 0
Interval = Annotated[float, _duration(strict=False)]  # 0 allowed
Count = Annotated[int, _value(_count, Annotated[int, Field(ge=1)])]
Endpoint = Annotated[str, _value(_endpoint, str)]
FilePath = Annotated[str, _value(_file_path, str)]
# Strict: YAML's unquoted yes/no are booleans already, and no string or float passes for these.
Boolean = Annotated[bool, Field(strict=True)]
Integer = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


# --- names -------------------------------------------------------------------------------------

# Logins are ACCOUNT-TYPE split at the first "-", and HTTP Basic splits at ":", so neither may appear.
_LOGIN_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]*")


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


def _named(rule: Callable[[str], str | None]) -> BeforeValidator:
    """A mapping of user-chosen names to entries: each name checked before its entry."""
    def check(value: object) -> object:
        if value is not None and not isinstance(value, dict):
            raise _problem(f"expected a mapping, got {_describe(value)}")
        for name in value or {}:
            if not isinstance(name, str):
                raise _problem(f"keys must be strings, got {_describe(name)}", str(name))
            if problem := rule(name):
                raise _problem(problem, name)
        return value
    return BeforeValidator(check)


# --- the sections ------------------------------------------------------------------------------

# _Keys words an unknown key first; extra="forbid" is what makes the schema say additionalProperties: false.
_FILE = pydantic.ConfigDict(extra="forbid")


class _Keys:
    """What every section checks before pydantic looks at its values.

    Unknown keys get a did-you-mean (pydantic's ``extra="forbid"`` only says "unexpected"), keys people
    will try (an inline ``password``) are refused with advice, and a key set to nothing (``key:`` or
    ``~``) counts as absent, so commenting out every entry under ``accounts:`` leaves a valid file.
    """

    _refuse: ClassVar[dict[str, str]] = {}

    @pydantic.model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if isinstance(data, ArgsKwargs):  # built in code, not read from a file
            return data
        if not isinstance(data, dict):
            raise _problem(f"expected a mapping, got {_describe(data)}")
        known = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        out = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise _problem(f"keys must be strings, got {_describe(key)}", str(key))
            if key in cls._refuse:
                raise _problem(cls._refuse[key], key)
            if key not in known:
                close = difflib.get_close_matches(key, [*known, *cls._refuse], n=1, cutoff=0.5)
                raise _problem("unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""), key)
            if value is not None:
                out[key] = value
            elif known[key].default is dataclasses.MISSING and known[key].default_factory is dataclasses.MISSING:
                raise _problem("required, but has no value", key)
        return out


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class StorageConfig(_Keys):
    path: FilePath  # the blob store; may be shared between nodes
    index: FilePath  # this node's LMDB environment: local disk
    max_size: Size | None = None  # bytes
    lease_timeout: Duration = 30.0  # a download lease silent this long belongs to a dead node
    gc_interval: Duration = 600.0  # how often a node tries to collect (one node at a time)
    gc_grace: Interval = 3600.0  # blobs read this recently are never evicted
    io_threads: Count | None = None  # threads for store I/O, as many for reads; None: runtime.pools.default_io_threads()
    write_threads: Count | None = None  # threads hashing and writing downloads; None: runtime.lane.default_workers()

    @pydantic.model_validator(mode="after")
    def _apart(self) -> StorageConfig:
        store, index = os.path.realpath(self.path), os.path.realpath(self.index)
        if os.path.commonpath([store, index]) == store:
            raise _problem("must not be storage.path or inside it: the LMDB index is per node and belongs on "
                           "local disk, the store may be shared", "index")
        return self


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class HttpConfig(_Keys):
    """Limits on the HTTP connections clients make (the ``http:`` section)."""

    header_timeout: Duration = 30.0  # seconds for a request line and headers, however they trickle in
    max_connections_per_address: Count = 4096  # open connections from one client address


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class LoginLimits(_Keys):
    """Failed logins per client address and per account (a token bucket each), and the KDF's pool."""

    failures_per_minute: Annotated[Number, Field(ge=0.01)] = 10.0
    burst: Annotated[Integer, Field(ge=1)] = 10
    kdf_threads: Annotated[Integer, Field(ge=1)] = 2
    kdf_queue: Annotated[Integer, Field(ge=0)] = 16  # KDF runs that may wait; beyond, 503 at once
    tracked: Annotated[Integer, Field(ge=1)] = 10_000  # addresses and unknown usernames remembered


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class MetricsConfig(_Keys):
    # Clients that may read /metrics on the registry's port.
    allow: Annotated[tuple[Network, ...], _value(_networks, list[str]),
                     pydantic.PlainSerializer(lambda networks: [str(n) for n in networks])] = LOCAL_NETWORKS
    listen: Endpoint | None = None  # an endpoint of its own that serves only /metrics


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class CacheSection(_Keys):
    tag_ttl: Interval = 300.0  # seconds a tag's digest is trusted before revalidation


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class UpstreamEntry(_Keys):
    """One ``upstreams.NAME`` mapping as written; :class:`UpstreamConfig` is what the server uses."""

    _refuse = {"password": "inline passwords are not accepted; put it in a file and use password_file"}

    url: Annotated[str, _value(_url, str)]
    username: Text | None = None
    # Holds the file's content once read, never the path: hence no repr.
    password_file: Annotated[str | None, _value(_secret_file, str)] = field(default=None, repr=False)
    connect_timeout: Duration = 10.0
    read_timeout: Duration = 60.0
    ca_file: Annotated[tuple[str, tuple[bytes, ...]] | None, _value(_ca_file, str)] = field(default=None, repr=False)

    @pydantic.model_validator(mode="after")
    def _credentials(self) -> UpstreamEntry:
        if (self.username is None) != (self.password_file is None):
            missing, other = ("password_file", "username") if self.username else ("username", "password_file")
            raise _problem(f"required with {other}: they go together", missing)
        return self


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class Platform(_Keys):
    os: Text
    architecture: Text
    variant: Text | None = None


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class MachineTypeEntry(_Keys):
    """One ``machine_types.NAME`` mapping; :mod:`metahub.hardware.machine` makes the machine type."""

    platform: Platform
    features: Strings = ()
    match: Annotated[str, _choice("compatible", "subset", "exact")] = "compatible"

    @pydantic.model_validator(mode="after")
    def _hardware(self) -> MachineTypeEntry:
        if self.match == "compatible":
            # Only this rule gives cpu: and nvcap: a meaning; under subset and exact they are labels.
            for i, feature in enumerate(self.features):
                if problem := features.machine_feature_problem(feature):
                    raise _problem(problem, "features", i)
            if self.platform.architecture == "amd64" and features.amd64_level(self.platform.variant) is None:
                raise _problem(f"an amd64 variant is a level, one of {', '.join(features.AMD64_LEVELS)}",
                               "platform", "variant")
        return self


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class AccountEntry(_Keys):
    _refuse = {
        "password": "plain passwords are not accepted; put the output of `metahub hash-password` in password_hash",
    }

    password_hash: Annotated[str, _value(_password_hash, Annotated[str, Field(pattern=r"^scrypt\$")])] = field(repr=False)
    machine_types: Strings = ()
    repositories: Strings | None = None  # None: every repository


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class VirtualPlatform(Platform):
    features: Strings = ()
    osfeatures: Strings = ()


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class VirtualEntry(_Keys):
    """One build of a virtual image: a source image and the platform it is listed under."""

    image: Annotated[str, _image_reference(digests=True)]  # routed like a client's name
    platform: VirtualPlatform


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class VirtualImage(_Keys):
    """A manifest list nobody pushed: manifest-tool's ``image:``/``manifests:`` spec."""

    image: Annotated[str, _image_reference(digests=False)]  # NAME[:TAG] clients pull (tag defaults to latest)
    manifests: Annotated[tuple[VirtualEntry, ...], Field(min_length=1)]


# --- what the server uses ----------------------------------------------------------------------


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
class Account:
    name: str
    password_hash: str = field(repr=False)
    machine_types: tuple[str, ...] = ()
    repositories: tuple[str, ...] | None = None  # None: every repository


@dataclass(frozen=True)
class Config:
    storage: StorageConfig
    upstreams: dict[str, UpstreamConfig]
    default_upstream: str
    listen: str = "tcp:5000"
    http: HttpConfig = HttpConfig()
    tag_ttl: float = 300.0  # seconds
    anonymous: str = "deny"  # or "allow"
    machine_types: dict[str, MachineTypeEntry] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    virtual_images: tuple[VirtualImage, ...] = ()
    pin: tuple[str, ...] = ()  # image references whose blobs eviction never removes
    access_log: bool = True  # one log line per request (twisted.web's combined log format)
    node_id: str | None = None  # this node's name in the shared store; None: the host name
    logins: LoginLimits = LoginLimits()
    metrics: MetricsConfig = MetricsConfig()
    source: str | None = None  # the file it was loaded from, for logs and `check-config`


@pydantic.dataclasses.dataclass(frozen=True, config=_FILE)
class ConfigFile(_Keys):
    """The whole file: what :func:`config_schema` describes and :func:`parse_config` reads into a Config."""

    storage: StorageConfig
    upstreams: Annotated[dict[str, UpstreamEntry], _named(_upstream_name)]
    default_upstream: Text | None = None  # may be left out when there is one upstream
    listen: Endpoint = Config.listen
    http: HttpConfig = HttpConfig()
    cache: CacheSection = CacheSection()
    anonymous: Annotated[str, _choice("allow", "deny")] = Config.anonymous
    machine_types: Annotated[dict[str, MachineTypeEntry], _named(_login_part("machine type"))] = field(
        default_factory=dict)
    accounts: Annotated[dict[str, AccountEntry], _named(_login_part("account"))] = field(default_factory=dict)
    virtual_images: Annotated[tuple[VirtualImage, ...], Field(min_length=1)] = ()
    pin: Annotated[tuple[Annotated[str, _image_reference(digests=True)], ...], Field(min_length=1)] = ()
    access_log: Boolean = Config.access_log
    node_id: Annotated[str | None, _value(_node_id, str)] = None
    logins: LoginLimits = LoginLimits()
    metrics: MetricsConfig = MetricsConfig()

    @pydantic.model_validator(mode="after")
    def _references(self) -> ConfigFile:
        if not self.upstreams:
            raise _problem("at least one upstream is required", "upstreams")
        if self.default_upstream is None and len(self.upstreams) != 1:
            raise _problem(f"required when there is more than one upstream ({_names(self.upstreams)})",
                           "default_upstream")
        if self.default_upstream is not None and self.default_upstream not in self.upstreams:
            raise _problem(f"{self.default_upstream!r} is not an upstream (defined: {_names(self.upstreams)})",
                           "default_upstream")
        for name, account in self.accounts.items():
            for i, type_name in enumerate(account.machine_types):
                if type_name not in self.machine_types:
                    raise _problem(f"unknown machine type {type_name!r} (defined: {_names(self.machine_types)})",
                                   "accounts", name, "machine_types", i)
        return self


_READER = pydantic.TypeAdapter(ConfigFile)


def config_schema() -> dict[str, Any]:
    """The JSON Schema of the file, for editors (``metahub config-schema``)."""
    schema = _READER.json_schema()
    for section in [schema, *schema["$defs"].values()]:
        for key, value in section["properties"].items():
            # An optional key set to nothing counts as absent (see _Keys), so the schema allows null.
            if key in section.get("required", ()) or {"type": "null"} in value.get("anyOf", ()):
                continue
            if "anyOf" in value:
                value["anyOf"].append({"type": "null"})
            else:
                kept = {k: value.pop(k) for k in ("title", "default") if k in value}
                section["properties"][key] = {"anyOf": [value, {"type": "null"}], **kept}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema,
            "title": "metahub configuration", "description": "metahub.yaml; see docs/configuration.md"}


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
_REQUIRED = "storage, upstreams"


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
        raise ConfigError(f"{path}: the file is empty; required keys: {_REQUIRED}")
    config = parse_config(data, os.path.dirname(os.path.abspath(path)))
    return replace(config, source=os.path.abspath(path))


def parse_config(data: object, base_dir: str) -> Config:
    """Check already-parsed YAML (``data``) and build a :class:`Config`.

    ``base_dir`` anchors relative paths (store, index, password files), so a config and its
    secrets can move together and a test can point at ``tmp_path``.
    """
    if data is None:
        raise ConfigError(f"(top level): the configuration is empty; required keys: {_REQUIRED}")
    try:
        file = _READER.validate_python(data, context={"base_dir": os.path.abspath(base_dir)})
    except pydantic.ValidationError as error:
        raise ConfigError(_line(error)) from None
    return Config(
        storage=file.storage,
        upstreams={
            name: UpstreamConfig(
                name=name, url=u.url, username=u.username, password=u.password_file,
                connect_timeout=u.connect_timeout, read_timeout=u.read_timeout,
                ca_file=u.ca_file[0] if u.ca_file else None, ca_certificates=u.ca_file[1] if u.ca_file else (),
            )
            for name, u in file.upstreams.items()
        },
        default_upstream=file.default_upstream or next(iter(file.upstreams)),
        listen=file.listen,
        http=file.http,
        tag_ttl=file.cache.tag_ttl,
        anonymous=file.anonymous,
        machine_types=file.machine_types,
        accounts={name: Account(name, a.password_hash, a.machine_types, a.repositories)
                  for name, a in file.accounts.items()},
        virtual_images=file.virtual_images,
        pin=file.pin,
        access_log=file.access_log,
        node_id=file.node_id,
        logins=file.logins,
        metrics=file.metrics,
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
