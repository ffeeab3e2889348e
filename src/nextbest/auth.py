"""Who may call what: bearer tokens, their hashes, client certificates and the role each method
needs (SPEC §4, §6).

    token = new_token()                          # given to the client once
    token_sha256(token)                          # what goes into [[serve.clients]]
    certificate_sha256(pem)                      # a client certificate's fingerprint, likewise
    gate = Gate(settings.serve.clients)
    gate.check("/nextbest.v1.Consent/SetConsent", "Bearer " + token)  # → Verdict
    gate.check("/nextbest.v1.Consent/SetConsent", None, peer_pem)     # mutual TLS, no token

No grpc here: `server.py` reads the peer's certificate from the call and turns a verdict into
UNAUTHENTICATED or PERMISSION_DENIED. Tokens are random 256-bit strings, so a plain SHA-256
stored in the config is enough (no slow password hash is needed to stop guessing); the
comparison is constant-time. A certificate is public, so its fingerprint is looked up in a dict:
what proves the caller holds it is the TLS handshake, which grpc checked against
`serve.tls_client_ca` before the call got here.

Which identity counts: a call that sends an `authorization` header is judged by its token alone,
exactly as without certificates (a wrong token is UNAUTHENTICATED even on a mapped certificate,
and roles of a token and a certificate never add up); a call without one is judged by its
certificate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import ssl

from nextbest.config import ClientToken

__all__ = [
    "Gate",
    "Verdict",
    "new_token",
    "token_sha256",
    "certificate_sha256",
    "role_for",
    "OPEN_SERVICES",
]

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


def certificate_sha256(pem: bytes | str) -> str:
    """The hex SHA-256 of a PEM certificate's DER bytes (its first certificate), as written in
    `[[serve.clients]] certificate_sha256` (openssl's `-fingerprint -sha256` without colons)."""
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise ValueError("not a PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(text[start : end + len("-----END CERTIFICATE-----")])
    return hashlib.sha256(der).hexdigest()


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
    """The client's name when its token or certificate was valid ("" otherwise)."""
    problem: str = ""
    message: str = ""


class Gate:
    """Checks an `authorization` header, or the client certificate of a call without one,
    against the configured clients; no clients = open."""

    def __init__(self, clients: tuple[ClientToken, ...]):
        self.clients = clients
        self.by_certificate = {c.certificate_sha256: c for c in clients if c.certificate_sha256}
        """Clients by their certificate's fingerprint (empty: certificates are not read)."""

    @property
    def enabled(self) -> bool:
        return bool(self.clients)

    def check(
        self, method: str, authorization: str | None, certificate: bytes | None = None
    ) -> Verdict:
        return self.check_role(role_for(method), authorization, certificate)

    def check_role(
        self, role: str | None, authorization: str | None, certificate: bytes | None = None
    ) -> Verdict:
        """`check` for a role (the dashboard needs `admin`); None = open to all. `certificate`:
        the PEM certificate the caller presented (mutual TLS), None without one."""
        if role is None or not self.enabled:
            return Verdict(True)
        if authorization is not None and authorization.strip():
            client, problem = self._by_token(authorization)
        else:
            client, problem = self._by_certificate(certificate)
        if client is None:
            return Verdict(False, problem="unauthenticated", message=problem)
        if role not in client.roles:
            return Verdict(
                False,
                client=client.name,
                problem="forbidden",
                message=f"client {client.name!r} lacks the {role!r} role this method needs",
            )
        return Verdict(True, client=client.name)

    def _by_token(self, authorization: str) -> tuple[ClientToken | None, str]:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, NO_TOKEN
        digest = token_sha256(token.strip())
        client = None
        for c in self.clients:  # every entry compared, in constant time
            if c.token_sha256 and hmac.compare_digest(c.token_sha256, digest):
                client = c
        return client, "authorization: unknown token"

    def _by_certificate(self, certificate: bytes | None) -> tuple[ClientToken | None, str]:
        if certificate is None or not self.by_certificate:
            return None, NO_TOKEN
        fingerprint = certificate_sha256(certificate)
        client = self.by_certificate.get(fingerprint)
        return client, (
            f"{NO_TOKEN}: the client certificate (sha256 {fingerprint}) is not listed in "
            "[[serve.clients]] certificate_sha256"
        )


NO_TOKEN = "authorization: a bearer token is required (metadata `authorization: Bearer <token>`)"
