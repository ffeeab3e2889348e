"""Who may call what: bearer tokens, their hashes and the role each method needs (SPEC §4, §6).

    token = new_token()                          # given to the client once
    token_sha256(token)                          # what goes into [[serve.clients]]
    gate = Gate(settings.serve.clients)
    gate.check("/nextbest.v1.Consent/SetConsent", "Bearer " + token)  # → Verdict

No grpc here: `server.py` turns a verdict into UNAUTHENTICATED or PERMISSION_DENIED. Tokens are
random 256-bit strings, so a plain SHA-256 stored in the config is enough (no slow password hash
is needed to stop guessing); the comparison is constant-time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets

from nextbest.config import ClientToken

__all__ = ["Gate", "Verdict", "new_token", "token_sha256", "role_for", "OPEN_SERVICES"]

TOKEN_PREFIX = "nb_"
SERVICE_ROLES = {
    "nextbest.v1.Recommender": "recommend",
    "nextbest.v1.Events": "recommend",
    "nextbest.v1.Lifecycle": "recommend",
    "nextbest.v1.Consent": "consent",
    "nextbest.v1.Admin": "admin",
}
"""The role a client needs for each of our services (Events feeds the answers, so it goes with
`recommend`: the back end that asks for recommendations also reports purchases and views)."""
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
"""Open to anyone who can reach the port (load balancers and grpcurl need them)."""


def new_token() -> str:
    """A new random bearer token (43 URL-safe characters after the `nb_` prefix)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    """The hex SHA-256 of a token, as written in `[[serve.clients]] token_sha256`."""
    return hashlib.sha256(token.encode()).hexdigest()


def role_for(method: str) -> str | None:
    """The role `method` ("/package.Service/Method") needs; None when it is open. A method of
    an unknown service needs `admin` (it does not exist; the caller gets UNIMPLEMENTED only
    once authenticated, so the port does not tell strangers what it serves)."""
    service = method.lstrip("/").partition("/")[0]
    if service in OPEN_SERVICES:
        return None
    return SERVICE_ROLES.get(service, "admin")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of a check: `allowed`, else `problem` is `unauthenticated` or `forbidden`."""

    allowed: bool
    client: str = ""
    """The client's name when its token was valid ("" otherwise)."""
    problem: str = ""
    message: str = ""


class Gate:
    """Checks an `authorization` header against the configured clients; no clients = open."""

    def __init__(self, clients: tuple[ClientToken, ...]):
        self.clients = clients

    @property
    def enabled(self) -> bool:
        return bool(self.clients)

    def check(self, method: str, authorization: str | None) -> Verdict:
        return self.check_role(role_for(method), authorization)

    def check_role(self, role: str | None, authorization: str | None) -> Verdict:
        """`check` for a role (the dashboard needs `admin`); None = open to all."""
        if role is None or not self.enabled:
            return Verdict(True)
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Verdict(
                False,
                problem="unauthenticated",
                message="authorization: a bearer token is required (metadata "
                "`authorization: Bearer <token>`)",
            )
        digest = token_sha256(token.strip())
        client = None
        for c in self.clients:  # every entry compared, in constant time
            if hmac.compare_digest(c.token_sha256, digest):
                client = c
        if client is None:
            return Verdict(False, problem="unauthenticated", message="authorization: unknown token")
        if role not in client.roles:
            return Verdict(
                False,
                client=client.name,
                problem="forbidden",
                message=f"client {client.name!r} lacks the {role!r} role this method needs",
            )
        return Verdict(True, client=client.name)
