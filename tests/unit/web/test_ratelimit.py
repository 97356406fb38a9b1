"""Failed-login limits (token buckets on a fake clock), the KDF's bounded pool, and /metrics access."""
from __future__ import annotations

import ipaddress
import json
import os
import threading
from dataclasses import replace

import pytest
from twisted.internet import address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from metahub.config.file import LOCAL_NETWORKS, LoginLimits, parse_config
from metahub.oci import errors
from metahub.runtime.threads import KDF_NICE, BoundedPool
from metahub.web import login
from metahub.web.addresses import limit_key, require_allowed
from metahub.web.auth import Authenticator, Identity
from metahub.web.ratelimit import Buckets, FailureLimiter
from tests.unit.fakes import (
    CountedKDF,
    FakeRequest,
    auth_config,
    config_error,
    inline,
    login_request,
    minimal,
)


def limited(limiter: FailureLimiter, address: str, account: str) -> str | None:
    """The Retry-After of a 429 from ``admit``, or None when it admitted (and took a token)."""
    try:
        limiter.admit(address, account)
    except errors.RegistryError as error:
        assert (error.status, error.code) == (429, "TOOMANYREQUESTS")
        return error.headers["Retry-After"]
    return None


def test_a_bucket_allows_a_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    limiter = FailureLimiter(failures_per_minute=6, burst=3, clock=clock.seconds)  # one every 10 s
    assert [limited(limiter, "10.0.0.1", "qnib") for _ in range(3)] == [None] * 3
    assert limited(limiter, "10.0.0.1", "qnib") == "10"
    clock.advance(4)
    assert limited(limiter, "10.0.0.1", "qnib") == "6"  # whole seconds, rounded up
    clock.advance(6)
    assert limited(limiter, "10.0.0.1", "qnib") is None
    assert limited(limiter, "10.0.0.1", "qnib") == "10"
    clock.advance(3600)  # refills to the burst, never beyond
    assert [limited(limiter, "10.0.0.1", "qnib") for _ in range(4)] == [None, None, None, "10"]


def test_address_and_account_are_limited_each() -> None:
    clock = Clock()
    limiter = FailureLimiter(failures_per_minute=1, burst=2, clock=clock.seconds)
    for _ in range(2):
        limiter.admit("10.0.0.1", "qnib")
    assert limited(limiter, "10.0.0.2", "qnib") == "60"  # the account, from any address
    assert limited(limiter, "10.0.0.1", "other") == "60"  # the address, for any account
    assert limited(limiter, "10.0.0.2", "other") is None
    # A refused check took nothing: 10.0.0.2 and "other" each spent only the one admitted try.
    assert limited(limiter, "10.0.0.2", "other") is None
    assert limited(limiter, "10.0.0.2", "other") == "60"


def test_a_successful_login_gives_its_tokens_back() -> None:
    limiter = FailureLimiter(failures_per_minute=1, burst=1, clock=Clock().seconds)
    for _ in range(5):
        limiter.admit("10.0.0.1", "qnib")
        limiter.give_back("10.0.0.1", "qnib")
    assert limited(limiter, "10.0.0.1", "qnib") is None
    assert limited(limiter, "10.0.0.1", "qnib") == "60"


def test_the_tables_stay_bounded_whatever_is_sent() -> None:
    clock = Clock()
    buckets = Buckets(rate=1 / 60, burst=1, clock=clock.seconds, capacity=100, keep=["qnib"])
    buckets.take("qnib")
    buckets.take("victim")
    for i in range(10_000):  # random usernames or addresses, each failing once
        buckets.take(f"guess{i}")
        assert len(buckets) <= 101
    assert buckets.wait("qnib") > 0  # an account of the config is never pushed out
    assert buckets.wait("guess9999") > 0  # the recent ones are still limited
    assert buckets.wait("victim") == 0  # the least recently used was forgotten


def test_a_long_username_is_kept_as_a_digest() -> None:
    buckets = Buckets(rate=1 / 60, burst=1, clock=Clock().seconds, capacity=100)
    long_name = "x" * 65536  # what fits in a password-grant form
    buckets.take(long_name)
    assert buckets.wait(long_name) > 0 and buckets.wait("x" * 65535) == 0
    assert max(len(key) for key in buckets._recent) == 64


def test_the_least_recently_used_key_goes_first() -> None:
    clock = Clock()
    buckets = Buckets(rate=1 / 60, burst=2, clock=clock.seconds, capacity=3)
    for key in "abca":  # "a" used again: now the most recent
        buckets.take(key)
    buckets.take("d")  # pushes out "b", not "a"
    assert list(buckets._recent) == ["c", "a", "d"]


def test_refused_attempts_add_nothing_to_the_tables() -> None:
    limiter = FailureLimiter(failures_per_minute=1, burst=1, clock=Clock().seconds, capacity=100)
    limiter.admit("192.0.2.7", "guess0")
    for i in range(1, 1000):  # one address, out of tokens, trying new usernames
        assert limited(limiter, "192.0.2.7", f"guess{i}") == "60"
    assert (len(limiter.addresses), len(limiter.accounts)) == (1, 1)


def from_client(client: address.IPv4Address | address.IPv6Address | address.UNIXAddress) -> FakeRequest:
    return FakeRequest(uri=b"/token", client=client)


def token_request(username: str, password: str, client: str, method: bytes = b"GET") -> FakeRequest:
    return login_request(username, password, method, address.IPv4Address("TCP", client, 40000))


def outcome(done: Deferred) -> errors.RegistryError | bytes:
    result = done.result
    if isinstance(result, Failure):
        done.addErrback(lambda _: None)
        return result.trap(errors.RegistryError) and result.value
    return result


@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_over_the_limit_token_answers_429_before_any_kdf_run(method: bytes) -> None:
    clock = Clock()
    config = replace(auth_config(), logins=LoginLimits(failures_per_minute=2, burst=3))
    auth = Authenticator(config, b"k" * 32, clock.seconds)
    kdf = CountedKDF()

    answers = [outcome(ensureDeferred(login.token(token_request("qnib-type1", f"guess{i}", "192.0.2.7", method), auth, kdf)))
               for i in range(6)]
    assert [a.status for a in answers] == [401, 401, 401, 429, 429, 429]
    assert len(kdf.runs) == 3
    assert answers[3].headers["Retry-After"] == "30"
    assert json.loads(answers[3].body())["errors"][0]["code"] == "TOOMANYREQUESTS"
    # The right password is refused too while the account is over its limit (no KDF run decides).
    assert outcome(ensureDeferred(login.token(token_request("qnib-type1", "pw", "192.0.2.8", method), auth, kdf))).status == 429
    clock.advance(30)
    assert json.loads(outcome(ensureDeferred(login.token(token_request("qnib-type1", "pw", "192.0.2.8", method), auth, kdf))))["token"]
    assert len(kdf.runs) == 4


def test_basic_on_any_route_is_limited_too() -> None:
    clock = Clock()
    config = replace(auth_config(), logins=LoginLimits(failures_per_minute=1, burst=1))
    auth = Authenticator(config, b"k" * 32, clock.seconds)
    kdf = inline
    first = outcome(ensureDeferred(login.identify(token_request("ghost", "x", "192.0.2.7"), auth, kdf)))
    second = outcome(ensureDeferred(login.identify(token_request("ghost", "y", "192.0.2.7"), auth, kdf)))
    assert (first.status, second.status, second.headers["Retry-After"]) == (401, 429, "60")
    assert second.headers["WWW-Authenticate"].startswith("Bearer ")
    # A login checked recently needs no KDF run, so no limit stands in its way.
    auth.remember("qnib", "pw", Identity("qnib", None))
    assert outcome(ensureDeferred(login.identify(token_request("qnib", "pw", "192.0.2.7"), auth, kdf))) == Identity("qnib")


def test_the_kdf_pool_refuses_work_beyond_its_queue_at_once() -> None:
    class Reactor:  # all deferToThreadPool needs; results arrive in the pool's thread, fine here
        def callFromThread(self, function, *args):
            function(*args)

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    pool = BoundedPool(reactor=Reactor(), threads=1, queue=2, name="test-kdf")
    queued = [pool(nice) for _ in range(3)]  # not started yet: nothing runs
    refused = pool(nice)
    assert isinstance(refused.result, Failure) and refused.result.value.status == 503
    assert refused.result.value.headers["Retry-After"] == "1"
    refused.addErrback(lambda _: None)
    assert pool.pending == 3 and not any(d.called for d in queued)
    pool.start()
    pool.stop()  # runs what was queued, then joins its thread
    # Each ran, at the KDF's low priority (other work on the machine gets the CPU first).
    assert [d.result for d in queued] == [max(KDF_NICE, nice())] * 3 and pool.pending == 0


def test_a_busy_kdf_pool_costs_no_tokens() -> None:
    config = replace(auth_config(), logins=LoginLimits(failures_per_minute=1, burst=1))
    auth = Authenticator(config, b"k" * 32, Clock().seconds)
    busy = lambda function, *args: Deferred.fromCoroutine(_raise(errors.RegistryError(503, "UNAVAILABLE", "busy")))  # noqa: E731
    assert outcome(ensureDeferred(login.token(token_request("qnib", "pw", "192.0.2.7"), auth, busy))).status == 503
    assert limited(auth.limiter, "192.0.2.7", "qnib") is None


async def _raise(error: Exception) -> None:
    raise error


def test_client_keys() -> None:
    def key(host: str, kind: type = address.IPv4Address) -> str:
        return limit_key(from_client(kind("TCP", host, 1)))

    assert key("192.0.2.7") == "192.0.2.7"
    assert key("::ffff:192.0.2.7", address.IPv6Address) == "192.0.2.7"  # a dual-stack listener
    # One host usually holds a whole /64: it is one client, not 2**64 of them.
    assert key("2001:db8:1:2:aaaa::1", address.IPv6Address) == key("2001:db8:1:2:bbbb::9", address.IPv6Address)
    assert key("2001:db8:1:3::1", address.IPv6Address) != key("2001:db8:1:2::1", address.IPv6Address)
    assert limit_key(from_client(address.UNIXAddress(b"/run/metahub.sock"))) == "local"


def test_metrics_allow_list() -> None:
    def check(host: str, networks, kind: type = address.IPv4Address) -> int:
        try:
            require_allowed(from_client(kind("TCP", host, 1)), networks, "/metrics")
        except errors.RegistryError as error:
            assert json.loads(error.body())["errors"][0]["code"] == "DENIED"
            return error.status
        return 200

    assert check("127.0.0.1", LOCAL_NETWORKS) == check("::1", LOCAL_NETWORKS, address.IPv6Address) == 200
    assert check("::ffff:127.0.0.1", LOCAL_NETWORKS, address.IPv6Address) == 200
    assert check("192.0.2.7", LOCAL_NETWORKS) == check("2001:db8::1", LOCAL_NETWORKS, address.IPv6Address) == 403
    monitoring = (ipaddress.ip_network("10.1.0.0/16"),)
    assert (check("10.1.2.3", monitoring), check("10.2.0.1", monitoring), check("127.0.0.1", ())) == (200, 403, 403)
    require_allowed(from_client(address.UNIXAddress(b"/run/m.sock")), (), "/metrics")  # local by nature


def test_the_logins_and_metrics_sections(tmp_path) -> None:
    defaults = parse_config(minimal(tmp_path), str(tmp_path))
    assert defaults.logins == LoginLimits(failures_per_minute=10, burst=10, kdf_threads=2, kdf_queue=16, tracked=10_000)
    assert (defaults.metrics.allow, defaults.metrics.listen) == (LOCAL_NETWORKS, None)
    config = parse_config({
        **minimal(tmp_path),
        "logins": {"failures_per_minute": 2.5, "burst": 3, "kdf_threads": 1, "kdf_queue": 0, "tracked": 50},
        "metrics": {"allow": ["10.1.0.0/16", "::1"], "listen": "tcp:9100:interface=10.1.0.5"},
    }, str(tmp_path))
    assert config.logins == LoginLimits(2.5, 3, 1, 0, 50)
    assert Authenticator(config, b"k" * 32, Clock().seconds).limiter.addresses.capacity == 50
    assert config.metrics.allow == (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("::1/128"))
    assert config.metrics.listen == "tcp:9100:interface=10.1.0.5"
    assert parse_config({**minimal(tmp_path), "metrics": {"allow": []}}, str(tmp_path)).metrics.allow == ()
    for section, bad, message in [
        ("logins", {"burst": 0}, "logins.burst: must be at least 1"),
        ("logins", {"burst": 2.5}, "logins.burst: expected an integer, got 2.5"),
        ("logins", {"kdf_threads": True}, "logins.kdf_threads: expected an integer, got the boolean true"),
        ("logins", {"kdf_queue": -1}, "logins.kdf_queue: must be at least 0"),
        ("logins", {"tracked": 0}, "logins.tracked: must be at least 1"),
        ("logins", {"failures_per_minute": 0}, "logins.failures_per_minute: must be at least 0.01"),
        ("logins", {"failures_per_minute": ".inf"}, "logins.failures_per_minute: expected a number, got '.inf'"),
        ("logins", {"failure_per_minute": 1}, "logins.failure_per_minute: unknown key (did you mean 'failures_per_minute'?)"),
        ("metrics", {"allow": "10.0.0.0/8"}, "metrics.allow: expected a list of addresses or CIDR blocks, got '10.0.0.0/8'"),
        ("metrics", {"allow": ["10.0.0.1/8"]}, "metrics.allow[0]: expected an address or a CIDR block such as 10.0.0.0/8: 10.0.0.1/8 has host bits set"),
        ("metrics", {"allow": ["everyone"]}, "metrics.allow[0]: expected an address or a CIDR block"),
        ("metrics", {"listen": "9100"}, "metrics.listen: not a Twisted endpoint string (Unknown endpoint type: '9100')"),
    ]:
        assert message in config_error({**minimal(tmp_path), section: bad}, tmp_path)
