"""`make mutate`: mutation testing (mutmut, configured in pyproject.toml [tool.mutmut]) of the
rules that must never regress silently, then the score and every surviving mutant.

The functions mutated: the auth roles (auth.py), the consent and privacy rules (policy.py, the
value rule: value_rule.py and ServedModel._privacy_rule), the consent store's gating and
erasure, and request validation (server.py). mutmut runs, for each mutant, only the tests of
`pytest_add_cli_args_test_selection` that reach the mutated function.

    python benchmarks/mutate.py            # fresh run (mutants/ is rebuilt)
    python benchmarks/mutate.py --report   # the score of the last run, without running

Exits 1 when the score is below --min-score (default 90%).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTMUT = [sys.executable, "-m", "mutmut"]
STORE = "nextbest.store.consent_store"
TARGETS = {
    "auth roles": ["nextbest.auth.*"],
    "consent and privacy rules": [
        "nextbest.policy.*",
        "nextbest.value_rule.*",
        "nextbest.service.xǁServedModelǁ_privacy_rule__mutmut_*",
    ],
    "consent store gating and erasure": [
        f"{STORE}.x__check_customer__mutmut_*",
        f"{STORE}.x__check_purpose__mutmut_*",
        f"{STORE}.x__check_source__mutmut_*",
        f"{STORE}.x__naive_utc__mutmut_*",
        f"{STORE}.x__drop_erased__mutmut_*",
        f"{STORE}.x__latest_per_key__mutmut_*",
        *(
            f"{STORE}.xǁStoreǁ{m}__mutmut_*"
            for m in (
                "set_consent",
                "get_consent",
                "consent_state",
                "import_consent",
                "forget",
                "erased",
                "tombstones",
                "record_events",
                "record_impressions",
                "events",
            )
        ),
    ],
    "request validation": [
        f"nextbest.server.x_{f}__mutmut_*"
        for f in ("_id", "_ids", "_limit", "_channel", "product_query", "_purpose")
    ],
}


SQL = re.compile(
    r"\b(select|insert|update|delete|where|values|from|order by|on conflict|excluded|when|then"
    r"|else|end|and|text|exclusive|is not null)\b|nextbest_",
    re.IGNORECASE,
)
EQUIVALENT = [
    (
        lambda old, new: old.replace("zero_copy_only=False", "zero_copy_only=None") == new,
        "to_numpy(zero_copy_only=None): pyarrow reads None as False",
    ),
    (
        lambda old, new: (
            re.sub(r",? ?strict=True,?", "", old).strip()
            == re.sub(r",? ?strict=(None|False),?", "", new).replace(", )", ")").strip()
            or (old.strip() == "strict=True," and new.strip() in ("", "):"))
        ),
        "zip(strict=...): the sequences are columns of one table (or rows of one query), equal "
        "in length by construction, so the check never fires",
    ),
    (
        lambda old, new: old != new and old.lower() == new.lower() and bool(SQL.search(old)),
        "the case of SQL: keywords, unquoted names and lock modes are case-blind in SQLite and "
        "PostgreSQL",
    ),
    (
        lambda old, new: (
            old != new
            and old.lower() == new.lower()
            and re.fullmatch(r'"[a-z_, ()]+"', old) is not None
            and ("_at" in old or "granted" in old)
        ),
        "the case of a list of SQL column names (unquoted, so case-blind)",
    ),
    (
        lambda old, new: (
            "dtype=np.int64)" in old
            and ("shown.get(" in old or "else np.zeros(len(items)" in old)
            and new
            in (
                old.replace("dtype=np.int64)", "dtype=None)"),
                old.replace(", dtype=np.int64)", ", )"),
            )
        ),
        "the impression counts are ints, so the inferred dtype is int64 too (and when nothing "
        "was shown they are all 0, only compared with the fatigue cap and scaled: as floats too)",
    ),
    (
        lambda old, new: old.strip() == "if shown" and new.strip() == "if (shown) or True",
        "the shortcut for nothing shown: counting over an empty dict gives the same zeros",
    ),
    (
        lambda old, new: (
            old.strip() == "if not erased or not len(customers):"
            and new.strip() == "if not erased and not len(customers):"
        ),
        "the shortcut for no tombstone or no customer: the general path gives the same all-False "
        "(or empty) bool array for either",
    ),
    (
        lambda old, new: (
            old.strip() == "if start < 0 or end < 0:"
            and new.strip() in ("if start < 0 or end <= 0:", "if start < 0 or end < 1:")
        ),
        "a found END marker is searched from the BEGIN marker on, so it is never at position 0",
    ),
    (
        lambda old, new: (
            old.strip() == "if len(chosen) < limit:" and new.strip() == "if len(chosen) <= limit:"
        ),
        "a full list asks best_sellers_for for 0 more, which adds nothing and says nothing",
    ),
    (
        lambda old, new: (
            "best_sellers_for(b, 1," in old
            and new == old.replace("best_sellers_for(b, 1,", "best_sellers_for(b, 2,")
        ),
        "best_sellers_for gives the same row to every user; only row 0 is read",
    ),
    (
        lambda old, new: (
            'kind="stable"' in old and new == old.replace('kind="stable"', 'kind="STABLE"')
        ),
        "numpy reads the sort kind case-blind",
    ),
    (
        lambda old, new: (
            "required=False" in old and new == old.replace("required=False", "required=None")
        ),
        "required=None is falsy, as False",
    ),
    (
        lambda old, new: old.replace("use_threads=False", "use_threads=None") == new,
        "group_by(use_threads=None): None is read as False (the order of the rows is kept)",
    ),
    (
        lambda old, new: (
            re.sub(r", pa\.(string|float64|timestamp)\([^)]*\)\)", ", None)", old) == new
            or re.sub(r", pa\.(string|float64|timestamp)\([^)]*\)\)", ", )", old) == new
        ),
        "pa.array without its type: the values are str, float or datetime, so the inferred "
        "type is the same (an all-null column is cast by Table.from_arrays(schema=...))",
    ),
    (
        lambda old, new: "token_urlsafe(32)" in old and new == old.replace("(32)", "(None)"),
        "secrets.token_urlsafe(None) uses the default, 32 bytes",
    ),
    (
        lambda old, new: ".partition(" in old and new == old.replace(".partition(", ".rpartition("),
        "a gRPC method is /package.Service/Method: one '/' after the first, so partition and "
        "rpartition split it alike",
    ),
    (
        lambda old, new: (
            'lstrip("/")' in old and new == old.replace('lstrip("/")', 'lstrip("XX/XX")')
        ),
        "lstrip('XX/XX') strips the characters X and '/': no service name starts with X",
    ),
    (
        lambda old, new: (
            '(authorization or "")' in old
            and new == old.replace('(authorization or "")', '(authorization or "XXXX")')
        ),
        "no header → 'XXXX': no space, so the scheme is 'XXXX' and the call is refused as for ''",
    ),
    (
        lambda old, new: old.strip() == "keep &= ~gone" and new.strip() == "keep = ~gone",
        "keep is all True before the erasure step: &= and = give the same mask",
    ),
    (
        lambda old, new: (
            'fill_null(catalog[column], "")' in old
            and new
            in (
                old.replace('fill_null(catalog[column], "")', "fill_null(catalog[column], None)"),
                old.replace('fill_null(catalog[column], "")', 'fill_null(catalog[column], "XXXX")'),
            )
        ),
        "a product without a category or department matches no listed name either way (is_in "
        "of a null is false; no listed name is 'XXXX')",
    ),
    (
        lambda old, new: (
            "self.granted.get(purpose, {})" in old
            and new
            in (
                old.replace("get(purpose, {})", "get(purpose, None)"),
                old.replace("get(purpose, {})", "get(purpose, )"),
            )
        ),
        "granted.get(purpose) → None: `if not records` takes None as it takes {}",
    ),
    (
        lambda old, new: (
            "np.fromiter(records.values(), dtype=bool, count=len(records))" in old
            and new
            in (
                old.replace("dtype=bool", "dtype=None"),
                old.replace(", count=len(records)", ", "),
            )
        ),
        "np.fromiter without dtype bool gives 0.0/1.0, assigned into a bool array: the same; "
        "count only preallocates",
    ),
    (
        lambda old, new: (
            "pc.fill_null(idx, 0).to_numpy(zero_copy_only=False)" in old
            and new
            in (
                old.replace("fill_null(idx, 0)", "fill_null(idx, 1)"),
                old.replace("zero_copy_only=False", "zero_copy_only=True"),
            )
        ),
        "only the positions found are read back (the fill value is never used); the filled "
        "int32 array has no nulls, so zero-copy works",
    ),
    (
        lambda old, new: (
            "self._lock_customer(cur, customer_id)" in old
            and new == old.replace("(cur, customer_id)", "(cur, None)")
        ),
        "the per-customer lock only orders concurrent writers of one customer (an advisory lock "
        "on PostgreSQL, a no-op on SQLite, whose writes are serial): no single-threaded test "
        "sees it; tests/test_store.py's concurrency tests take whole-table locks first",
    ),
]
"""Mutations that change no behaviour, each with the reason: (old line, new line) → True."""


def equivalent_reason(diff: list[tuple[str, str]]) -> str | None:
    """The reason a mutant is equivalent, when every changed line pair matches one rule."""
    if not diff:
        return "the mutation changes only the layout of the code"
    reasons = []
    for old, new in diff:
        for rule, reason in EQUIVALENT:
            if rule(old.strip(), new.strip()):
                reasons.append(reason)
                break
        else:
            return None
    return reasons[0]


def changed_lines(name: str) -> list[tuple[str, str]]:
    """The (old, new) line pairs of a mutant's diff."""
    from mutmut.__main__ import find_mutant, get_diff_for_mutant  # in process: `mutmut show`

    lines = get_diff_for_mutant(name, path=find_mutant(name).path).splitlines()
    old = [x[1:] for x in lines if x.startswith("-") and not x.startswith("---")]
    new = [x[1:] for x in lines if x.startswith("+") and not x.startswith("+++")]
    if [x.strip() for x in old] == [x.strip() for x in new]:
        return []
    if len(old) != len(new):
        return [("\n".join(old), "\n".join(new))]
    return [(o, n) for o, n in zip(old, new, strict=True) if o.strip() != n.strip()]


def results() -> dict[str, str]:
    """mutant name → status (killed, survived, no tests, timeout, ...) of the last run."""
    done = subprocess.run(
        MUTMUT + ["results", "--all", "true"], cwd=REPO, capture_output=True, text=True, check=True
    )
    out = {}
    for line in done.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            out[name] = status
    return out


def group_of(name: str) -> str | None:
    for group, patterns in TARGETS.items():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return group
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only report the last run")
    parser.add_argument("--min-score", type=float, default=90.0)
    args = parser.parse_args()
    os.chdir(REPO)  # mutmut reads pyproject.toml and mutants/ from the working directory
    start = time.monotonic()
    if not args.report:
        shutil.rmtree(REPO / "mutants", ignore_errors=True)
        patterns = [p for group in TARGETS.values() for p in group]
        run = subprocess.run(MUTMUT + ["run", *patterns], cwd=REPO, stdout=subprocess.DEVNULL)
        if run.returncode != 0:
            print(f"error: mutmut run exited with {run.returncode}", file=sys.stderr)
            return 2
    by_group: dict[str, dict[str, str]] = {g: {} for g in TARGETS}
    for name, status in results().items():
        group = group_of(name)
        if group is not None:
            by_group[group][name] = status
    explained: dict[str, str] = {}
    survivors: list[tuple[str, str, list[tuple[str, str]]]] = []
    for statuses in by_group.values():
        for name, status in sorted(statuses.items()):
            if status in ("killed", "timeout"):
                continue
            diff = changed_lines(name)
            reason = equivalent_reason(diff)
            if reason is None:
                survivors.append((name, status, diff))
            else:
                explained[name] = reason
    total = killed = equivalent = 0
    print(f"{'module group':34} {'mutants':>8} {'killed':>7} {'equiv.':>7} {'score':>7}")
    for group, statuses in by_group.items():
        n = len(statuses)
        k = sum(s in ("killed", "timeout") for s in statuses.values())
        e = sum(name in explained for name in statuses)
        total, killed, equivalent = total + n, killed + k, equivalent + e
        print(f"{group:34} {n:8} {k:7} {e:7} {100 * k / max(n - e, 1):6.1f}%")
    score = 100 * killed / max(total - equivalent, 1)
    print(f"{'all':34} {total:8} {killed:7} {equivalent:7} {score:6.1f}%")
    print(
        f"score = killed / (mutants - equivalent); killed / mutants = "
        f"{100 * killed / max(total, 1):.1f}%"
    )
    if not args.report:
        print(f"(mutmut run: {time.monotonic() - start:.0f} s)")
    if explained:
        print(f"\n{len(explained)} equivalent mutants, by reason:")
        counts: dict[str, int] = {}
        for reason in explained.values():
            counts[reason] = counts.get(reason, 0) + 1
        for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"  {n:4}  {reason}")
    if survivors:
        print(f"\n{len(survivors)} surviving mutants (not killed, not explained):")
        for name, status, diff in survivors:
            print(f"  {name} [{status}]")
            for old, new in diff:
                print(f"      - {old.strip()}\n      + {new.strip()}")
    return 0 if score >= args.min_score else 1


if __name__ == "__main__":
    sys.exit(main())
