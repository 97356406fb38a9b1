"""Logins over HTTP: the ``/v2/`` challenge, the ``/token`` endpoint, and the Authorization header.

The challenge is always the registry token flow (``Bearer realm=".../token",service="metahub"``):
docker, podman, skopeo and containerd all follow it, with credentials when they hold a login and
without when they don't, so one flow serves named logins and anonymous pulls alike. When accounts
exist every request without credentials is challenged, even under ``anonymous: allow``.
"""
from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs

from twisted.logger import Logger
from twisted.web.server import Request

from metahub.oci import errors
from metahub.runtime.threads import ThreadRunner
from metahub.web.addresses import limit_key
from metahub.web.auth import ANONYMOUS, SERVICE, Authenticator, Identity, LoginRefused
from metahub.web.headers import HOST, header_text

log = Logger()


def challenge(request: Request) -> str:
    scheme = "https" if request.isSecure() else "http"
    host = header_text(request, b"host")
    if not host or not HOST.fullmatch(host):  # the realm is quoted: only a real host name goes in
        host = "localhost"
    return f'Bearer realm="{scheme}://{host}/token",service="{SERVICE}"'


def _basic_credentials(value: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError, as is non-ASCII input
        raise errors.unauthorized("malformed Basic credentials") from None
    username, sep, password = decoded.partition(":")
    if not sep or not username:
        raise errors.unauthorized("malformed Basic credentials")
    return username, password


async def identify(request: Request, auth: Authenticator, kdf: ThreadRunner) -> Identity:
    """Who sent ``request``; a 401 with the challenge when it must log in (or logged in wrongly).
    ``kdf`` runs the password check (the KDF's own pool, :class:`metahub.runtime.threads.BoundedPool`)."""
    header = header_text(request, b"authorization")
    try:
        if header:
            if not header.isascii():  # credentials and tokens are ASCII by their grammar
                raise errors.unauthorized("malformed Authorization header")
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer":
                return auth.verify(value.strip())
            if scheme.lower() == "basic":
                return await _login(request, auth, kdf, *_basic_credentials(value))
            raise errors.unauthorized(f"unsupported authorization scheme {scheme[:20]!r}")
        if auth.enabled:
            # Clients send the login they hold only when challenged, and containerd never pings
            # /v2/ first: were any request answered without credentials, a machine-type login would
            # silently get the whole index. Anonymous clients answer the challenge with an
            # anonymous token from the realm, as on Docker Hub.
            raise errors.unauthorized("authentication required")
        return ANONYMOUS
    except errors.RegistryError as error:
        error.headers.setdefault("WWW-Authenticate", challenge(request))
        raise


async def _login(request: Request, auth: Authenticator, kdf: ThreadRunner, username: str, password: str) -> Identity:
    """Check a login, from the cache of recent ones when it is there (each pull's /token request
    and each Basic request would otherwise cost a scrypt run: tens of ms and 16 MiB). Otherwise the
    failure limits come first (429 without a KDF run), then the KDF in its own pool."""
    known = auth.cached(username, password)
    if known is not None:
        return known
    address, account = limit_key(request), username.partition("-")[0]
    auth.limiter.admit(address, account)
    try:
        identity = await kdf(auth.login, username, password)
    except LoginRefused as refused:
        auth.remember(username, password, None)
        log.info("login refused for {username!r} from {address}: {reason}",
                 username=username[:80], address=address, reason=refused.reason)
        raise
    except BaseException:
        auth.limiter.give_back(address, account)  # no password was checked (the pool was full)
        raise
    auth.limiter.give_back(address, account)
    auth.remember(username, password, identity)
    return identity


def _form(request: Request) -> dict[str, str]:
    body = request.content.read(65536) if request.content is not None else b""
    fields = parse_qs(body.decode("latin-1"), keep_blank_values=True)
    return {key: values[-1] for key, values in fields.items()}


async def token(request: Request, auth: Authenticator, kdf: ThreadRunner) -> bytes:
    """Serve ``/token``: GET with optional Basic (docker, podman, skopeo), or an OAuth2 password grant
    POST (containerd). Wrong credentials are a 401; none at all get an anonymous token if allowed."""
    identity: Identity | None = None
    if request.method == b"POST":
        form = _form(request)
        if form.get("grant_type") == "password":
            identity = await _login(request, auth, kdf, form.get("username", ""), form.get("password", ""))
        elif form.get("grant_type") not in (None, ""):
            raise errors.RegistryError(400, "UNSUPPORTED", "only the password grant is supported")
    elif request.method not in (b"GET", b"HEAD"):
        raise errors.unsupported(request.method.decode("latin-1")[:20])
    header = header_text(request, b"authorization")
    if identity is None and header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            raise errors.unauthorized("the token endpoint takes Basic credentials")
        identity = await _login(request, auth, kdf, *_basic_credentials(value))
    if identity is None:
        if not auth.anonymous_allowed:
            error = errors.unauthorized("authentication required")
            error.headers["WWW-Authenticate"] = f'Basic realm="{SERVICE}"'
            raise error
        identity = ANONYMOUS
    signed, lifetime = auth.issue(identity)
    return json.dumps({"token": signed, "access_token": signed, "expires_in": lifetime}).encode()
