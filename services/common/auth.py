"""Bearer tokens: each maps to an owner (tenant) and a role.

Configured by ENCINFER_TOKENS ("token=owner:role,token2=owner2:role2") or
ENCINFER_TOKENS_FILE (JSON: {"token": {"owner": "...", "role": "..."}}).
Roles: "tenant" (its own keys only) and "service" (the inference service: may
read any key). With neither variable set, auth is off and every caller is the
owner "public" with role "tenant" -- fine on loopback, logged loudly at start.
"""
from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

from encinfer.common.errors import ConfigError, PermissionDenied, Unauthenticated

ROLES = ("tenant", "service")


@dataclass(frozen=True)
class Principal:
    owner: str
    role: str

    @property
    def is_service(self) -> bool:
        return self.role == "service"

    def require_service(self) -> None:
        if not self.is_service:
            raise PermissionDenied("this call needs the service role")


ANONYMOUS = Principal(owner="public", role="tenant")

# The caller of the RPC being handled: set once per call by the server interceptor
# (encinfer.common.rpc) before any handler runs, so a new RPC cannot forget to authenticate.
_PRINCIPAL: ContextVar[Principal] = ContextVar("encinfer_principal")


def current_principal() -> Principal:
    """The authenticated caller of the current RPC (handlers only)."""
    try:
        return _PRINCIPAL.get()
    except LookupError:
        raise RuntimeError("no authenticated caller: is this running outside an RPC handler?") from None


def set_principal(principal: Principal) -> None:
    _PRINCIPAL.set(principal)


class TokenTable:
    def __init__(self, tokens: dict[str, Principal] | None) -> None:
        # None means auth is off; an empty dict means nobody gets in.
        self._tokens = tokens

    @property
    def enabled(self) -> bool:
        return self._tokens is not None

    @classmethod
    def from_env(cls) -> TokenTable:
        path = os.environ.get("ENCINFER_TOKENS_FILE", "")
        spec = os.environ.get("ENCINFER_TOKENS", "")
        if path:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            return cls({t: _principal(v["owner"], v.get("role", "tenant")) for t, v in raw.items()})
        if spec:
            return cls(parse_spec(spec))
        return cls(None)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        if self._tokens is None:
            return ANONYMOUS
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        for known, principal in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return principal
        raise Unauthenticated("unknown bearer token")


def parse_spec(spec: str) -> dict[str, Principal]:
    tokens: dict[str, Principal] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        token, sep, who = item.partition("=")
        owner, _, role = who.partition(":")
        if not sep or not token or not owner:
            raise ConfigError("ENCINFER_TOKENS entries look like token=owner:role")
        tokens[token] = _principal(owner, role or "tenant")
    return tokens


def _principal(owner: str, role: str) -> Principal:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r} for owner {owner!r}; roles are {', '.join(ROLES)}")
    return Principal(owner=owner, role=role)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata a client sends; empty when it has no token."""
    return (("authorization", f"Bearer {token}"),) if token else ()
