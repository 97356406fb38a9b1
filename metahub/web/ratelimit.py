"""Limits on failed logins: a token bucket per client address and one per account.

A login that needs a KDF run first takes one token from its address's bucket and one from its
account's; a login that succeeds gives them back, so only failures cost. A bucket refills at
``failures_per_minute`` up to ``burst``. When either bucket is empty the login is answered 429
``TOOMANYREQUESTS`` with ``Retry-After`` at once, before the KDF runs: a guesser gets ``burst``
tries and then a few a minute, and a flood costs no KDF time. Taking the token before the KDF (not
after the failure) also bounds the runs of many concurrent requests, not only of successive ones.

Memory is bounded whatever an attacker sends: each table holds at most ``capacity`` keys (the
``logins.tracked`` setting; a long username is kept as its digest) and drops the least recently
used one beyond that. Forgetting a key forgets its failures, but pushing a key out takes
``capacity`` newer failing keys, and each of those spends a token of the attacker's own address (a
refused request adds no key). The accounts of the config are kept apart and never dropped, so
random usernames cannot push a real account's failures out.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from metahub.config.file import LoginLimits
from metahub.oci import errors

_LONGEST_KEY = 64


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class Buckets:
    """Token buckets by key: ``rate`` tokens a second, at most ``burst`` held."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float], capacity: int, keep: Collection[str] = ()
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.capacity = capacity
        self._kept: dict[str, _Bucket] = {}
        self._keep = frozenset(keep)
        self._recent: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept) + len(self._recent)

    def _find(self, key: str, add: bool) -> _Bucket | None:
        """``key``'s bucket refilled up to now; a missing one (a full bucket) is made only if ``add``,
        so merely checking a key, as a refused request does, never grows the table."""
        now = self.clock()
        table = self._kept if key in self._keep else self._recent
        if table is self._recent and len(key) > _LONGEST_KEY:  # a username may be 64 KiB: keep a digest
            key = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        bucket = table.get(key)
        if bucket is not None:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        elif add:
            bucket = table[key] = _Bucket(float(self.burst), now)
            if table is self._recent and len(table) > self.capacity:
                table.popitem(last=False)
        if bucket is not None and table is self._recent:
            table.move_to_end(key)
        return bucket

    def wait(self, key: str) -> float:
        """Seconds until ``key`` holds a token (0: it holds one now)."""
        bucket = self._find(key, add=False)
        return 0.0 if bucket is None or bucket.tokens >= 1 else (1 - bucket.tokens) / self.rate

    def take(self, key: str) -> None:
        bucket = self._find(key, add=True)
        assert bucket is not None
        bucket.tokens -= 1

    def give_back(self, key: str) -> None:
        bucket = self._find(key, add=False)
        if bucket is not None:  # else forgotten, which is as good as full
            bucket.tokens = min(float(self.burst), bucket.tokens + 1)


class FailureLimiter:
    """The address and account buckets of failed logins, checked together."""

    def __init__(
        self, failures_per_minute: float, burst: int, clock: Callable[[], float],
        accounts: Collection[str] = (), capacity: int = LoginLimits.tracked,
    ) -> None:
        rate = failures_per_minute / 60
        self.addresses = Buckets(rate, burst, clock, capacity)
        self.accounts = Buckets(rate, burst, clock, capacity, keep=accounts)

    def admit(self, address: str, account: str) -> None:
        """Take a token for one KDF run, or raise 429 (taking nothing) when either bucket is empty."""
        wait = self.addresses.wait(address) or self.accounts.wait(account)
        if wait > 0:
            raise errors.RegistryError(
                429, "TOOMANYREQUESTS", "too many failed logins; retry later",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        self.addresses.take(address)
        self.accounts.take(account)

    def give_back(self, address: str, account: str) -> None:
        """The login succeeded, or no KDF ran: it costs nothing."""
        self.addresses.give_back(address)
        self.accounts.give_back(account)
