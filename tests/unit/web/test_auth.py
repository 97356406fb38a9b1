"""Accounts, logins, tokens and repository patterns (no HTTP)."""
from __future__ import annotations

import base64
import json
import os
import threading

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.python.failure import Failure

from metahub.oci import errors
from metahub.web import login
from metahub.web.auth import (
    ANONYMOUS,
    Authenticator,
    Identity,
    LoginRefused,
    check_password,
    hash_password,
    load_token_key,
    repository_pattern,
)
from tests.unit.fakes import (
    AUTH_HASH,
    CountedKDF,
    ManualClock,
    auth_config,
    inline,
    login_request,
)

WRONG_PASSWORD = b'{"errors": [{"code": "UNAUTHORIZED", "message": "incorrect username or password"}]}'


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
def auth(clock: ManualClock) -> Authenticator:
    return Authenticator(auth_config(), b"k" * 32, clock)


def test_password_hashes_are_salted_scrypt() -> None:
    assert AUTH_HASH.startswith("scrypt$16384$8$1$")
    assert hash_password("pw") != AUTH_HASH  # fresh salt each time
    assert check_password("pw", AUTH_HASH)
    assert not check_password("pW", AUTH_HASH)
    assert not check_password("pw", "scrypt$garbage")
    assert "pw" not in AUTH_HASH.split("$")


def test_logins(auth: Authenticator) -> None:
    assert auth.login("qnib-type1", "pw") == Identity("qnib", "type1")
    assert auth.login("qnib", "pw") == Identity("qnib", None)
    assert auth.machine_type(Identity("qnib", "type2")).features == ("cpu:skylake",)
    for username, password, why in [
        ("qnib-type1", "nope", "wrong password"),
        ("ghost-type1", "pw", "wrong password"),  # checked against a dummy hash: same time
        ("ghost", "", "unknown account"),  # the dummy hash is of ""
        ("qnib-type9", "pw", "unknown machine type"),
        ("ci-type2", "pw", "not among the account's"),
    ]:
        with pytest.raises(LoginRefused) as err:
            auth.login(username, password)
        # The right password with a wrong machine type reads exactly like a wrong password: no
        # answer may confirm a guessed password. The reason is only for the server's log.
        assert (err.value.status, err.value.code, err.value.body()) == (401, "UNAUTHORIZED", WRONG_PASSWORD)
        assert why in err.value.reason


def test_tokens_round_trip_expire_and_resist_tampering(auth: Authenticator, clock: ManualClock) -> None:
    token, lifetime = auth.issue(Identity("qnib", "type1"))
    assert auth.verify(token) == Identity("qnib", "type1")
    payload, signature = token.split(".")
    forged = auth.issue(Identity("qnib", "type2"))[0].split(".")[0] + "." + signature
    for bad in [forged, token + "x", "garbage", "a.b.c"]:
        with pytest.raises(errors.RegistryError):
            auth.verify(bad)
    other = Authenticator(auth_config(), b"j" * 32, clock)
    with pytest.raises(errors.RegistryError):
        other.verify(token)  # another key
    clock.now += lifetime
    with pytest.raises(errors.RegistryError) as err:
        auth.verify(token)
    assert "expired" in err.value.message


def test_tokens_must_be_canonical_base64url(auth: Authenticator) -> None:
    token, _ = auth.issue(Identity("qnib", "type1"))
    payload, signature = token.split(".")
    # 32 signature bytes are 43 characters: the last carries 2 unused bits, which a lenient decoder
    # ignores. Flipping them, padding, or a stray character keeps the bytes but not the encoding.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    same_bytes = signature[:-1] + alphabet[last ^ 1]
    assert base64.urlsafe_b64decode(same_bytes + "=") == base64.urlsafe_b64decode(signature + "=")
    for variant in [f"{payload}.{same_bytes}", f"{payload}.{signature}=", f"{payload}!.{signature}",
                    f"{payload}.{signature[:10]}\n{signature[10:]}", f"{payload}.{signature}é"]:
        with pytest.raises(errors.RegistryError) as err:
            auth.verify(variant)
        assert (err.value.status, err.value.message) == (401, "malformed bearer token")
    assert auth.verify(token) == Identity("qnib", "type1")


def test_anonymous_tokens_only_when_allowed(clock: ManualClock) -> None:
    allowing = Authenticator(auth_config("allow"), b"k" * 32, clock)
    token, _ = allowing.issue(ANONYMOUS)
    assert allowing.verify(token) == ANONYMOUS
    denying = Authenticator(auth_config("deny"), b"k" * 32, clock)
    with pytest.raises(errors.RegistryError):
        denying.verify(token)


def test_basic_cache_is_bounded_in_time(auth: Authenticator, clock: ManualClock) -> None:
    assert auth.cached("qnib-type1", "pw") is None
    auth.remember("qnib-type1", "pw", Identity("qnib", "type1"))
    assert auth.cached("qnib-type1", "pw") == Identity("qnib", "type1")
    assert auth.cached("qnib-type1", "other") is None
    clock.now += 301
    assert auth.cached("qnib-type1", "pw") is None


def test_repository_patterns(auth: Authenticator) -> None:
    assert repository_pattern("library/*").fullmatch("library/alpine")
    assert not repository_pattern("library/*").fullmatch("library/a/b")
    assert repository_pattern("myorg/**").fullmatch("myorg/a/b/c")
    assert repository_pattern("a.b/c?").fullmatch("a.b/cd") and not repository_pattern("a.b/c?").fullmatch("axb/cd")
    auth.check_repository(Identity("ci", None), ["hub/library/alpine", "library/alpine", "alpine"])
    auth.check_repository(Identity("qnib", None), ["anything/at/all"])  # no patterns: everything
    with pytest.raises(errors.RegistryError) as err:
        auth.check_repository(Identity("ci", None), ["hub/otherorg/app", "otherorg/app"])
    assert (err.value.status, err.value.code) == (403, "DENIED")


def test_token_key_is_made_once_and_kept(tmp_path) -> None:
    key = load_token_key(str(tmp_path))
    assert len(key) == 32 and load_token_key(str(tmp_path)) == key
    assert oct(os.stat(tmp_path / "token.key").st_mode & 0o777) == "0o600"


def test_a_node_starting_with_the_keys_creator_waits_for_the_key(tmp_path) -> None:
    path = tmp_path / "token.key"
    path.write_bytes(b"")  # another node has just created it and not yet written it
    key = os.urandom(32)
    writer = threading.Timer(0.3, path.write_bytes, args=(key,))
    writer.start()
    assert load_token_key(str(tmp_path)) == key
    writer.join()


def test_a_key_file_that_stays_short_is_an_error(tmp_path) -> None:
    (tmp_path / "token.key").write_bytes(b"short")
    with pytest.raises(RuntimeError, match="shorter than 32 bytes"):
        load_token_key(str(tmp_path), wait=0.2)


def test_token_requests_reuse_a_recent_login(auth: Authenticator) -> None:
    kdf = CountedKDF()
    for method in (b"GET", b"GET", b"POST"):  # docker and podman send Basic; containerd a password grant
        request = login_request("qnib-type1", "pw", method)
        answer = json.loads(ensureDeferred(login.token(request, auth, kdf)).result)
        assert auth.verify(answer["token"]) == Identity("qnib", "type1")
    assert kdf.runs == ["qnib-type1"]  # one scrypt run for a pull's several token requests


def token_answer(auth: Authenticator, username: str, password: str, method: bytes = b"GET") -> tuple[int, bytes]:
    """``/token`` with a Basic login (GET) or a password grant (POST): (status, body)."""
    request = login_request(username, password, method)
    done = ensureDeferred(login.token(request, auth, inline))
    if isinstance(done.result, Failure):
        error = done.result.trap(errors.RegistryError) and done.result.value
        done.addErrback(lambda _: None)
        return error.status, error.body()
    return 200, done.result


def test_a_wrong_machine_type_is_answered_as_a_wrong_password(auth: Authenticator) -> None:
    for method in (b"GET", b"POST"):
        wrong_password = token_answer(auth, "qnib-type1", "guess", method)
        assert wrong_password == (401, WRONG_PASSWORD)
        assert token_answer(auth, "qnib-type9", "pw", method) == wrong_password  # unknown type
        assert token_answer(auth, "ci-type2", "pw", method) == wrong_password  # not the account's type
        assert token_answer(auth, "qnib-type1", "pw", method)[0] == 200


def test_a_refused_login_is_remembered_without_another_kdf_run(auth: Authenticator) -> None:
    kdf = CountedKDF()
    for _ in range(3):  # a node with a stale password retrying
        done = ensureDeferred(login.token(login_request("qnib-type1", "wrong"), auth, kdf))
        assert done.result.value.body() == WRONG_PASSWORD
        done.addErrback(lambda _: None)
    assert kdf.runs == ["qnib-type1"]
    assert len(auth.limiter.addresses) == 1 and auth.limiter.addresses.wait("local") == 0


def test_a_verified_token_is_remembered_until_it_expires_and_the_table_is_bounded(monkeypatch) -> None:
    clock = ManualClock(1000.0)
    auth = Authenticator(auth_config("allow"), b"k" * 32, clock)
    token, lifetime = auth.issue(ANONYMOUS)
    checks: list[str] = []
    original = auth._verify
    monkeypatch.setattr(auth, "_verify", lambda t: checks.append(t) or original(t))
    assert auth.verify(token) == auth.verify(token) == ANONYMOUS
    assert len(checks) == 1  # the second request cost a lookup
    clock.now += lifetime
    with pytest.raises(errors.RegistryError, match="expired"):
        auth.verify(token)
    for second in range(5000):  # tokens we signed, all valid: still the table stays bounded
        clock.now += 1
        auth.verify(auth.issue(Identity("qnib", "type1"))[0])
    assert len(auth._verified) <= 4096
