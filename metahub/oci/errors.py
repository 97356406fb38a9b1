"""OCI distribution-spec errors, as one exception type every layer raises.

The HTTP layer turns a ``RegistryError`` into the spec's JSON body
``{"errors": [{"code", "message", "detail"}]}`` with its status code and headers, so code that finds
a problem (name grammar, upstream answer, auth) says *what* went wrong and never formats a response.
"""
from __future__ import annotations

import json
from typing import Any


class RegistryError(Exception):
    """An error a registry client should see, with the spec's code and an HTTP status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


def name_invalid(name: str, why: str = "invalid repository name") -> RegistryError:
    return RegistryError(400, "NAME_INVALID", why, {"name": name})


def name_unknown(name: str) -> RegistryError:
    return RegistryError(404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name})


def manifest_unknown(reference: str, message: str = "manifest unknown", detail: Any = None) -> RegistryError:
    return RegistryError(404, "MANIFEST_UNKNOWN", message, detail if detail is not None else {"reference": reference})


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest})


def digest_invalid(digest: str, why: str = "invalid digest") -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", why, {"digest": digest})


def unsupported(method: str) -> RegistryError:
    return RegistryError(
        405, "UNSUPPORTED", f"{method} is not supported: metahub is a read-only pull-through cache"
    )


def unauthorized(message: str = "authentication required", challenge: str | None = None) -> RegistryError:
    headers = {"WWW-Authenticate": challenge} if challenge else None
    return RegistryError(401, "UNAUTHORIZED", message, headers=headers)


def denied(message: str = "requested access to the resource is denied") -> RegistryError:
    return RegistryError(403, "DENIED", message)


def too_many_requests(retry_after: str | None) -> RegistryError:
    headers = {"Retry-After": retry_after} if retry_after else None
    return RegistryError(429, "TOOMANYREQUESTS", "upstream registry rate limit reached", headers=headers)


def range_invalid(range_header: str, size: int | None = None) -> RegistryError:
    headers = {"Content-Range": f"bytes */{size}"} if size is not None else None
    return RegistryError(416, "RANGE_INVALID", "requested range not satisfiable", {"range": range_header}, headers)


def bad_gateway(message: str) -> RegistryError:
    return RegistryError(502, "UNAVAILABLE", message)


def gateway_timeout(message: str) -> RegistryError:
    return RegistryError(504, "UNAVAILABLE", message)
