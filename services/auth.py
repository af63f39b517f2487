"""Bearer-key auth: constant-time comparison, an admin scope, and the refusal to serve openly off loopback.

Keys come from the config only and are never logged or echoed. With no key configured every request is
allowed, which is why `check_bind` refuses a non-loopback host in that case unless `insecure` is set.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from enum import Enum

from services.settings import ServiceConfig


class Scope(Enum):
    """What a request may do."""

    USER = "user"
    ADMIN = "admin"


class AuthError(Exception):
    """A request without a usable key (401) or without the needed scope (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _matches(token: str, keys: Iterable[str]) -> bool:
    # compare against every key so the time taken does not tell which one (if any) was close
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer …` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorize(cfg: ServiceConfig, authorization: str | None, scope: Scope) -> None:
    """Raise `AuthError` unless the header grants `scope` (everything is allowed when no key is set)."""
    if not cfg.auth_enabled:
        return
    token = bearer_token(authorization)
    if token is None:
        raise AuthError(401, "missing bearer token: send 'Authorization: Bearer <key>'")
    is_admin = _matches(token, cfg.admin_keys)
    if not (is_admin or _matches(token, cfg.api_keys)):
        raise AuthError(401, "invalid API key")
    if scope is Scope.ADMIN and not is_admin:
        raise AuthError(403, "this endpoint needs an admin key")


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on the local machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(cfg: ServiceConfig) -> None:
    """Refuse to serve a non-loopback host without any key unless `insecure` was asked for."""
    if not cfg.auth_enabled and not cfg.insecure and not is_loopback(cfg.host):
        raise ValueError(
            f"refusing to bind {cfg.host} without API keys: set MINDGAP_API_KEYS (and MINDGAP_ADMIN_KEYS),"
            " bind 127.0.0.1, or pass --insecure"
        )
