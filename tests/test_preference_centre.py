"""README's preference-centre walk-through (show consent, change it, export, explain, forget),
run as written in Python and in Node.js against a real server; and the Node client's `explain`
and `export` commands against the Python client's answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import REPO, served_settings

from nextbest.client import Client
from nextbest.server import create_server

README = REPO / "README.md"
WALK = "### A preference centre"
NODE_DIR = REPO / "examples" / "node"


def walkthrough_block(fence: str) -> str:
    text = README.read_text()
    section = text[text.index(WALK) :]
    start = section.index(fence) + len(fence)
    return section[start : section.index("\n```", start)]


@pytest.fixture
def server(own):
    running = create_server(served_settings(own, own / "models"))
    yield running
    running.stop(0)


@pytest.fixture
def node() -> str:
    path = shutil.which("node")
    if path is None or not (NODE_DIR / "node_modules").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("node and examples/node/node_modules are required in CI (make test)")
        pytest.skip("needs node and examples/node/node_modules (`make test` installs them)")
    return path


def test_readme_walkthrough_in_python(server, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the block writes c040-data.json
    code = walkthrough_block("```python\n")
    exec(code.replace("127.0.0.1:50051", f"127.0.0.1:{server.port}"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[(1, True, 'default'), (2, True, 'default'), (3, True, 'default')]"
    assert out[1] == "True"
    assert out[2] == "1 1 True ['personalization', 'sensitive']"  # c040 bought p006: pharmacy
    in_answer, rank, *reason, same = out[3].split(" ")
    assert (in_answer, rank, same) == ("True", "1", "True") and reason
    assert out[4] == "RULE_SENSITIVITY ''"
    assert out[5] == "['customer_id', 'exported_at', 'requested_by', 'schema_version', 'tombstone']"
    assert len(out) == 6
    written = json.loads((tmp_path / "c040-data.json").read_text())
    assert written["customer_id"] == "c040" and written["consent"][2]["granted"] is False


def test_readme_walkthrough_in_node(server, node):
    script = NODE_DIR / f".readme-preference-centre-{os.getpid()}.js"  # beside node_modules
    code = walkthrough_block("```js\n")
    script.write_text(code.replace("127.0.0.1:50051", f"127.0.0.1:{server.port}"))
    try:
        done = subprocess.run(
            [node, str(script)], capture_output=True, text=True, timeout=60, cwd=NODE_DIR
        )
    finally:
        script.unlink()
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "PURPOSE_PERSONALIZATION=true PURPOSE_BEHAVIORAL=true PURPOSE_SENSITIVE=true"
    assert out[1] == "1 1 true"
    assert out[2].startswith("true 1 ")
    assert out[3] == 'RULE_SENSITIVITY ""'
    assert out[4] == "customer_id exported_at requested_by schema_version tombstone"
    assert len(out) == 5


def node_client(node: str, *args: str) -> dict:
    done = subprocess.run(
        [node, str(NODE_DIR / "client.js"), *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    return json.loads(line)


def test_node_client_explain_and_export_match_the_python_client(server, node):
    address = f"127.0.0.1:{server.port}"
    with Client(address) as nb:
        first = nb.recommend("c002", limit=4, channel="web").items[0]
        python = nb.explain("c002", first.product_id, limit=4, channel="web")
        got = node_client(
            node, "explain", "--address", address, "--customer", "c002", "--product",
            first.product_id, "--limit", "4", "--channel", "web",
        )  # fmt: skip
        assert got["rpc"] == "nextbest.v1.Recommender/ExplainRecommendation"
        explained = got["response"]
        assert explained["in_answer"] and explained["rank"] == python.rank == 1
        assert explained["score"] == pytest.approx(python.score)
        assert explained["removed_by"] == "RULE_UNSPECIFIED"
        assert explained["terms"]["value"] == pytest.approx(python.terms.value)
        assert [r["text"] for r in explained["reasons"]] == [r.text for r in python.reasons]

        exported = node_client(
            node, "export", "--address", address, "--customer", "c002", "--source", "node"
        )
        assert exported["rpc"] == "nextbest.v1.Consent/ExportCustomerData"
        document = exported["response"]
        again = nb.export("c002", source="python")
    assert document["requested_by"] == {"client": "", "source": "node"}
    for key in ("exported_at", "requested_by"):
        document.pop(key), again.pop(key)
    assert document == again and len(document["impressions"]) >= 4

    bad = subprocess.run(
        [node, str(NODE_DIR / "client.js"), "export", "--address", address, "--customer", "c2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: nextbest.v1.Consent/ExportCustomerData: INVALID_ARGUMENT")
    assert "source is required" in bad.stderr
    unknown = subprocess.run(
        [node, str(NODE_DIR / "client.js"), "explain", "--address", address, "--customer", "c2"]
        + ["--product", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 1 and "NOT_FOUND: product_id 'nope'" in unknown.stderr
