"""Who is asking: accounts, machine-type logins, and the bearer tokens that make checks cheap.

A login is ``ACCOUNT-TYPE`` (that account, resolving for machine type TYPE) or ``ACCOUNT`` (no
machine type: index pass-through). Passwords are stored as scrypt hashes; one scrypt run costs tens
of milliseconds on purpose, so it is paid once per login, not per request:

* ``/token`` (the registry token flow every runtime speaks; containerd POSTs an OAuth2 password
  grant first) checks the password once and issues a short-lived token: a payload naming account and
  machine type, signed with HMAC-SHA256. Checking it per request is one HMAC.
* A client that sends Basic on every request (curl, scripts) is checked through a small bounded
  cache keyed by a hash of the credentials, so repeated requests skip the KDF too. Refusals are
  cached the same way: a node retrying a wrong password costs one KDF run, not one per retry.
* Failed logins are limited per client address and per account (:mod:`metahub.web.ratelimit`), checked
  before the KDF runs; every refusal, whatever its reason, reads exactly like a wrong password.

Tokens and logs never contain a password or a hash. The signing key lives in the store directory
(created once, atomically), so every node sharing the store, and a restarted node, accepts them.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from metahub.config.file import Account, Config
from metahub.hardware.machine import MachineType, machine_types
from metahub.oci import errors
from metahub.web.ratelimit import FailureLimiter
from storage import create_exclusive

TOKEN_TTL = 300  # seconds; clients fetch a new one when it lapses
SERVICE = "metahub"
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _SCRYPT_LEN = 2**14, 8, 1, 32
_BASIC_CACHE_SIZE = 1024
_BASIC_CACHE_TTL = 300.0
_VERIFIED_CACHE_SIZE = 4096


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The ``password_hash`` for a config: ``scrypt$N$r$p$salt$hash`` (base64 fields)."""
    salt = salt if salt is not None else os.urandom(16)
    derived = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=_SCRYPT_LEN)
    encode = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${encode(salt)}${encode(derived)}"


def check_password(password: str, password_hash: str) -> bool:
    try:
        _, n, r, p, salt, expected = password_hash.split("$")
        salt_bytes, expected_bytes = base64.b64decode(salt), base64.b64decode(expected)
        derived = hashlib.scrypt(
            password.encode(), salt=salt_bytes, n=int(n), r=int(r), p=int(p),
            dklen=len(expected_bytes), maxmem=256 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(derived, expected_bytes)


@functools.cache
def _dummy_hash() -> str:
    return hash_password("", b"\0" * 16)


@dataclass(frozen=True)
class Identity:
    """The requester: an account (None: anonymous) and the machine type it resolves for."""

    account: str | None = None
    machine_type: str | None = None

    @property
    def anonymous(self) -> bool:
        return self.account is None


ANONYMOUS = Identity()


def repository_pattern(pattern: str) -> re.Pattern[str]:
    """``*`` matches within one path segment, ``**`` across segments, ``?`` one character."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    translated = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(translated.get(part, re.escape(part)) for part in parts))


def load_token_key(directory: str, wait: float = 5.0) -> bytes:
    """The HMAC key shared by every node using this store: created once with exclusive create.

    A node starting at the same moment as the one that created the file may find it still empty:
    it reads again for up to ``wait`` seconds before calling the file broken.
    """
    path = os.path.join(directory, "token.key")
    fd = create_exclusive(path, 0o600)
    if fd is None:  # made already, by us earlier or by another node
        deadline = time.monotonic() + wait
        while True:
            with open(path, "rb") as existing:
                key = existing.read()
            if len(key) >= 32:
                return key
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{path} is shorter than 32 bytes; remove it to make a new key")
            time.sleep(0.05)
    key = secrets.token_bytes(32)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """Strict: only the one encoding :func:`_b64` makes is accepted (the lenient decoder skips
    stray characters and ignores the unused bits of the last one)."""
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


class LoginRefused(errors.RegistryError):
    """A refused login: to the client always the 401 of a wrong password, whatever ``reason`` (which
    is for the log), so that no answer confirms a password a guesser tried."""

    def __init__(self, reason: str) -> None:
        super().__init__(401, "UNAUTHORIZED", "incorrect username or password")
        self.reason = reason


class Authenticator:
    """Checks logins and tokens against the config's accounts and machine types."""

    def __init__(self, config: Config, key: bytes, clock: Callable[[], float]) -> None:
        self.config = config
        self.key = key
        self.clock = clock
        self.machine_types = machine_types(config.machine_types)
        self._patterns = {
            name: [repository_pattern(p) for p in account.repositories]
            for name, account in config.accounts.items()
            if account.repositories is not None
        }
        # A verified login's identity, or None for a refused one, with its expiry.
        self._basic_cache: OrderedDict[bytes, tuple[Identity | None, float]] = OrderedDict()
        self._verified: dict[str, tuple[Identity, float]] = {}
        logins = config.logins
        self.limiter = FailureLimiter(
            logins.failures_per_minute, logins.burst, clock, accounts=config.accounts, capacity=logins.tracked
        )

    @property
    def enabled(self) -> bool:
        """Whether clients must be challenged (accounts exist, or anonymous pulls are denied)."""
        return bool(self.config.accounts) or self.config.anonymous != "allow"

    @property
    def anonymous_allowed(self) -> bool:
        return self.config.anonymous == "allow"

    def machine_type(self, identity: Identity) -> MachineType | None:
        return self.machine_types.get(identity.machine_type) if identity.machine_type else None

    # -- logins ------------------------------------------------------------------------------

    def login(self, username: str, password: str) -> Identity:
        """Check ``ACCOUNT[-TYPE]`` and its password (one KDF run); :class:`LoginRefused` on any mismatch."""
        account_name, _, type_name = username.partition("-")
        account: Account | None = self.config.accounts.get(account_name)
        # Run the KDF even for an unknown account so timing does not reveal which accounts exist.
        password_hash = account.password_hash if account else _dummy_hash()
        if not check_password(password, password_hash):
            raise LoginRefused("wrong password")
        if account is None:
            raise LoginRefused("unknown account")
        if type_name and type_name not in self.config.machine_types:
            raise LoginRefused(f"unknown machine type {type_name[:40]!r}")
        if type_name and type_name not in account.machine_types:
            raise LoginRefused(f"machine type {type_name!r} is not among the account's")
        return Identity(account_name, type_name or None)

    def cached(self, username: str, password: str) -> Identity | None:
        """A recently checked login, so per-request Basic costs no KDF run: its identity, None when
        it is not known, and :class:`LoginRefused` again when it was refused."""
        entry = self._basic_cache.get(self._cache_key(username, password))
        if entry is None or entry[1] <= self.clock():
            return None
        if entry[0] is None:
            raise LoginRefused("refused before (cached)")
        return entry[0]

    def remember(self, username: str, password: str, identity: Identity | None) -> None:
        """Cache a login's outcome (None: refused)."""
        self._basic_cache[self._cache_key(username, password)] = (identity, self.clock() + _BASIC_CACHE_TTL)
        if len(self._basic_cache) > _BASIC_CACHE_SIZE:
            self._basic_cache.popitem(last=False)

    @staticmethod
    def _cache_key(username: str, password: str) -> bytes:
        return hashlib.sha256(f"{username}\0{password}".encode()).digest()

    # -- tokens ------------------------------------------------------------------------------

    def issue(self, identity: Identity) -> tuple[str, int]:
        """A signed token for ``identity`` and its lifetime in seconds."""
        payload = json.dumps(
            {"sub": identity.account, "mt": identity.machine_type, "exp": int(self.clock()) + TOKEN_TTL},
            separators=(",", ":"),
        ).encode()
        signature = hmac.new(self.key, payload, hashlib.sha256).digest()
        return f"{_b64(payload)}.{_b64(signature)}", TOKEN_TTL

    def verify(self, token: str) -> Identity:
        """The identity a token carries; 401 if it is malformed, forged, expired or not allowed.

        Once accounts exist, every client (anonymous ones too) presents a token on every request:
        tokens that verified are remembered until they expire, so a request costs a dict lookup,
        not the 12 us of decoding, HMAC and JSON. Only tokens we signed get in, and the table is
        bounded, so what an attacker sends cannot grow it.
        """
        known = self._verified.get(token)
        if known is not None and known[1] > self.clock():
            return known[0]
        identity, expires = self._verify(token)
        self._verified[token] = (identity, expires)
        if len(self._verified) > _VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]  # the oldest
        return identity

    def _verify(self, token: str) -> tuple[Identity, float]:
        try:
            payload_text, signature_text = token.split(".")
            payload, signature = _unb64(payload_text), _unb64(signature_text)
        except ValueError:
            raise errors.unauthorized("malformed bearer token") from None
        if not hmac.compare_digest(hmac.new(self.key, payload, hashlib.sha256).digest(), signature):
            raise errors.unauthorized("invalid bearer token")
        claims = json.loads(payload)
        if claims.get("exp", 0) <= self.clock():
            raise errors.unauthorized("bearer token expired")
        account, machine_type = claims.get("sub"), claims.get("mt")
        if account is not None and account not in self.config.accounts:
            raise errors.unauthorized("bearer token for an unknown account")
        if account is None and not self.anonymous_allowed:
            raise errors.unauthorized("anonymous pulls are not allowed")
        return Identity(account, machine_type), float(claims["exp"])

    # -- authorization -----------------------------------------------------------------------

    def check_repository(self, identity: Identity, names: Sequence[str]) -> None:
        """403 DENIED unless one of the account's ``repositories`` patterns covers one of ``names``,
        the spellings of one routed repository (:func:`metahub.cache.routing.spellings`)."""
        patterns = self._patterns.get(identity.account or "")
        if patterns is not None and not any(p.fullmatch(name) for p in patterns for name in names):
            raise errors.denied(f"account {identity.account!r} may not pull {names[0]!r}")
