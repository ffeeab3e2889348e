"""make audit-privacy: the privacy rules of SPEC §5 checked through the running server (issue #4).

On Complete Journey, with nine product categories (baby, infant care, diapers, feminine hygiene,
laxatives, analgesics, cold and flu, cigarettes) and the SPIRITS department set sensitive and
`policy.default_consent = "deny"`:

1. The households are split by the parity of their rank in id order: even ranks give
   `personalization` consent only, odd ranks `personalization` and `sensitive`. The consent file
   is imported into a fresh SQLite store (`nextbest consent import`) and given to `nextbest train
   --consent ... --store ...` (ALS only, no tuning), so training drops the sensitive purchases of
   the households without sensitive consent.
2. `nextbest serve` runs on that model and store as a subprocess; this process is its client.
3. What is sensitive is computed here from the catalog and the config (`policy.sensitive_mask`,
   cross-checked against a plain category / department match), never read from the answers.
4. Every household, channel CHANNEL_EMAIL: StreamRecommendations (limit 20; also with
   include_purchased, with include_categories naming the sensitive ones, and on CHANNEL_WEB; a
   sample also as unary RecommendProducts, which must give the same items and reasons),
   ScoreContent with the generated guides of the sensitive categories, inline sensitive
   candidates and non-sensitive guides, and SimilarProducts for samples of sensitive and
   non-sensitive products without a customer and with a customer of each group.
5. ExplainRecommendation (issue #17) of every item of sampled answers (which must agree with the
   answer) and of sensitive products (those the household bought, and others), and
   ExportCustomerData of sampled households: nothing of either names a sensitive product to a
   household without sensitive consent (a hidden product is named by kind only).
6. Sensitive purchases as evidence (SPEC §5), for the model of `--cf-model`: TWINS households
   with sensitive consent that bought two or more sensitive products each get a twin in the
   training data (`twin-<id>`: the same non-sensitive events, the sensitive events of one of
   those products only). Both learn with sensitive consent; the audit then withdraws it through
   Consent.SetConsent, and the twins must get the same RecommendProducts answers (email and
   web) and ScoreContent relevances: an answer that differs used a sensitive purchase.

`make audit-privacy` runs it once per `train.cf_model` (als, bpr, cosine, bm25), each in its
own work directory.

It prints the counts with pass / FAIL per invariant and exits 1 when an invariant fails.

    python benchmarks/audit_privacy.py --events data/complete-journey/events.parquet \\
        --catalog data/complete-journey/catalog.parquet \\
        --content data/complete-journey/content.parquet
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_serve import ServerProcess, nextbest_cli  # noqa: E402 - shared server handling

SENSITIVE_CATEGORIES = (
    "BABY HBC",
    "INFANT CARE PRODUCTS",
    "BABY FOODS",
    "DIAPERS & DISPOSABLES",
    "FEMININE HYGIENE",
    "LAXATIVES",
    "ANALGESICS",
    "COLD AND FLU",
    "CIGARETTES",
)
SENSITIVE_DEPARTMENTS = ("SPIRITS",)
LIMIT = 20
UNARY_SAMPLE = 100
"""Households per group also asked through unary RecommendProducts (same answers expected)."""
UNKNOWN = 50
"""Customer ids unknown to the model and without consent records (default deny)."""
OTHER_GUIDES = 20
"""Non-sensitive guides among the ScoreContent candidates (and the LIQUOR guide, mixed)."""
IN_FLIGHT = 8
"""Concurrent unary calls of the ScoreContent and SimilarProducts checks."""
CONSENT_TIME = "2024-01-01T00:00:00"
EXPLAIN_SAMPLE = 100
"""Households per group whose answers are explained item by item, and whose sensitive
purchases (and other sensitive products) are explained too; also exported."""
TWINS = 100
"""Households with sensitive consent given a twin (check 6)."""
TWIN = "twin-"


def toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join('"' + v.replace('"', '\\"') + '"' for v in values) + "]"


CONFIG = """# Written by benchmarks/audit_privacy.py (make audit-privacy).
[policy]
default_consent = "deny"
sensitive_categories = {sensitive_categories}
sensitive_departments = {sensitive_departments}
# Fatigue off: the audit asks for every household several times (channels, filters, unary
# against stream) and compares the answers; fatigue would rightly change them.
fatigue_demotion = 1.0

[train]
cf_model = "{cf_model}"
candidates = ["{cf_model}"]
tune = false

[serve]
metrics_port = 0
insecure = true
# The audit checks privacy, not capacity: its 8 concurrent calls wait for a worker on a busy
# machine instead of being refused by admission control (100 ms by default).
max_queue_ms = 10000
"""


# --- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    what: str
    population: str
    count: int
    expect: str = ""
    """'= 0', '> 0' or '' (reported only)."""

    @property
    def result(self) -> str:
        if self.expect == "= 0":
            return "pass" if self.count == 0 else "FAIL"
        if self.expect == "> 0":
            return "pass" if self.count > 0 else "FAIL"
        return "info"


@dataclass
class Audit:
    rows: list[Row] = field(default_factory=list)
    section: str = ""

    def add(self, what: str, population: str, count: int, expect: str = "") -> None:
        self.rows.append(Row(self.section, what, population, int(count), expect))

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.result == "FAIL"]

    def table(self) -> str:
        width = max(len(r.what) for r in self.rows) + 4
        pop = max(len(r.population) for r in self.rows) + 2
        lines, section = [], None
        header = f"{'check':<{width}}{'population':<{pop}}{'count':>9}  {'invariant':<10}result"
        lines.append(header)
        lines.append("-" * len(header))
        for r in self.rows:
            if r.section != section:
                section = r.section
                lines.append(section)
            lines.append(
                f"  {r.what:<{width - 2}}{r.population:<{pop}}{r.count:>9,}  "
                f"{r.expect or '':<10}{r.result}"
            )
        return "\n".join(lines)


# --- the server --------------------------------------------------------------------------------


def wait_serving(channel, timeout: float = 180.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"health not SERVING after {timeout:.0f} s")
        time.sleep(0.2)


def run(cmd: list[str], log: Path, show: str = "") -> None:
    """Run a nextbest command, its output to `log`; print its lines containing `show`."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
    text = log.read_text()
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:2])} failed ({done.returncode}):\n{text[-3000:]}")
    for line in text.splitlines():
        if show and show in line:
            print("  " + (line.split(": ", 1)[-1] if line.startswith("INFO") else line))
    print(f"  ({time.perf_counter() - t0:.1f} s; log {log.relative_to(ROOT)})", flush=True)


# --- inputs ------------------------------------------------------------------------------------


def sensitive_products(catalog: pa.Table, config: Path) -> np.ndarray:
    """Sensitive product ids (sorted) by `policy.sensitive_mask`, as the trainer computes them,
    checked against a plain match of the listed categories and departments."""
    from nextbest.config import load_settings
    from nextbest.policy import sensitive_mask

    mask = sensitive_mask(catalog, load_settings(config).policy)
    cats = {c.upper() for c in SENSITIVE_CATEGORIES}
    deps = {d.upper() for d in SENSITIVE_DEPARTMENTS}
    columns = [catalog[c].to_pylist() for c in ("category", "department", "sensitivity")]
    plain = np.array(
        [
            (c or "").upper() in cats or (d or "").upper() in deps or (s or 0) > 0
            for c, d, s in zip(*columns, strict=True)
        ]
    )
    if not np.array_equal(mask, plain):
        raise SystemExit("policy.sensitive_mask disagrees with a plain category/department match")
    return np.sort(np.asarray(catalog["product_id"].filter(pa.array(mask)).to_pylist(), dtype=str))


def check_catalog(catalog: pa.Table) -> None:
    """Every listed category and department exists in the catalog (case-insensitive); print how
    many products each makes sensitive."""
    missing = []
    for column, listed in (
        ("category", SENSITIVE_CATEGORIES),
        ("department", SENSITIVE_DEPARTMENTS),
    ):
        values = pc.utf8_upper(pc.fill_null(catalog[column], ""))
        for name in listed:
            n = pc.sum(pc.equal(values, name.upper())).as_py() or 0
            print(f"  {column} {name!r}: {n:,} products")
            if not n:
                missing.append(f"{column} {name!r}")
    if missing:
        raise SystemExit(f"not in the catalog: {', '.join(missing)}")


def with_twins(
    events: pa.Table, sensitive_ids: np.ndarray, households: list[str]
) -> tuple[pa.Table, list[str]]:
    """The events plus a twin of the first TWINS of `households` that bought two or more
    distinct sensitive products: the same non-sensitive events, the events on the first of those
    products only (check 6). Returns the events and the households that got a twin."""
    on_sensitive = pc.is_in(events["product_id"], pa.array(sensitive_ids))
    bought = (
        events.filter(on_sensitive)
        .group_by("customer_id")
        .aggregate([("product_id", "count_distinct"), ("product_id", "min")])
    )
    first = {
        c: p
        for c, n, p in zip(
            bought["customer_id"].to_pylist(),
            bought["product_id_count_distinct"].to_pylist(),
            bought["product_id_min"].to_pylist(),
            strict=True,
        )
        if n >= 2
    }
    chosen = [c for c in households if c in first][:TWINS]
    mine = events.filter(pc.is_in(events["customer_id"], pa.array(chosen)))
    sens = pc.is_in(mine["product_id"], pa.array(sensitive_ids)).to_numpy(zero_copy_only=False)
    at = pc.index_in(mine["customer_id"], value_set=pa.array(chosen))
    firsts = pc.take(pa.array([first[c] for c in chosen]), at)
    keep_first = pc.equal(mine["product_id"], firsts).to_numpy(zero_copy_only=False)
    twins = mine.filter(pa.array(~sens | keep_first))
    twins = twins.set_column(
        twins.schema.get_field_index("customer_id"),
        "customer_id",
        pc.binary_join_element_wise(TWIN, twins["customer_id"], ""),
    )
    return pa.concat_tables([events, twins.cast(events.schema)]), chosen


def write_consent(path: Path, no_sensitive: list[str], with_sensitive: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["customer_id", "purpose", "granted", "updated_at"])
        for ids, sensitive in ((no_sensitive, "false"), (with_sensitive, "true")):
            for c in ids:
                out.writerow([c, "personalization", "true", CONSENT_TIME])
                out.writerow([c, "sensitive", sensitive, CONSENT_TIME])


# --- the checks --------------------------------------------------------------------------------


def stream(stub, requests: list) -> list:
    """One StreamRecommendations call; answers checked for order and errors."""
    answers = list(stub.StreamRecommendations(iter(requests), timeout=600))
    if len(answers) != len(requests):
        raise SystemExit(f"stream: {len(answers)} answers to {len(requests)} requests")
    for request, answer in zip(requests, answers, strict=True):
        if answer.request_id != request.request_id or answer.HasField("error"):
            raise SystemExit(f"stream answer for {request.customer_id} is wrong: {answer}")
    return answers


def evidence(answer) -> list:
    """Items and their reasons (kind, cited product) of a RecommendProducts answer."""
    return [(i.product_id, [(r.kind, r.product_id) for r in i.reasons]) for i in answer.items]


def count_items(answers: list, sensitive: set[str]) -> dict[str, int]:
    """Items, sensitive items, reasons citing a sensitive product, households with a sensitive
    item, personalized answers."""
    out = dict(items=0, sensitive=0, reasons=0, households=0, personalized=0)
    for a in answers:
        bad = sum(i.product_id in sensitive for i in a.items)
        out["items"] += len(a.items)
        out["sensitive"] += bad
        out["households"] += bad > 0
        out["personalized"] += a.personalized
        out["reasons"] += sum(r.product_id in sensitive for i in a.items for r in i.reasons)
    return out


def audit_recommend(
    audit: Audit,
    stub,
    pb,
    groups: dict[str, list[str]],
    buyers: set[str],
    sensitive: set[str],
) -> None:
    def requests(ids: list[str], channel: int = pb.CHANNEL_EMAIL, **kw) -> list:
        return [
            pb.RecommendProductsRequest(
                customer_id=c, limit=LIMIT, channel=channel, request_id=str(k), **kw
            )
            for k, c in enumerate(ids)
        ]

    no, yes = groups["no"], groups["yes"]
    pop_no, pop_yes = f"{len(no):,} households", f"{len(yes):,} households"
    listed = [*SENSITIVE_CATEGORIES, *SENSITIVE_DEPARTMENTS]

    audit.section = (
        f"RecommendProducts via StreamRecommendations (email, limit {LIMIT}), without sensitive "
        "consent"
    )
    t0 = time.perf_counter()
    answers = stream(stub, requests(no))
    c = count_items(answers, sensitive)
    audit.add("personalized answers", pop_no, c["personalized"])
    audit.add("items returned", pop_no, c["items"])
    audit.add("households that bought sensitive products", pop_no, len(buyers & set(no)))
    audit.add("sensitive items", pop_no, c["sensitive"], "= 0")
    audit.add("reasons citing a sensitive product", pop_no, c["reasons"], "= 0")
    for name, kw in (
        ("include_purchased=true", {"include_purchased": True}),
        ("include_categories=the sensitive ones", {"include_categories": listed}),
    ):
        c = count_items(stream(stub, requests(no, **kw)), sensitive)
        audit.add(f"{name}: items returned", pop_no, c["items"])
        audit.add(f"{name}: sensitive items", pop_no, c["sensitive"], "= 0")
        audit.add(f"{name}: sensitive reasons", pop_no, c["reasons"], "= 0")

    audit.section = "RecommendProducts, customers unknown to the model, no consent records"
    unknown = [f"audit-unknown-{k}" for k in range(UNKNOWN)]
    c = count_items(stream(stub, requests(unknown)), sensitive)
    audit.add("sensitive items", f"{UNKNOWN} customers", c["sensitive"], "= 0")
    audit.add("reasons citing a sensitive product", f"{UNKNOWN} customers", c["reasons"], "= 0")

    audit.section = "RecommendProducts, with sensitive consent"
    answers_yes = stream(stub, requests(yes))
    c = count_items(answers_yes, sensitive)
    got = {a.customer_id for a in answers_yes if any(i.product_id in sensitive for i in a.items)}
    cited = {
        a.customer_id
        for a in answers_yes
        if any(r.product_id in sensitive for i in a.items for r in i.reasons)
    }
    audit.add("personalized answers", pop_yes, c["personalized"])
    audit.add("sensitive items", pop_yes, c["sensitive"])
    audit.add("households that bought sensitive products", pop_yes, len(buyers & set(yes)))
    audit.add("households with a sensitive item", pop_yes, len(got))
    audit.add("... of which bought sensitive products", pop_yes, len(got & buyers), "> 0")
    audit.add("households with a reason citing one", pop_yes, len(cited))
    c = count_items(stream(stub, requests(yes, include_purchased=True)), sensitive)
    audit.add("include_purchased=true: sensitive items", pop_yes, c["sensitive"])

    audit.section = "RecommendProducts on CHANNEL_WEB (less exposed than email), for comparison"
    for ids, pop, label, expect in (
        (no, pop_no, "without", "= 0"),
        (yes, pop_yes, "with", ""),
    ):
        web = stream(stub, requests(ids, pb.CHANNEL_WEB))
        c = count_items(web, sensitive)
        audit.add(f"{label} sensitive consent: sensitive items", pop, c["sensitive"], expect)
        audit.add(f"{label} sensitive consent: sensitive reasons", pop, c["reasons"], expect)
        audit.add(f"{label} sensitive consent: households with one", pop, c["households"])

    audit.section = (
        f"RecommendProducts unary against the stream's answer ({UNARY_SAMPLE} per group)"
    )
    by_customer = {a.customer_id: a for a in [*answers, *answers_yes]}
    differ = scores = 0
    delta = 0.0
    for ids in (no[:UNARY_SAMPLE], yes[:UNARY_SAMPLE]):
        for r in requests(ids):
            unary = stub.RecommendProducts(r, timeout=30)
            streamed = by_customer[r.customer_id]
            same = evidence(unary) == evidence(streamed)
            differ += not same or unary.personalized != streamed.personalized
            pairs = list(zip(unary.items, streamed.items, strict=False))
            scores += any(u.score != s.score for u, s in pairs)
            delta = max([delta, *(abs(u.score - s.score) for u, s in pairs)])
    pop = f"{2 * UNARY_SAMPLE} households"
    audit.add("answers with other items or reasons", pop, differ, "= 0")
    audit.add(f"answers with other scores (max |diff| {delta:.1g})", pop, scores)
    print(f"  RecommendProducts checks: {time.perf_counter() - t0:.1f} s", flush=True)


def guide_sets(content: pa.Table, catalog: pa.Table, model_items: np.ndarray, sensitive: set[str]):
    """Guides whose products the server can link (their products and the model's products of
    their categories, matched as category or department) are all sensitive, some, or none."""
    cat_up = [(c or "").upper() for c in catalog["category"].to_pylist()]
    dep_up = [(d or "").upper() for d in catalog["department"].to_pylist()]
    ids = catalog["product_id"].to_pylist()
    in_model = set(model_items.tolist())
    by_group: dict[str, set[str]] = {}
    for p, c, d in zip(ids, cat_up, dep_up, strict=True):
        if p in in_model:
            for key in {c, d} - {""}:
                by_group.setdefault(key, set()).add(p)
    all_s, mixed, none = [], [], []
    for cid, products, categories in zip(
        content["content_id"].to_pylist(),
        content["product_ids"].to_pylist(),
        content["categories"].to_pylist(),
        strict=True,
    ):
        linked = {p for p in products or [] if p in in_model}
        for c in categories or []:
            linked |= by_group.get(c.upper(), set())
        if not linked:
            continue
        n = len(linked & sensitive)
        (all_s if n == len(linked) else mixed if n else none).append(cid)
    return all_s, mixed, none


def unary_all(method, requests: list) -> Iterable:
    """The replies of a unary RPC to each request, in order, IN_FLIGHT calls at a time."""
    for lo in range(0, len(requests), IN_FLIGHT):
        calls = [method.future(r, timeout=60) for r in requests[lo : lo + IN_FLIGHT]]
        for call in calls:
            yield call.result()


def audit_content(
    audit: Audit,
    stub,
    pb,
    groups: dict[str, list[str]],
    content: pa.Table,
    guides: tuple[list[str], list[str], list[str]],
    sensitive: set[str],
    sensitive_in_model: np.ndarray,
) -> None:
    all_s, mixed, none = guides
    rng = np.random.default_rng(11)
    others = sorted(rng.choice(none, size=min(OTHER_GUIDES, len(none)), replace=False).tolist())
    inline = [
        pb.ContentCandidate(content_id=f"inline-{name}", title=name, categories=[name])
        for name in (*SENSITIVE_CATEGORIES, *SENSITIVE_DEPARTMENTS)
    ]
    inline.append(
        pb.ContentCandidate(
            content_id="inline-sensitive-products",
            title="sensitive products",
            product_ids=sensitive_in_model[:50].tolist(),
        )
    )
    candidates = [pb.ContentCandidate(content_id=c) for c in [*all_s, *mixed, *others]] + inline
    sensitive_ids = set(all_s) | {c.content_id for c in inline}
    marked = dict(
        zip(content["content_id"].to_pylist(), content["sensitivity"].to_pylist(), strict=True)
    )
    audit.section = (
        f"ScoreContent (email): {len(all_s)} guides linking only sensitive products, "
        f"{len(mixed)} mixed, {len(others)} others, {len(inline)} inline sensitive candidates"
    )
    audit.add(
        "sensitive guides marked sensitive in the snapshot",
        f"{len(all_s)} guides",
        sum((marked.get(c) or 0) > 0 for c in all_s),
    )
    t0 = time.perf_counter()
    for group, label in (("no", "without"), ("yes", "with")):
        ids = groups[group]
        counts = dict(reasons=0, sens_relevant=0, other_relevant=0, personalized=0, households=0)
        requests = [
            pb.ScoreContentRequest(customer_id=c, candidates=candidates, channel=pb.CHANNEL_EMAIL)
            for c in ids
        ]
        for reply in unary_all(stub.ScoreContent, requests):
            counts["personalized"] += reply.personalized
            leak = False
            for item in reply.items:
                bad = sum(r.product_id in sensitive for r in item.reasons)
                counts["reasons"] += bad
                if item.content_id in sensitive_ids:
                    counts["sens_relevant"] += item.relevance > 0
                    leak |= item.relevance > 0
                else:
                    counts["other_relevant"] += item.relevance > 0
                leak |= bad > 0
            counts["households"] += leak
        pop = f"{len(ids):,} households"
        zero = "= 0" if group == "no" else ""
        audit.add(f"{label} sensitive consent: personalized answers", pop, counts["personalized"])
        audit.add(
            f"{label} sensitive consent: other content, relevance > 0",
            pop,
            counts["other_relevant"],
        )
        audit.add(
            f"{label} sensitive consent: sensitive content, relevance > 0",
            pop,
            counts["sens_relevant"],
            zero,
        )
        audit.add(
            f"{label} sensitive consent: reasons citing a sensitive product",
            pop,
            counts["reasons"],
            zero,
        )
        audit.add(
            f"{label} sensitive consent: households with either", pop, counts["households"], zero
        )
    print(f"  ScoreContent checks: {time.perf_counter() - t0:.1f} s", flush=True)


def audit_similar(
    audit: Audit,
    stub,
    pb,
    groups: dict[str, list[str]],
    model_items: np.ndarray,
    sensitive: set[str],
    buyers: set[str],
    sample: int,
) -> None:
    is_s = np.array([p in sensitive for p in model_items.tolist()])
    rng = np.random.default_rng(5)
    inputs = {
        kind: np.sort(rng.choice(pool, size=min(sample, len(pool)), replace=False))
        for kind, pool in (("sensitive", model_items[is_s]), ("other", model_items[~is_s]))
    }
    no = groups["no"]
    yes = [c for c in groups["yes"] if c in buyers] or groups["yes"]
    audit.section = (
        f"SimilarProducts (limit {LIMIT}), one product per call; the customer_id cycles through "
        "the group (with consent: its households that bought sensitive products)"
    )
    t0 = time.perf_counter()
    for kind, products in inputs.items():
        pop = f"{len(products)} {kind} products"
        for who, customers in (("no customer", None), ("without", no), ("with", yes)):
            bad = items = 0
            requests = [
                pb.SimilarProductsRequest(
                    product_ids=[product],
                    limit=LIMIT,
                    customer_id="" if customers is None else customers[k % len(customers)],
                )
                for k, product in enumerate(products.tolist())
            ]
            for reply in unary_all(stub.SimilarProducts, requests):
                items += len(reply.items)
                bad += sum(i.product_id in sensitive for i in reply.items)
            what, expect = f"customer {who} sensitive consent", "= 0"
            if who == "with":
                expect = "> 0" if kind == "sensitive" else ""
            elif customers is None:
                what = "no customer_id"
            audit.add(f"{what}: items returned", pop, items)
            audit.add(f"{what}: sensitive items", pop, bad, expect)
    print(f"  SimilarProducts checks: {time.perf_counter() - t0:.1f} s", flush=True)


def named_products(value, sensitive: set[str]) -> int:
    """Sensitive product ids anywhere in a message's text or a JSON document: as a field's
    value or a word of a sentence."""
    import re

    text = value if isinstance(value, str) else str(value)
    return sum(word in sensitive for word in re.findall(r"[A-Za-z0-9_.-]+", text))


def audit_explain(
    audit: Audit,
    stub,
    pb,
    groups: dict[str, list[str]],
    bought: dict[str, list[str]],
    sensitive: set[str],
    sensitive_in_model: np.ndarray,
) -> None:
    """ExplainRecommendation agrees with RecommendProducts, and never describes a sensitive
    product to a household without sensitive consent."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(17)
    others = [str(p) for p in rng.choice(sensitive_in_model, 3, replace=False)]
    known = set(sensitive_in_model.tolist())
    for group, label in (("no", "without"), ("yes", "with")):
        ids = [c for c in groups[group] if bought.get(c)][:EXPLAIN_SAMPLE]
        pop = f"{len(ids)} households"
        audit.section = (
            f"ExplainRecommendation {label} sensitive consent (households that bought sensitive "
            "products)"
        )
        items = disagree = leaks = 0
        for c in ids:
            answer = stub.RecommendProducts(
                pb.RecommendProductsRequest(customer_id=c, limit=LIMIT), timeout=30
            )
            for rank, item in enumerate(answer.items, 1):
                e = stub.ExplainRecommendation(
                    pb.ExplainRecommendationRequest(
                        customer_id=c, product_id=item.product_id, limit=LIMIT
                    ),
                    timeout=30,
                )
                items += 1
                disagree += not (e.in_answer and e.rank == rank and e.score == item.score)
                disagree += list(e.reasons) != list(item.reasons)
                leaks += named_products(e, sensitive)
        audit.add("items of the answers explained", pop, items)
        audit.add("explanations that disagree with the answer", pop, disagree, "= 0")
        expect = "= 0" if group == "no" else ""
        audit.add("... naming a sensitive product", pop, leaks, expect)
        asked = hidden = described = leaks = 0
        for c in ids:
            for product in [*[p for p in bought[c] if p in known][:3], *others]:
                for purchased in (False, True):
                    e = stub.ExplainRecommendation(
                        pb.ExplainRecommendationRequest(
                            customer_id=c,
                            product_id=product,
                            limit=LIMIT,
                            include_purchased=purchased,
                        ),
                        timeout=30,
                    )
                    asked += 1
                    hidden += e.removed_by == pb.RULE_SENSITIVITY and not e.product_id
                    described += bool(e.product_id or e.title or e.reasons or e.HasField("terms"))
                    leaks += named_products(e, sensitive)
        audit.add("sensitive products explained (also include_purchased)", pop, asked)
        if group == "no":
            audit.add("... not hidden (RULE_SENSITIVITY, no id)", pop, asked - hidden, "= 0")
            audit.add("... described (id, title, reasons or terms)", pop, described, "= 0")
            audit.add("... naming a sensitive product", pop, leaks, "= 0")
        else:
            audit.add("... described (consent given)", pop, described, "> 0")
    print(f"  ExplainRecommendation checks: {time.perf_counter() - t0:.1f} s", flush=True)


def audit_export(
    audit: Audit, channel, groups: dict[str, list[str]], bought, sensitive: set[str]
) -> None:
    """ExportCustomerData of households that bought sensitive products: without sensitive
    consent, no sensitive product anywhere in it and no model history used under `sensitive`."""
    import json

    from nextbest.v1 import consent_pb2 as cpb
    from nextbest.v1 import consent_pb2_grpc

    stub = consent_pb2_grpc.ConsentStub(channel)
    t0 = time.perf_counter()
    for group, label in (("no", "without"), ("yes", "with")):
        ids = [c for c in groups[group] if bought.get(c)][:EXPLAIN_SAMPLE]
        pop = f"{len(ids)} households"
        audit.section = f"ExportCustomerData {label} sensitive consent"
        leaks = used = impressions = 0
        for c in ids:
            doc: dict = {}
            request = cpb.ExportCustomerDataRequest(customer_id=c, source="audit-privacy")
            for chunk in stub.ExportCustomerData(request, timeout=60):
                value = json.loads(chunk.json)
                if chunk.page:
                    doc.setdefault(chunk.section, []).extend(value)
                else:
                    doc[chunk.section] = value
            leaks += named_products(json.dumps(doc), sensitive)
            history = (doc.get("model") or {}).get("history") or {}
            used += "sensitive" in history.get("purposes", [])
            impressions += len(doc.get("impressions", []))
        audit.add("impressions exported", pop, impressions)
        if group == "no":
            audit.add("exports naming a sensitive product", pop, leaks, "= 0")
            audit.add("model history used under `sensitive`", pop, used, "= 0")
        else:
            audit.add("model history used under `sensitive`", pop, used, "> 0")
    print(f"  ExportCustomerData checks: {time.perf_counter() - t0:.1f} s", flush=True)


def audit_consent(audit: Audit, channel, groups: dict[str, list[str]]) -> None:
    """Consent.GetConsent agrees with the file for a sample of each group."""
    from nextbest.v1 import consent_pb2 as cpb
    from nextbest.v1 import consent_pb2_grpc

    stub = consent_pb2_grpc.ConsentStub(channel)
    audit.section = "Consent in the store (Consent.GetConsent), 20 households per group"
    wrong = 0
    for group, sensitive in (("no", False), ("yes", True)):
        for customer in groups[group][:20]:
            reply = stub.GetConsent(cpb.GetConsentRequest(customer_id=customer), timeout=10)
            got = {v.purpose: v.granted for v in reply.consents}
            wrong += got.get(cpb.PURPOSE_PERSONALIZATION) is not True
            wrong += got.get(cpb.PURPOSE_SENSITIVE) is not sensitive
    audit.add("values that differ from the consent file", "40 households", wrong, "= 0")


def audit_twins(audit: Audit, channel, stub, pb, twins: list[str], content: pa.Table) -> None:
    """Check 6: withdraw sensitive consent of the twins and their originals, then compare."""
    from nextbest.v1 import consent_pb2 as cpb
    from nextbest.v1 import consent_pb2_grpc

    consent = consent_pb2_grpc.ConsentStub(channel)
    pairs = [(c, TWIN + c) for c in twins]
    withdraw = dict(purpose=cpb.PURPOSE_SENSITIVE, granted=False, source="audit-withdrawal")
    for customer in (c for pair in pairs for c in pair):
        consent.SetConsent(cpb.SetConsentRequest(customer_id=customer, **withdraw), timeout=10)
    pop = f"{len(pairs)} pairs"
    audit.section = (
        "Sensitive purchases as evidence: twins (same non-sensitive history, other sensitive "
        "purchases), sensitive consent withdrawn after training"
    )
    audit.add("pairs", pop, len(pairs), "> 0")
    for label, kind in (("email", pb.CHANNEL_EMAIL), ("web", pb.CHANNEL_WEB)):
        requests = [
            pb.RecommendProductsRequest(customer_id=c, limit=LIMIT, channel=kind, request_id=c)
            for pair in pairs
            for c in pair
        ]
        answers = stream(stub, requests)
        personal = differ = 0
        for a, b in zip(answers[0::2], answers[1::2], strict=True):
            personal += a.personalized and b.personalized
            # Scores within 1e-6: the same numbers, computed at another place of a batch.
            same = evidence(a) == evidence(b) and all(
                abs(x.score - y.score) <= 1e-6 for x, y in zip(a.items, b.items, strict=True)
            )
            differ += not same
        audit.add(f"RecommendProducts ({label}): both personalized", pop, personal, "> 0")
        audit.add(f"RecommendProducts ({label}): answers that differ", pop, differ, "= 0")
    guides = [pb.ContentCandidate(content_id=c) for c in content["content_id"].to_pylist()[:50]]
    requests = [
        pb.ScoreContentRequest(customer_id=c, candidates=guides, channel=pb.CHANNEL_EMAIL)
        for pair in pairs
        for c in pair
    ]
    replies = list(unary_all(stub.ScoreContent, requests))
    differ = sum(
        [i.content_id for i in a.items] != [i.content_id for i in b.items]
        or any(abs(x.relevance - y.relevance) > 1e-6 for x, y in zip(a.items, b.items, strict=True))
        for a, b in zip(replies[0::2], replies[1::2], strict=True)
    )
    audit.add("ScoreContent: relevances that differ", pop, differ, "= 0")


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", required=True)
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--content", required=True, help="content.parquet of nextbest prepare")
    parser.add_argument("--work-dir", default="data/audit-privacy", help="config, model, store")
    parser.add_argument("--similar-sample", type=int, default=200, help="products per kind")
    parser.add_argument(
        "--cf-model",
        default="als",
        choices=("als", "bpr", "cosine", "bm25"),
        help="train.cf_model of the audited model (make audit-privacy runs each)",
    )
    args = parser.parse_args()
    # SIGTERM stops the audit like Ctrl-C: the `finally` below stops the server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t_start = time.perf_counter()

    import grpc

    from nextbest.store.artifacts import load_bundle
    from nextbest.v1 import recommender_pb2 as pb
    from nextbest.v1 import recommender_pb2_grpc

    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "audit.toml"
    config.write_text(
        CONFIG.format(
            cf_model=args.cf_model,
            sensitive_categories=toml_list(SENSITIVE_CATEGORIES),
            sensitive_departments=toml_list(SENSITIVE_DEPARTMENTS),
        )
    )
    print(f"config: {config.relative_to(ROOT)}")

    catalog = pq.read_table(args.catalog)
    check_catalog(catalog)
    sensitive_ids = sensitive_products(catalog, config)
    sensitive = set(sensitive_ids.tolist())
    print(f"  {len(sensitive):,} of {catalog.num_rows:,} catalog products are sensitive")

    events = pq.read_table(args.events, columns=["customer_id", "product_id", "event_type"])
    events = events.filter(pc.equal(events["event_type"], "purchase"))
    households = sorted(pc.unique(events["customer_id"]).to_pylist())
    on_sensitive = pc.is_in(events["product_id"], pa.array(sensitive_ids))
    buyers = set(pc.unique(events["customer_id"].filter(on_sensitive)).to_pylist())
    bought: dict[str, list[str]] = {}
    on = events.filter(on_sensitive)
    for c, p in zip(on["customer_id"].to_pylist(), on["product_id"].to_pylist(), strict=True):
        if p not in bought.setdefault(c, []):
            bought[c].append(p)
    groups = {"no": households[0::2], "yes": households[1::2]}
    print(
        f"{len(households):,} households: {len(groups['no']):,} personalization only (even rank "
        f"in id order), {len(groups['yes']):,} personalization + sensitive (odd rank); "
        f"{len(buyers):,} bought sensitive products "
        f"({pc.sum(on_sensitive).as_py():,} of {events.num_rows:,} purchases)"
    )

    events_file = work / "events-with-twins.parquet"
    augmented, twins = with_twins(pq.read_table(args.events), sensitive_ids, groups["yes"])
    pq.write_table(augmented, events_file)
    del augmented
    print(f"{len(twins)} households with sensitive consent given a twin (check 6)")
    consent = work / "consent.csv"
    write_consent(consent, groups["no"], [*groups["yes"], *(TWIN + c for c in twins)])
    db = work / "store.db"
    for path in (db, db.with_name("store.db-wal"), db.with_name("store.db-shm")):
        path.unlink(missing_ok=True)
    store = f"sqlite:///{db}"
    cli = nextbest_cli()
    print(f"consent import into a fresh store {db.relative_to(ROOT)}:", flush=True)
    run(
        [*cli, "consent", "import", str(consent), "--store", store, "--source", "audit"],
        work / "consent-import.log",
        show="records",
    )
    models_dir = work / "models"
    shutil.rmtree(models_dir, ignore_errors=True)
    print(f"training ({args.cf_model} only, no tuning):", flush=True)
    run(
        [
            *cli,
            "train",
            "--config",
            str(config),
            "--events",
            str(events_file),
            "--catalog",
            args.catalog,
            "--content",
            args.content,
            "--consent",
            str(consent),
            "--store",
            store,
            "--models-dir",
            str(models_dir),
            "--no-progress",
        ],
        work / "train.log",
        show="consent:",
    )
    bundle = load_bundle(models_dir)
    model_items = np.asarray(bundle.item_ids, dtype=str)
    in_model = np.isin(model_items, sensitive_ids)
    sensitive_in_model = np.sort(model_items[in_model])
    content = bundle.content
    users = set(np.asarray(bundle.user_ids, dtype=str).tolist())
    print(
        f"model {bundle.version}: {len(users):,} customers, {len(model_items):,} products "
        f"({len(sensitive_in_model):,} sensitive), {content.num_rows:,} content items"
    )
    guides = guide_sets(content, catalog, model_items, sensitive)
    del bundle

    audit = Audit()
    audit.section = "Inputs"
    audit.add("sensitive catalog products", f"{catalog.num_rows:,} products", len(sensitive), "> 0")
    audit.add("sensitive products in the model", f"{len(model_items):,} products", in_model.sum())
    for name in ("no", "yes"):
        missing = sum(c not in users for c in groups[name])
        label = "without" if name == "no" else "with"
        audit.add(
            f"households {label} sensitive consent not in the model",
            f"{len(groups[name]):,} households",
            missing,
        )

    serve = [*cli, "serve", "--config", str(config), "--models-dir", str(models_dir)]
    serve += ["--store", store, "--port", "0"]
    server = ServerProcess("nextbest serve", serve, work / "server.log")
    try:
        address = server.wait_ready()
        with grpc.insecure_channel(address) as channel:
            wait_serving(channel)
            print(f"nextbest serve on {address} (log {server.log_path.relative_to(ROOT)})")
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            audit_consent(audit, channel, groups)
            audit_recommend(audit, stub, pb, groups, buyers, sensitive)
            audit_content(audit, stub, pb, groups, content, guides, sensitive, sensitive_in_model)
            audit_similar(
                audit, stub, pb, groups, model_items, sensitive, buyers, args.similar_sample
            )
            audit_explain(audit, stub, pb, groups, bought, sensitive, sensitive_in_model)
            audit_export(audit, channel, groups, bought, sensitive)
            audit_twins(audit, channel, stub, pb, twins, content)  # last: withdraws consent
    finally:
        server.stop()

    print()
    print(audit.table())
    failed = audit.failed
    checked = sum(r.result != "info" for r in audit.rows)
    print(
        f"\n{checked - len(failed)} of {checked} invariants hold"
        + (f"; FAILED: {', '.join(r.what for r in failed)}" if failed else "")
        + f" ({time.perf_counter() - t_start:.0f} s)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
