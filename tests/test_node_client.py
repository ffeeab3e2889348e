"""The Node.js example client (examples/node/client.js, @grpc/grpc-js loading protos/ at run time)
against real servers: its JSON lines must be the answers the Python stubs get for the same
requests, on a plaintext server and on a TLS server with bearer tokens (issue #6).

Needs `node` and examples/node/node_modules (`make test` runs `npm ci` there first): skipped
without them, failed when CI is true (conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from conftest import REPO, served_settings
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_security import TOKENS, Pki, secure_settings

from nextbest.server import create_server
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb

CLIENT = REPO / "examples" / "node" / "client.js"
INSTALLED = REPO / "examples" / "node" / "node_modules" / ".package-lock.json"
RECOMMEND = "nextbest.v1.Recommender/RecommendProducts"
STREAM = "nextbest.v1.Recommender/StreamRecommendations"
SCORE = "nextbest.v1.Recommender/ScoreContent"
SIMILAR = "nextbest.v1.Recommender/SimilarProducts"
HEALTH = "grpc.health.v1.Health/Check"


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    if path is None:
        missing = "node is not installed (Node.js 20+ runs examples/node/client.js)"
    elif not INSTALLED.exists():
        missing = "examples/node/node_modules is missing: `make test` runs `npm ci` there"
    else:
        return path
    pytest.skip(missing)  # a failure in CI (conftest.py)


def run(node: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`node client.js ARGS`, without any NEXTBEST_* variable of the caller's environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTBEST_")}
    return subprocess.run(
        [node, str(CLIENT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def lines(done: subprocess.CompletedProcess, rpc: str) -> list[dict]:
    """The answers printed by a successful run: one JSON object per line, all of `rpc`."""
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    parsed = [json.loads(line) for line in done.stdout.splitlines()]
    assert parsed and all(p["rpc"] == rpc for p in parsed), done.stdout
    return [drop_nulls(p["response"]) for p in parsed]


def one_error(done: subprocess.CompletedProcess, code: int = 1) -> str:
    """The one-line error of a failed run."""
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def drop_nulls(value):
    """Unset message fields: null in the Node client's output, absent from MessageToDict."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def as_dict(message) -> dict:
    """A Python stub's answer in the Node client's form: proto field names, enum names, every
    field with its default; without the attribution id (new for every answer, see `ided`)."""
    out = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    out.pop("attribution_id", None)
    return out


def ided(answer: dict) -> dict:
    """The Node client's answer without its attribution id (set when personalized, in the
    answers that have one)."""
    out = dict(answer)
    attribution_id = out.pop("attribution_id", None)
    if "attribution_id" in answer and out.get("personalized"):
        assert isinstance(attribution_id, str) and len(attribution_id) == 32
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a plaintext server (the served config of conftest: insecure = true) -----------------------


@pytest.fixture(scope="module")
def address(running) -> str:
    return f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def stub(address):
    with grpc.insecure_channel(address) as ch:
        yield rpb.RecommenderStub(ch)


@pytest.mark.parametrize(
    ("args", "fields"),
    [
        (["--customer", "c004", "--limit", "8"], {"customer_id": "c004", "limit": 8}),
        (  # no personalization consent: best sellers
            ["--customer", "c001", "--limit", "5", "--channel", "web"],
            {"customer_id": "c001", "limit": 5, "channel": pb.CHANNEL_WEB},
        ),
        (["--customer", "never-seen"], {"customer_id": "never-seen"}),
        (
            ["--customer", "c006", "--limit", "20", "--channel", "app", "--include-purchased"]
            + ["--exclude-category", "pantry", "--exclude-product", "p008"]
            + ["--request-id", "r-1"],
            {
                "customer_id": "c006",
                "limit": 20,
                "channel": pb.CHANNEL_APP,
                "include_purchased": True,
                "exclude_categories": ["pantry"],
                "exclude_product_ids": ["p008"],
                "request_id": "r-1",
            },
        ),
    ],
)
def test_recommend_products_is_what_the_python_stubs_get(node, address, stub, args, fields):
    [answer] = lines(run(node, "recommend", "--address", address, *args), RECOMMEND)
    expected = stub.RecommendProducts(pb.RecommendProductsRequest(**fields), timeout=10)
    assert [i["product_id"] for i in answer["items"]] == [i.product_id for i in expected.items]
    assert ided(answer) == as_dict(expected)


def test_score_content_is_what_the_python_stubs_get(node, address, stub):
    content = ["guide-pantry", "guide-home", "guide-pharmacy", "news-p020"]
    args = ["--customer", "c004", "--channel", "web"] + [
        a for c in content for a in ("--content", c)
    ]
    [answer] = lines(run(node, "score", "--address", address, *args), SCORE)
    expected = stub.ScoreContent(
        pb.ScoreContentRequest(
            customer_id="c004",
            channel=pb.CHANNEL_WEB,
            candidates=[pb.ContentCandidate(content_id=c) for c in content],
        ),
        timeout=10,
    )
    assert [i["content_id"] for i in answer["items"]] == [i.content_id for i in expected.items]
    assert ided(answer) == as_dict(expected)


def test_similar_products_is_what_the_python_stubs_get(node, address, stub):
    done = run(node, "similar", "--address", address, "--product", "p004", "--product", "p006")
    [answer] = lines(done, SIMILAR)
    expected = stub.SimilarProducts(
        pb.SimilarProductsRequest(product_ids=["p004", "p006"]), timeout=10
    )
    assert ided(answer) == as_dict(expected) and answer["items"]


def test_stream_answers_in_request_order_as_the_python_stubs_get(node, address, stub, tmp_path):
    customers = ["c004", "c005", "never-seen", "c001", "c004", "c006"]
    (tmp_path / "audience.txt").write_text("\n".join(customers[2:]) + "\n")
    done = run(
        node, "stream", "--address", address, "--limit", "4",
        "--customer", customers[0], "--customer", customers[1],
        "--customers-file", str(tmp_path / "audience.txt"),
    )  # fmt: skip
    answers = lines(done, STREAM)
    requests = [
        pb.RecommendProductsRequest(customer_id=c, limit=4, request_id=str(i))
        for i, c in enumerate(customers, 1)
    ]
    expected = list(stub.StreamRecommendations(iter(requests), timeout=30))
    assert [(a["request_id"], a["customer_id"]) for a in answers] == [
        (str(i), c) for i, c in enumerate(customers, 1)
    ]
    assert [ided(a) for a in answers] == [as_dict(e) for e in expected]
    # The stream's answer for a customer is the unary answer.
    assert answers[0]["items"] == answers[4]["items"]
    assert answers[0]["items"] == as_dict(stub.RecommendProducts(requests[0], timeout=10))["items"]


def test_a_bad_request_inside_the_stream_is_printed_and_fails_the_run(node, address):
    done = run(node, "stream", "--address", address, "--customer", "c004", "--customer", "")
    answers = [json.loads(line)["response"] for line in done.stdout.splitlines()]
    assert [a["request_id"] for a in answers] == ["1", "2"]
    assert answers[0]["items"] and answers[0]["error"] is None
    assert answers[1]["error"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    error = one_error(done)
    assert "1 of 2 requests failed" in error and "INVALID_ARGUMENT: customer_id" in error


def test_health_check_through_the_environment(node, address):
    done = run(node, "health", env={"NEXTBEST_ADDRESS": address})
    assert lines(done, HEALTH) == [{"status": "SERVING"}]


def test_a_failing_call_is_one_line_and_exit_1(node, address):
    error = one_error(
        run(node, "recommend", "--address", address, "--customer", "c004", "--limit", "0")
    )
    assert error.startswith(f"error: {RECOMMEND}: INVALID_ARGUMENT: limit must be within 1..100")
    error = one_error(
        run(node, "score", "--address", address, "--customer", "c004", "--content", "nope")
    )
    assert f"{SCORE}: NOT_FOUND" in error and "nope" in error


def test_every_call_has_a_deadline(node, address):
    for command, args in (
        ("health", []),
        ("recommend", ["--customer", "c004"]),
        ("stream", ["--customer", "c004"]),
        ("score", ["--customer", "c004", "--content", "guide-home"]),
        ("similar", ["--product", "p004"]),
    ):
        done = run(node, command, "--address", address, "--timeout", "0.000001", *args)
        assert "DEADLINE_EXCEEDED" in one_error(done), command


def test_no_server_at_the_address(node):
    address = f"127.0.0.1:{free_port()}"
    error = one_error(run(node, "health", "--address", address, "--timeout", "5"))
    assert f"{HEALTH}: UNAVAILABLE" in error and f"is the server running on {address}?" in error
    error = one_error(
        run(node, "recommend", "--address", "no-such-host.invalid:1", "--customer", "x")
    )
    assert "UNAVAILABLE" in error and "check --address" in error


def test_bad_arguments_exit_2(node):
    assert "one command of" in one_error(run(node), code=2)
    assert "--content is not an option of recommend" in one_error(
        run(node, "recommend", "--customer", "c004", "--content", "x"), code=2
    )
    assert "--limit must be an integer" in one_error(
        run(node, "recommend", "--customer", "c004", "--limit", "ten"), code=2
    )
    assert "--ca-file: " in one_error(run(node, "health", "--ca-file", "/nonexistent.pem"), code=2)
    help_ = run(node, "--help")
    assert help_.returncode == 0 and "StreamRecommendations" in help_.stdout


def test_not_serving_until_a_model_is_published_then_wait_succeeds(node, workdir, tmp_path):
    models = tmp_path / "models"
    running = create_server(served_settings(workdir, models))
    address = f"127.0.0.1:{running.port}"
    try:
        done = run(node, "health", "--address", address)
        error = one_error(done)
        assert json.loads(done.stdout)["response"] == {"status": "NOT_SERVING"}
        assert f"the server at {address} is NOT_SERVING, not SERVING" in error
        error = one_error(run(node, "recommend", "--address", address, "--customer", "c004"))
        assert f"{RECOMMEND}: UNAVAILABLE" in error and "no model" in error
        # --wait polls until SERVING: publish a model while it waits.
        waiting = subprocess.Popen(
            [node, str(CLIENT), "health", "--address", address, "--wait", "30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        shutil.copytree(workdir / "models", tmp_path / "staged")
        (tmp_path / "staged").rename(models)  # published at once, as `nextbest train` does
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        assert json.loads(out)["response"] == {"status": "SERVING"}
    finally:
        running.stop(0)


# --- TLS and bearer tokens (the certificates of tests/test_security.py) --------------------------


@pytest.fixture(scope="module")
def folder(workdir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("node-tls")
    shutil.copytree(workdir / "models", d / "models")
    shutil.copy(workdir / "store.db", d / "store.db")
    shutil.copy(workdir / "nextbest.toml", d / "nextbest.toml")
    return d


@pytest.fixture(scope="module")
def pki(folder) -> Pki:
    return Pki(folder)


@pytest.fixture(scope="module")
def tls_address(folder, pki):
    running = create_server(secure_settings(folder, pki))
    yield f"127.0.0.1:{running.port}"
    running.stop(0)


def test_tls_server_needs_the_token_and_then_answers_as_python(node, tls_address, pki):
    tls = ["--address", tls_address, "--ca-file", str(pki.ca)]
    ask = ["--customer", "c004", "--limit", "5"]
    error = one_error(run(node, "recommend", *tls, *ask))
    assert f"{RECOMMEND}: UNAUTHENTICATED: " in error and "bearer token is required" in error
    assert "--token or NEXTBEST_TOKEN" in error
    error = one_error(run(node, "recommend", *tls, *ask, "--token", "nb_not-a-real-token"))
    assert "UNAUTHENTICATED" in error and "the token was refused" in error
    error = one_error(run(node, "recommend", *tls, *ask, "--token", TOKENS["consent"]))
    assert "PERMISSION_DENIED" in error and "lacks the 'recommend' role" in error
    # Health stays open without a token; TLS is needed.
    assert lines(run(node, "health", *tls), HEALTH) == [{"status": "SERVING"}]
    assert "UNAVAILABLE" in one_error(run(node, "health", "--address", tls_address))

    token = {"NEXTBEST_TOKEN": TOKENS["recommend"]}
    [answer] = lines(run(node, "recommend", *tls, *ask, env=token), RECOMMEND)
    metadata = (("authorization", f"Bearer {TOKENS['recommend']}"),)
    with pki.channel(int(tls_address.rsplit(":", 1)[1])) as ch:
        stub = rpb.RecommenderStub(ch)
        expected = stub.RecommendProducts(
            pb.RecommendProductsRequest(customer_id="c004", limit=5), metadata=metadata, timeout=10
        )
        assert ided(answer) == as_dict(expected) and answer["personalized"]
        streamed = lines(
            run(node, "stream", *tls, "--customer", "c004", "--customer", "c005", env=token),
            STREAM,
        )
        assert [a["customer_id"] for a in streamed] == ["c004", "c005"]
        scored = lines(
            run(node, "score", *tls, "--customer", "c004", "--content", "guide-home", env=token),
            SCORE,
        )
        assert scored[0]["items"][0]["content_id"] == "guide-home"
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls_with_a_client_certificate(node, folder, pki, tmp_path):
    key, cert = pki.client
    (tmp_path / "client.key").write_bytes(key)
    (tmp_path / "client.pem").write_bytes(cert)
    running = create_server(secure_settings(folder, pki, tls_client_ca=str(pki.ca)))
    try:
        tls = ["--address", f"127.0.0.1:{running.port}", "--ca-file", str(pki.ca)]
        ask = ["recommend", "--customer", "c004", "--token", TOKENS["recommend"]]
        assert "UNAVAILABLE" in one_error(run(node, *ask, *tls))
        mine = [
            "--client-cert",
            str(tmp_path / "client.pem"),
            "--client-key",
            str(tmp_path / "client.key"),
        ]
        [answer] = lines(run(node, *ask, *tls, *mine), RECOMMEND)
        assert answer["customer_id"] == "c004" and answer["items"]
    finally:
        running.stop(0)


def test_readme_node_example_of_consent_events_and_admin(node, running, tmp_path):
    """README's Node.js block for the services client.js does not cover, run as written."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("```js\n") + len("```js\n")
    code = readme[start : readme.index("\n```", start)]
    script = CLIENT.parent / f".readme-example-{os.getpid()}.js"  # beside node_modules
    script.write_text(code)
    try:
        done = subprocess.run(
            [node, str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=CLIENT.parent,
            env={**os.environ, "NEXTBEST_ADDRESS": f"127.0.0.1:{running.port}"},
        )
    finally:
        script.unlink()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "SetConsent PURPOSE_BEHAVIORAL true",
        "GetConsent PURPOSE_PERSONALIZATION=true PURPOSE_BEHAVIORAL=true PURPOSE_SENSITIVE=true",
        "ForgetCustomer c998 false",
        "RecordEvents 1",
        "Admin true false",
    ]


def test_node_client_retries_a_refusal_after_its_pushback(node):
    """Admission control's RESOURCE_EXHAUSTED with grpc-retry-pushback-ms: retried after it."""
    from concurrent import futures

    from test_admission import Refusing

    servicer = Refusing()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpb.add_RecommenderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        done = run(node, "recommend", "--address", f"127.0.0.1:{port}", "--customer", "c003")
        [answer] = lines(done, RECOMMEND)
        assert answer["customer_id"] == "c003"
        assert len(servicer.times) == 2
        assert servicer.times[1] - servicer.times[0] >= 0.29  # waited for the pushback
    finally:
        server.stop(0)


OPENLOOP = REPO / "benchmarks" / "openloop.js"


def test_the_overload_benchmarks_load_generator_calls_on_schedule_and_counts_refusals(
    node, address, tmp_path
):
    """benchmarks/openloop.js (make bench-overload's load) against the real server: every call
    of the schedule is made and reported with its status; bad arguments are one clear line."""
    ids = tmp_path / "ids.txt"
    ids.write_text("c003\nc004\nnot-a-customer\n")
    cmd = [node, str(OPENLOOP), "--address", address, "--customers", str(ids)]
    done = subprocess.run([*cmd, "--rate", "40", "--seconds", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["calls"]) == 40
    assert {code for _, _, code in result["calls"]} == {"OK"}
    starts = [at for at, _, _ in result["calls"]]
    assert starts == sorted(starts) and starts[-1] == pytest.approx(39 / 40)
    closed = subprocess.run(
        [*cmd, "--concurrency", "2", "--seconds", "0.5"], capture_output=True, text=True
    )
    assert closed.returncode == 0 and json.loads(closed.stdout)["calls"], closed.stderr
    bad = subprocess.run([*cmd, "--rate", "fast", "--seconds", "1"], capture_output=True, text=True)
    assert (
        bad.returncode == 2 and bad.stderr == "error: --rate must be a positive number (got fast)\n"
    )
    missing = subprocess.run(
        [
            node,
            str(OPENLOOP),
            "--customers",
            str(tmp_path / "none.txt"),
            "--rate",
            "1",
            "--seconds",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: --customers: ")
