"""TLS, mutual TLS, bearer tokens and roles, limits and the JSON call log, through real servers on
real ports with certificates made here (SPEC §4, §6; issue #5)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import readme_roles, served_settings, store_url
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nextbest.auth import Gate, Verdict, certificate_sha256, new_token, token_sha256
from nextbest.config import ClientToken
from nextbest.errors import ConfigError
from nextbest.server import create_server
from nextbest.v1 import admin_pb2, consent_pb2, events_pb2, lifecycle_pb2
from nextbest.v1 import recommender_pb2 as pb

# --- certificates ------------------------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, server: bool = False):
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Pki:
    """A CA, a server certificate for 127.0.0.1 / localhost, two client certificates from the CA
    (`client`, `web_shop`) and one from a stranger's CA, written as PEM files into `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert("nextbest test CA", ca_key, "nextbest test CA", ca_key, ca=True)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = _cert("127.0.0.1", server_key, "nextbest test CA", ca_key, ca=False, server=True)
        client_key = ec.generate_private_key(ec.SECP256R1())
        client = _cert("email platform", client_key, "nextbest test CA", ca_key, ca=False)
        web_shop_key = ec.generate_private_key(ec.SECP256R1())
        web_shop = _cert("web shop", web_shop_key, "nextbest test CA", ca_key, ca=False)
        other_ca_key = ec.generate_private_key(ec.SECP256R1())
        stranger_key = ec.generate_private_key(ec.SECP256R1())
        stranger = _cert("stranger", stranger_key, "other CA", other_ca_key, ca=False)
        self.ca = self._write("ca.pem", _pem(ca))
        self.server_cert = self._write("server.pem", _pem(server))
        self.server_key = self._write("server.key", _key_pem(server_key))
        self.client = (_key_pem(client_key), _pem(client))
        self.web_shop = (_key_pem(web_shop_key), _pem(web_shop))
        self.client_der = client.public_bytes(serialization.Encoding.DER)
        self.stranger = (_key_pem(stranger_key), _pem(stranger))

    def _write(self, name: str, data: bytes) -> Path:
        (self.folder / name).write_bytes(data)
        return self.folder / name

    def channel(self, port: int, client: tuple[bytes, bytes] | None = None) -> grpc.Channel:
        key, cert = client or (None, None)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(), private_key=key, certificate_chain=cert
        )
        return grpc.secure_channel(f"127.0.0.1:{port}", creds)


# --- servers -----------------------------------------------------------------------------------

TOKENS = {role: new_token() for role in ("recommend", "consent", "admin")}
TWO_ROLES = new_token()
"""The token of a client holding two roles, recommend and consent."""
CLIENTS = tuple(
    ClientToken(name=f"{role}-client", token_sha256=token_sha256(token), roles=(role,))
    for role, token in TOKENS.items()
) + (ClientToken(name="crm", token_sha256=token_sha256(TWO_ROLES), roles=("recommend", "consent")),)


@pytest.fixture(scope="module")
def folder(module_own) -> Path:
    return module_own


@pytest.fixture(scope="module")
def pki(folder) -> Pki:
    return Pki(folder)


def secure_settings(folder: Path, pki: Pki, **extra):
    return served_settings(folder, folder / "models").with_overrides(
        "serve",
        insecure=False,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        **{"clients": CLIENTS, "metrics_port": -1, **extra},
    )


@pytest.fixture(scope="module")
def tls_server(folder, pki):
    running = create_server(secure_settings(folder, pki))
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def tls_channel(tls_server, pki):
    with pki.channel(tls_server.port) as ch:
        yield ch


# --- every RPC, called generically -------------------------------------------------------------

RPCS = {
    "/nextbest.v1.Recommender/RecommendProducts": pb.RecommendProductsRequest(customer_id="c002"),
    "/nextbest.v1.Recommender/StreamRecommendations": pb.RecommendProductsRequest(
        customer_id="c002"
    ),
    "/nextbest.v1.Recommender/SimilarProducts": pb.SimilarProductsRequest(product_ids=["p001"]),
    "/nextbest.v1.Recommender/ScoreContent": pb.ScoreContentRequest(
        customer_id="c002", candidates=[pb.ContentCandidate(product_ids=["p001"])]
    ),
    "/nextbest.v1.Consent/SetConsent": consent_pb2.SetConsentRequest(
        customer_id="c900",
        purpose=consent_pb2.PURPOSE_BEHAVIORAL,
        granted=True,
        source="security-test",
    ),
    "/nextbest.v1.Recommender/ExplainRecommendation": pb.ExplainRecommendationRequest(
        customer_id="c002", product_id="p001"
    ),
    "/nextbest.v1.Consent/GetConsent": consent_pb2.GetConsentRequest(customer_id="c900"),
    "/nextbest.v1.Consent/ExportCustomerData": consent_pb2.ExportCustomerDataRequest(
        customer_id="c900", source="security-test"
    ),
    "/nextbest.v1.Consent/ForgetCustomer": consent_pb2.ForgetCustomerRequest(
        customer_id="c901", source="security-test"
    ),
    "/nextbest.v1.Events/RecordEvents": events_pb2.RecordEventsRequest(
        events=[events_pb2.Event(customer_id="c902", product_id="p001")]
    ),
    "/nextbest.v1.Admin/GetModelInfo": admin_pb2.GetModelInfoRequest(),
    "/nextbest.v1.Admin/ReloadModel": admin_pb2.ReloadModelRequest(),
    "/nextbest.v1.Lifecycle/GetCustomerState": lifecycle_pb2.GetCustomerStateRequest(
        customer_id="c002"
    ),
    "/nextbest.v1.Lifecycle/NextBestAction": lifecycle_pb2.NextBestActionRequest(
        customer_id="c002"
    ),
    "/nextbest.v1.Lifecycle/StreamAudience": lifecycle_pb2.StreamAudienceRequest(
        stage=lifecycle_pb2.STAGE_ACTIVE, max_customers=2
    ),
}


def test_every_rpc_is_in_the_matrix():
    from nextbest.server import SERVICE_NAMES
    from nextbest.v1 import admin_pb2 as a
    from nextbest.v1 import consent_pb2 as c
    from nextbest.v1 import events_pb2 as e

    methods = {
        f"/{service.full_name}/{m.name}"
        for module in (pb, a, c, e, lifecycle_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }
    assert methods == set(RPCS)
    assert {m.split("/")[1] for m in methods} == set(SERVICE_NAMES)


def call(channel: grpc.Channel, method: str, token: str | None) -> grpc.StatusCode:
    """Call `method` with its request from RPCS; the status code it ends with."""
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    request = RPCS[method]
    try:
        if method.endswith("StreamRecommendations"):
            stream = channel.stream_stream(
                method, request_serializer=lambda m: m.SerializeToString()
            )
            list(stream(iter([request]), metadata=metadata, timeout=10))
        elif method.endswith(("StreamAudience", "ExportCustomerData")):
            out = channel.unary_stream(method, request_serializer=lambda m: m.SerializeToString())
            list(out(request, metadata=metadata, timeout=30))
        else:
            unary = channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString())
            unary(request, metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", sorted(RPCS))
def test_auth_matrix(tls_channel, method):
    """No token, a wrong token, a token without the role: refused; the right role: answered.
    The role each method needs is the README's table, not the code's."""
    needed = readme_roles()[method.split("/")[1]]
    assert call(tls_channel, method, None) == grpc.StatusCode.UNAUTHENTICATED
    assert call(tls_channel, method, "nb_not-a-real-token") == grpc.StatusCode.UNAUTHENTICATED
    for role, token in TOKENS.items():
        if role != needed:
            assert call(tls_channel, method, token) == grpc.StatusCode.PERMISSION_DENIED, role
    answered = call(tls_channel, method, TOKENS[needed])
    if method.endswith("StreamAudience"):  # past the gate: the fixture model has no lifecycle
        assert answered in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION)
    else:
        assert answered == grpc.StatusCode.OK


@pytest.mark.parametrize("method", sorted(RPCS))
def test_a_token_of_two_roles_opens_the_methods_of_both(tls_channel, method):
    needed = readme_roles()[method.split("/")[1]]
    code = call(tls_channel, method, TWO_ROLES)
    if needed == "admin":
        assert code == grpc.StatusCode.PERMISSION_DENIED
    elif method.endswith("StreamAudience"):  # past the gate: the fixture model has no lifecycle
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION)
    else:
        assert code == grpc.StatusCode.OK


def test_refusals_name_the_problem(tls_channel):
    unary = tls_channel.unary_unary(
        "/nextbest.v1.Admin/GetModelInfo",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=admin_pb2.ModelInfo.FromString,
    )
    with pytest.raises(grpc.RpcError) as missing:
        unary(admin_pb2.GetModelInfoRequest(), timeout=10)
    assert "bearer token is required" in missing.value.details()
    with pytest.raises(grpc.RpcError) as wrong_role:
        unary(
            admin_pb2.GetModelInfoRequest(),
            metadata=(("authorization", f"Bearer {TOKENS['consent']}"),),
            timeout=10,
        )
    assert "'consent-client' lacks the 'admin' role" in wrong_role.value.details()
    answer = unary(
        admin_pb2.GetModelInfoRequest(),
        metadata=(("authorization", f"bearer  {TOKENS['admin']} "),),  # scheme is case-blind
        timeout=10,
    )
    assert answer.version


def test_health_and_reflection_stay_open(tls_channel):
    health = health_pb2_grpc.HealthStub(tls_channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    reflection = reflection_pb2_grpc.ServerReflectionStub(tls_channel)
    [answer] = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for s in answer.list_services_response.service}
    assert "nextbest.v1.Recommender" in names


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server):
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.port}") as ch:
        assert call(ch, "/nextbest.v1.Admin/GetModelInfo", TOKENS["admin"]) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_client_that_does_not_trust_the_server_certificate_is_refused(tls_server, tmp_path):
    stranger_ca = Pki(tmp_path)  # a different CA: the server's certificate is not from it
    with stranger_ca.channel(tls_server.port) as ch:
        assert call(ch, "/nextbest.v1.Admin/GetModelInfo", TOKENS["admin"]) == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_mutual_tls_needs_a_client_certificate_from_the_ca(folder, pki):
    running = create_server(secure_settings(folder, pki, tls_client_ca=str(pki.ca)))
    try:
        method, token = "/nextbest.v1.Admin/GetModelInfo", TOKENS["admin"]
        with pki.channel(running.port) as no_cert:
            assert call(no_cert, method, token) == grpc.StatusCode.UNAVAILABLE
        with pki.channel(running.port, pki.stranger) as stranger:
            assert call(stranger, method, token) == grpc.StatusCode.UNAVAILABLE
        with pki.channel(running.port, pki.client) as client:
            assert call(client, method, token) == grpc.StatusCode.OK
            assert call(client, method, None) == grpc.StatusCode.UNAUTHENTICATED  # and a token
    finally:
        running.stop(0)


def test_insecure_only_when_chosen(folder, pki):
    plain = served_settings(folder, folder / "models").with_overrides("serve", insecure=False)
    with pytest.raises(ConfigError, match="serve.tls_cert and serve.tls_key and"):
        create_server(plain)
    no_clients = secure_settings(folder, pki).with_overrides("serve", clients=())
    with pytest.raises(ConfigError, match=r"\[\[serve.clients\]\] required"):
        create_server(no_clients)
    both = secure_settings(folder, pki).with_overrides("serve", insecure=True)
    with pytest.raises(ConfigError, match="serve.insecure is set together with serve.tls_cert"):
        create_server(both)
    missing = secure_settings(folder, pki).with_overrides("serve", tls_key=str(folder / "nope"))
    with pytest.raises(ConfigError, match="serve.tls_key: cannot read .*nope"):
        create_server(missing)
    not_pem = secure_settings(folder, pki).with_overrides(
        "serve", tls_cert=str(folder / "nextbest.toml")
    )
    with pytest.raises(ConfigError, match="serve.tls_cert: .* is not a PEM file"):
        create_server(not_pem)


def test_serve_without_tls_or_insecure_is_a_one_line_error(folder):
    done = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "serve", "--port", "0", "--metrics-port", "-1"]
        + ["--models-dir", str(folder / "models"), "--store", store_url(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "serve.tls_cert and serve.tls_key and [[serve.clients]] required" in done.stderr
    assert "--insecure" in done.stderr
    assert "Traceback" not in done.stderr


def test_gate_checks_tokens_as_hashes():
    gate = Gate(CLIENTS)
    assert gate.check("/grpc.health.v1.Health/Check", None).allowed
    assert not gate.check("/nextbest.v1.Recommender/RecommendProducts", "Basic x").allowed
    verdict = gate.check("/nextbest.v1.Admin/GetModelInfo", f"Bearer {TOKENS['admin']}")
    assert verdict.allowed and verdict.client == "admin-client"
    unknown = "/nextbest.v2.Unknown/Method"  # unknown services are not open: admin only
    assert not gate.check(unknown, f"Bearer {TOKENS['recommend']}").allowed
    assert gate.check(unknown, f"Bearer {TOKENS['admin']}").allowed
    assert Gate(()).check("/nextbest.v1.Admin/ReloadModel", None).allowed  # no clients: open


def test_token_command_prints_a_config_entry_the_server_accepts(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "token", "--name", "crm", "--roles", "consent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    token = next(line for line in done.stdout.splitlines() if line.startswith("nb_"))
    entry = done.stdout[done.stdout.index("[[serve.clients]]") :]
    (tmp_path / "c.toml").write_text(entry)
    from nextbest.config import load_settings

    [client] = load_settings(tmp_path / "c.toml").serve.clients
    assert client.name == "crm" and client.roles == ("consent",)
    assert client.token_sha256 == token_sha256(token)
    assert token not in entry  # only the hash goes into the config
    bad = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "token", "--name", "x", "--roles", "root"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--roles: root" in bad.stderr


def test_config_refuses_a_plaintext_token(tmp_path):
    from nextbest.config import load_settings

    (tmp_path / "c.toml").write_text(
        '[[serve.clients]]\nname = "crm"\ntoken_sha256 = "nb_secret"\nroles = ["consent"]\n'
    )
    with pytest.raises(ConfigError, match=r"serve.clients\[0\].token_sha256 must be 64"):
        load_settings(tmp_path / "c.toml")


# --- limits ------------------------------------------------------------------------------------


def test_limits_answer_resource_exhausted(folder, pki):
    settings = served_settings(folder, folder / "models").with_overrides(
        "serve", max_message_bytes=4096, max_concurrent_streams=1, metrics_port=-1
    )
    running = create_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            big = pb.RecommendProductsRequest(
                customer_id="c002", exclude_product_ids=["p" * 100] * 60
            )
            unary = ch.unary_unary(
                "/nextbest.v1.Recommender/RecommendProducts",
                request_serializer=lambda m: m.SerializeToString(),
            )
            with pytest.raises(grpc.RpcError) as too_big:
                unary(big, timeout=10)
            assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            # One stream open (held by a request iterator that waits); a second one is refused.
            stream = ch.stream_stream(
                "/nextbest.v1.Recommender/StreamRecommendations",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.RecommendProductsResponse.FromString,
            )
            release = threading.Event()

            def held():
                yield pb.RecommendProductsRequest(customer_id="c002")
                release.wait(20)

            first = stream(held(), timeout=30)
            assert next(first).customer_id == "c002"  # the first stream is open
            with pytest.raises(grpc.RpcError) as second:
                list(stream(iter([pb.RecommendProductsRequest(customer_id="c003")]), timeout=10))
            assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "serve.max_concurrent_streams = 1" in second.value.details()
            release.set()
            assert list(first) == []
            # The slot is free again once the first stream has ended.
            answers = list(
                stream(iter([pb.RecommendProductsRequest(customer_id="c003")]), timeout=10)
            )
            assert [a.customer_id for a in answers] == ["c003"]
    finally:
        running.stop(0)


# --- the JSON call log -------------------------------------------------------------------------


def test_serve_logs_json_lines_with_request_ids_and_hashed_customers(folder, pki):
    """A real `nextbest serve` with TLS and tokens: one JSON line per call with the caller's
    request id (echoed back), the client's name and a keyed hash instead of the customer id."""
    config = folder / "logged.toml"
    clients = "".join(
        f'[[serve.clients]]\nname = "{c.name}"\ntoken_sha256 = "{c.token_sha256}"\n'
        f"roles = {json.dumps(list(c.roles))}\n"
        for c in CLIENTS
    )
    config.write_text(
        (folder / "nextbest.toml").read_text().replace("insecure = true", "")
        + f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
        + 'log_hash_key = "test-key"\n'
        + clients
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "nextbest.cli", "serve", "--config", str(config)]
        + ["--models-dir", str(folder / "models"), "--store", store_url(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "serving on" in line, proc.stderr.read()
        port = int(line.rsplit(":", 1)[1])
        with pki.channel(port) as ch:
            unary = ch.unary_unary(
                "/nextbest.v1.Recommender/RecommendProducts",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.RecommendProductsResponse.FromString,
            )
            _, call_info = unary.with_call(
                pb.RecommendProductsRequest(customer_id="c002"),
                metadata=(
                    ("authorization", f"Bearer {TOKENS['recommend']}"),
                    ("x-request-id", "req-42"),
                ),
                timeout=10,
            )
            assert ("x-request-id", "req-42") in call_info.initial_metadata()
            with pytest.raises(grpc.RpcError):
                unary(pb.RecommendProductsRequest(customer_id="c003"), timeout=10)
        time.sleep(0.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert len(lines) == len(err.splitlines()), err  # every line is JSON
    start = next(x for x in lines if "listening on" in x["msg"])
    assert start["level"] == "INFO" and "TLS, bearer tokens of 4 clients" in start["msg"]
    calls = [x for x in lines if x["msg"] == "call"]
    ok = next(x for x in calls if x.get("request_id") == "req-42")
    assert ok["code"] == "OK" and ok["client"] == "recommend-client" and ok["ms"] > 0
    assert ok["method"] == "/nextbest.v1.Recommender/RecommendProducts"
    refused = next(x for x in calls if x["code"] == "UNAUTHENTICATED")
    assert len(refused["request_id"]) == 32 and refused["client"] == ""  # a generated id
    assert ok["customer"] and ok["customer"] != refused["customer"]
    from nextbest.logs import hash_customer_id, set_hash_key

    set_hash_key("test-key")
    assert ok["customer"] == hash_customer_id("c002")
    assert '"c002"' not in err and '"c003"' not in err  # no raw customer id anywhere


def test_insecure_start_is_logged_as_such(folder):
    proc = subprocess.Popen(
        [sys.executable, "-m", "nextbest.cli", "serve", "--insecure", "--port", "0"]
        + ["--metrics-port", "-1", "--models-dir", str(folder / "models")]
        + ["--store", store_url(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "serving on" in proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    start = next(json.loads(x) for x in err.splitlines() if "listening on" in x)
    assert start["level"] == "WARNING"
    assert "INSECURE: plaintext, no TLS, no tokens" in start["msg"]


# --- client certificates as clients (mutual TLS, no token) -------------------------------------

WEB_CERT = "web-cert"
"""The client that the Pki's `client` certificate maps to (role recommend, no token)."""


def cert_client(pki: Pki, **extra) -> ClientToken:
    return ClientToken(
        name=WEB_CERT,
        certificate_sha256=certificate_sha256(pki.client[1]),
        roles=("recommend",),
        **extra,
    )


@pytest.fixture(scope="module")
def mtls_server(folder, pki):
    """Mutual TLS; the token clients of CLIENTS plus the `client` certificate as `web-cert`
    (the `web_shop` certificate, from the same CA, maps to no client)."""
    settings = secure_settings(
        folder, pki, tls_client_ca=str(pki.ca), clients=(*CLIENTS, cert_client(pki))
    )
    running = create_server(settings)
    yield running
    running.stop(0)


def test_the_start_line_counts_clients_by_token_and_by_certificate(folder, pki):
    from nextbest.server import _security_summary

    settings = secure_settings(
        folder, pki, tls_client_ca=str(pki.ca), clients=(*CLIENTS, cert_client(pki))
    )
    assert _security_summary(settings.serve) == (
        "TLS, client certificates required, bearer tokens of 4 clients, certificates of 1 clients"
    )


def test_certificate_fingerprint_is_the_sha256_of_the_der_certificate(pki):
    import hashlib

    assert certificate_sha256(pki.client[1]) == hashlib.sha256(pki.client_der).hexdigest()
    assert certificate_sha256(pki.client[1]) != certificate_sha256(pki.web_shop[1])
    with pytest.raises(ValueError):
        certificate_sha256(b"not a certificate")


@pytest.mark.parametrize("method", sorted(RPCS))
def test_a_mapped_certificate_is_a_client_with_its_roles_and_no_token(mtls_server, pki, method):
    """The `client` certificate maps to `web-cert` (recommend): the recommend methods answer
    without a token, the others are PERMISSION_DENIED, as for a token of that role."""
    needed = readme_roles()[method.split("/")[1]]
    with pki.channel(mtls_server.port, pki.client) as ch:
        code = call(ch, method, None)
    if needed != "recommend":
        assert code == grpc.StatusCode.PERMISSION_DENIED
    elif method.endswith("StreamAudience"):  # past the gate: the fixture model has no lifecycle
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION)
    else:
        assert code == grpc.StatusCode.OK


def test_a_mapped_certificate_refusal_names_the_client(mtls_server, pki):
    with pki.channel(mtls_server.port, pki.client) as ch:
        set_consent = ch.unary_unary(
            "/nextbest.v1.Consent/SetConsent", request_serializer=lambda m: m.SerializeToString()
        )
        with pytest.raises(grpc.RpcError) as denied:
            set_consent(RPCS["/nextbest.v1.Consent/SetConsent"], timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "client 'web-cert' lacks the 'consent' role" in denied.value.details()


def test_an_unmapped_certificate_needs_a_token(mtls_server, pki):
    """`web_shop` is signed by the CA (the handshake passes) but is in no [[serve.clients]]."""
    method = "/nextbest.v1.Recommender/RecommendProducts"
    with pki.channel(mtls_server.port, pki.web_shop) as ch:
        assert call(ch, method, None) == grpc.StatusCode.UNAUTHENTICATED
        assert call(ch, method, TOKENS["recommend"]) == grpc.StatusCode.OK  # tokens still work
        unary = ch.unary_unary(method, request_serializer=lambda m: m.SerializeToString())
        with pytest.raises(grpc.RpcError) as refused:
            unary(RPCS[method], timeout=10)
    assert "bearer token is required" in refused.value.details()
    assert certificate_sha256(pki.web_shop[1]) in refused.value.details()  # what to map


def test_a_token_decides_over_the_certificate(mtls_server, pki):
    """A call with a token is judged by the token alone: its client's roles, never the union
    with the certificate's; a wrong token is not rescued by a mapped certificate."""
    recommend = "/nextbest.v1.Recommender/RecommendProducts"
    admin = "/nextbest.v1.Admin/GetModelInfo"
    with pki.channel(mtls_server.port, pki.client) as ch:  # the certificate of web-cert
        assert call(ch, recommend, None) == grpc.StatusCode.OK
        assert call(ch, admin, None) == grpc.StatusCode.PERMISSION_DENIED
        assert call(ch, admin, TOKENS["admin"]) == grpc.StatusCode.OK  # the token's client
        assert call(ch, recommend, TOKENS["admin"]) == grpc.StatusCode.PERMISSION_DENIED
        assert call(ch, recommend, "nb_not-a-real-token") == grpc.StatusCode.UNAUTHENTICATED
        unary = ch.unary_unary(recommend, request_serializer=lambda m: m.SerializeToString())
        with pytest.raises(grpc.RpcError) as denied:
            unary(
                RPCS[recommend],
                metadata=(("authorization", f"Bearer {TOKENS['consent']}"),),
                timeout=10,
            )
    assert "client 'consent-client' lacks the 'recommend' role" in denied.value.details()


def test_certificates_are_not_read_without_mutual_tls(tls_server, pki):
    """The server without tls_client_ca: a client certificate proves nothing there."""
    with pki.channel(tls_server.port, pki.client) as ch:
        assert call(ch, "/nextbest.v1.Recommender/RecommendProducts", None) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def mtls_config(folder: Path, pki: Pki, clients: str, name: str = "mtls.toml") -> Path:
    """A config file of the fixture model with TLS, client certificates required and `clients`
    (TOML [[serve.clients]] tables)."""
    path = folder / name
    path.write_text(
        (folder / "nextbest.toml").read_text().replace("insecure = true", "")
        + f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
        + f'tls_client_ca = "{pki.ca}"\n'
        + clients
    )
    return path


def token_entry(name: str, token: str, roles: str = '["recommend"]', extra: str = "") -> str:
    return (
        f'[[serve.clients]]\nname = "{name}"\ntoken_sha256 = "{token_sha256(token)}"\n'
        f"roles = {roles}\n{extra}"
    )


def test_sighup_reload_maps_certificates_and_sets_rate_limits(folder, pki):
    """Running.reload_clients (what SIGHUP calls; the signal itself: tests/test_processes.py)
    maps a certificate and sets a rate limit from the next call on."""
    from nextbest.config import load_settings

    before = mtls_config(folder, pki, token_entry("admin-client", TOKENS["admin"], '["admin"]'))
    running = create_server(
        load_settings(before).with_overrides(
            "serve", models_dir=str(folder / "models"), store=store_url(folder), metrics_port=-1
        )
    )
    recommend = "/nextbest.v1.Recommender/RecommendProducts"
    try:
        with pki.channel(running.port, pki.client) as ch:
            assert call(ch, recommend, None) == grpc.StatusCode.UNAUTHENTICATED
            after = mtls_config(
                folder,
                pki,
                token_entry("admin-client", TOKENS["admin"], '["admin"]')
                + '[[serve.clients]]\nname = "web-cert"\n'
                + f'certificate_sha256 = "{certificate_sha256(pki.client[1])}"\n'
                + 'roles = ["recommend"]\nrate_per_s = 0.01\nburst = 1\n',
                "after.toml",
            )
            assert running.reload_clients(str(after))
            assert call(ch, recommend, None) == grpc.StatusCode.OK  # mapped now
            # One call per 100 s, and it was just made.
            assert call(ch, recommend, None) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert call(ch, "/nextbest.v1.Admin/GetModelInfo", TOKENS["admin"]) == (
                grpc.StatusCode.OK
            )
            # A reload with the same rate keeps the bucket: no new burst.
            assert running.reload_clients(str(after))
            assert call(ch, recommend, None) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop(0)


def test_sighup_refuses_a_certificate_on_a_server_without_client_certificates(folder, pki):
    running = create_server(secure_settings(folder, pki))  # TLS, no tls_client_ca
    try:
        mapped = mtls_config(
            folder,
            pki,
            f'[[serve.clients]]\nname = "web-cert"\n'
            f'certificate_sha256 = "{certificate_sha256(pki.client[1])}"\nroles = ["admin"]\n',
            "mapped.toml",
        )
        assert not running.reload_clients(str(mapped))
        with pki.channel(running.port) as ch:  # the clients stayed
            assert call(ch, "/nextbest.v1.Admin/GetModelInfo", TOKENS["admin"]) == (
                grpc.StatusCode.OK
            )
        with pki.channel(running.port, pki.client) as ch:
            assert call(ch, "/nextbest.v1.Admin/GetModelInfo", None) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
    finally:
        running.stop(0)


def test_certificate_command_prints_an_entry_the_server_accepts(folder, pki, tmp_path):
    cert = tmp_path / "client.pem"
    cert.write_bytes(pki.client[1])
    done = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "certificate", str(cert)]
        + ["--name", "email-platform", "--roles", "recommend,consent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    entry = done.stdout[done.stdout.index("[[serve.clients]]") :]
    from nextbest.config import load_settings

    [client] = load_settings(mtls_config(folder, pki, entry, "cli.toml")).serve.clients
    assert client.name == "email-platform" and client.roles == ("recommend", "consent")
    assert client.certificate_sha256 == certificate_sha256(pki.client[1])
    assert client.token_sha256 == ""
    bad = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "certificate", str(folder / "nextbest.toml")]
        + ["--name", "x", "--roles", "recommend"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "not a PEM certificate" in bad.stderr
    assert "Traceback" not in bad.stderr


FINGERPRINT = "ab" * 32
CLIENT_ERRORS = [
    # (the [[serve.clients]] keys after name and roles, [serve] lines, the error)
    (
        f'certificate_sha256 = "{FINGERPRINT}"',
        "",
        r"serve.clients\[0\].certificate_sha256 needs serve.tls_client_ca",
    ),
    (
        f'certificate_sha256 = "{FINGERPRINT}"',
        "insecure = true",
        r"serve.clients\[0\].certificate_sha256 needs serve.tls_client_ca",
    ),
    (
        'certificate_sha256 = "abc"',
        'tls_client_ca = "ca.pem"',
        r"serve.clients\[0\].certificate_sha256 must be the SHA-256 fingerprint",
    ),
    (
        "certificate_sha256 = 42",
        'tls_client_ca = "ca.pem"',
        r"serve.clients\[0\].certificate_sha256 must be the SHA-256 fingerprint",
    ),
    ("", "", r"serve.clients\[0\] needs token_sha256 .*or certificate_sha256"),
    (f'token_sha256 = "{FINGERPRINT}"\nrate_per_s = 0', "", r"clients\[0\].rate_per_s must be"),
    (f'token_sha256 = "{FINGERPRINT}"\nrate_per_s = -2', "", r"clients\[0\].rate_per_s must be"),
    (f'token_sha256 = "{FINGERPRINT}"\nrate_per_s = "5"', "", r"clients\[0\].rate_per_s must be"),
    (f'token_sha256 = "{FINGERPRINT}"\nrate_per_s = true', "", r"clients\[0\].rate_per_s must be"),
    (
        f'token_sha256 = "{FINGERPRINT}"\nrate_per_s = 5\nburst = 0',
        "",
        r"serve.clients\[0\].burst must be a whole number >= 1",
    ),
    (
        f'token_sha256 = "{FINGERPRINT}"\nrate_per_s = 5\nburst = 2.5',
        "",
        r"serve.clients\[0\].burst must be a whole number >= 1",
    ),
    (f'token_sha256 = "{FINGERPRINT}"\nburst = 5', "", r"serve.clients\[0\].burst needs rate_per"),
    (
        f'token_sha256 = "{FINGERPRINT}"\nrate = 5',
        "",
        r"serve.clients\[0\] has an unknown key rate",
    ),
]


@pytest.mark.parametrize(("keys", "serve", "error"), CLIENT_ERRORS)
def test_bad_client_entries_are_refused_naming_the_key(tmp_path, keys, serve, error):
    from nextbest.config import load_settings

    (tmp_path / "c.toml").write_text(
        f'[serve]\n{serve}\n[[serve.clients]]\nname = "crm"\nroles = ["recommend"]\n{keys}\n'
    )
    with pytest.raises(ConfigError, match=error):
        load_settings(tmp_path / "c.toml")


def test_client_entries_with_certificates_and_rates_load(tmp_path):
    from nextbest.config import load_settings

    colons = ":".join(["AB"] * 32)  # openssl x509 -fingerprint -sha256 prints it like this
    (tmp_path / "c.toml").write_text(
        '[serve]\ntls_client_ca = "ca.pem"\n'
        f'[[serve.clients]]\nname = "a"\nroles = ["recommend"]\ncertificate_sha256 = "{colons}"\n'
        "rate_per_s = 2.5\n"
        f'[[serve.clients]]\nname = "b"\nroles = ["admin"]\ntoken_sha256 = "{"cd" * 32}"\n'
        f'certificate_sha256 = "{"ef" * 32}"\nrate_per_s = 5\nburst = 20\n'
    )
    a, b = load_settings(tmp_path / "c.toml").serve.clients
    assert (a.certificate_sha256, a.token_sha256, a.rate_per_s, a.burst) == (
        FINGERPRINT,
        "",
        2.5,
        0,
    )
    assert (b.certificate_sha256, b.rate_per_s, b.burst) == ("ef" * 32, 5.0, 20)
    (tmp_path / "twice.toml").write_text(
        '[serve]\ntls_client_ca = "ca.pem"\n'
        + "".join(
            f'[[serve.clients]]\nname = "{n}"\nroles = ["recommend"]\n'
            f'certificate_sha256 = "{FINGERPRINT}"\n'
            for n in ("a", "b")
        )
    )
    with pytest.raises(ConfigError, match="serve.clients has two clients with one certificate"):
        load_settings(tmp_path / "twice.toml")


def test_gate_maps_certificates_and_lets_tokens_decide(pki):
    mapped = cert_client(pki)
    gate = Gate((*CLIENTS, mapped))
    recommend, admin = (
        "/nextbest.v1.Recommender/RecommendProducts",
        "/nextbest.v1.Admin/ReloadModel",
    )
    assert gate.check(recommend, None, pki.client[1]) == Verdict(True, client=WEB_CERT)
    assert gate.check(admin, None, pki.client[1]).problem == "forbidden"
    assert gate.check(recommend, None, pki.web_shop[1]).problem == "unauthenticated"
    assert gate.check(recommend, None, None).problem == "unauthenticated"
    assert gate.check(admin, f"Bearer {TOKENS['admin']}", pki.client[1]).client == "admin-client"
    assert not gate.check(recommend, "Bearer nb_wrong", pki.client[1]).allowed
    assert not gate.check(recommend, "Basic x", pki.client[1]).allowed
    assert Gate(CLIENTS).check(recommend, None, pki.client[1]).problem == "unauthenticated"


# --- per-client rate limits --------------------------------------------------------------------

LIMITED, UNLIMITED = new_token(), new_token()


def test_token_bucket_arithmetic():
    from nextbest.ratelimit import RateLimits

    now = [100.0]
    clients = (
        ClientToken(name="web", token_sha256="a" * 64, roles=("recommend",), rate_per_s=5, burst=5),
        ClientToken(name="crm", token_sha256="b" * 64, roles=("consent",), rate_per_s=2.5),
        ClientToken(name="admin", token_sha256="c" * 64, roles=("admin",)),
    )
    limits = RateLimits(clients, clock=lambda: now[0])
    assert [limits.take("web") for _ in range(5)] == [0.0] * 5
    assert limits.take("web") == pytest.approx(0.2)  # one token per 1/5 s
    now[0] += 0.1
    assert limits.take("web") == pytest.approx(0.1)  # half a token there
    now[0] += 0.1
    assert limits.take("web") == 0.0
    now[0] += 60  # a quiet minute fills the bucket to `burst`, no more
    assert [limits.take("web") for _ in range(6)].count(0.0) == 5
    assert [limits.take("crm") for _ in range(4)].count(0.0) == 3  # burst = ceil(2.5)
    assert all(limits.take("admin") == 0.0 for _ in range(100))  # no rate: no limit
    assert limits.take("nobody") == 0.0
    limits.use(clients)  # a reload with the same limits keeps the buckets
    assert limits.take("web") > 0
    limits.use((dataclasses.replace(clients[0], burst=10),))  # a new limit starts full
    assert [limits.take("web") for _ in range(10)] == [0.0] * 10
    assert limits.take("crm") == 0.0  # gone from the config: no longer limited


@pytest.fixture
def limited_server(folder, pki):
    """TLS; `limited` may make 5 calls per second (burst 5), `unlimited` as many as it likes.
    Admission control wide open, so that only the rate limit refuses."""
    clients = (
        ClientToken(
            name="limited",
            token_sha256=token_sha256(LIMITED),
            roles=("recommend",),
            rate_per_s=5.0,
            burst=5,
        ),
        ClientToken(name="unlimited", token_sha256=token_sha256(UNLIMITED), roles=("recommend",)),
    )
    settings = secure_settings(
        folder, pki, clients=clients, max_running_calls=8, max_queue_ms=10_000
    )
    running = create_server(settings)
    yield running
    running.stop(0)


def rate_limited(running, client: str) -> float:
    return (
        running.metrics.registry.get_sample_value(
            "nextbest_rate_limited_calls_total", {"client": client}
        )
        or 0.0
    )


def test_rate_limit_refuses_past_the_burst_with_a_pushback(limited_server, pki):
    method = "/nextbest.v1.Recommender/RecommendProducts"
    request = pb.RecommendProductsRequest(customer_id="c002")
    with pki.channel(limited_server.port) as ch:
        unary = ch.unary_unary(method, request_serializer=lambda m: m.SerializeToString())

        def send(token: str):
            return unary.future(
                request, metadata=(("authorization", f"Bearer {token}"),), timeout=30
            )

        # Six calls at once (the rate check comes before any work, so they reach it together):
        # five tokens in the bucket, the sixth call is refused.
        calls = [send(LIMITED) for _ in range(6)]
        failed = [c.exception() for c in calls if c.exception() is not None]
        assert len(failed) == 1, [f.details() for f in failed]
        [refused] = failed
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "client 'limited' is over its rate limit (rate_per_s = 5, burst = 5)" in (
            refused.details()
        )
        pushback = int(dict(refused.trailing_metadata())["grpc-retry-pushback-ms"])
        assert 0 < pushback <= 200  # one token comes back every 200 ms
        assert rate_limited(limited_server, "limited") == 1
        # Another client is not held back by it.
        assert all(c.exception() is None for c in [send(UNLIMITED) for _ in range(10)])
        assert rate_limited(limited_server, "unlimited") == 0
        # After the pushback, a token is there again.
        time.sleep(pushback / 1000)
        assert send(LIMITED).exception() is None
        assert rate_limited(limited_server, "limited") == 1


def test_the_python_client_waits_out_the_rate_limit(limited_server, pki):
    from concurrent.futures import ThreadPoolExecutor

    from nextbest.client import Client

    with (
        Client(f"127.0.0.1:{limited_server.port}", ca=pki.ca, token=LIMITED, attempts=3) as nb,
        ThreadPoolExecutor(6) as pool,
    ):
        answers = list(pool.map(lambda _: nb.recommend("c002", timeout=30), range(6)))
    assert [a.customer_id for a in answers] == ["c002"] * 6  # none failed...
    assert rate_limited(limited_server, "limited") == 1  # ...one was refused, then retried
