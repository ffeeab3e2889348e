"""What nextbest holds about one customer (GDPR Art. 15): the customer data export.

One JSON document, `schemas/customer-export.v1.schema.json` (SCHEMA_VERSION 1), assembled from
SECTIONS: one small function per source of data, each reading its store table or the served
model. `Consent.ExportCustomerData` streams the sections as they are read (the events and
impressions a page of PAGE_SIZE records at a time); `nextbest consent export` writes the same
document to a file. Every export is first written to the store's access log (who asked, when).

    ctx = ExportContext.create(store, served, "c004", default_allow=False, client="", source="dpo")
    document = assemble(export_customer(ctx))

An erased customer's export holds the tombstone and nothing else (`forget` deleted the rest);
a customer who came back after the erasure also gets what was recorded since.

Sections come in document order; a new source of data is one more `Section` in SECTIONS and one
more property in the schema.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from nextbest.data.readers import PURPOSES
from nextbest.experiments.assignment import assign
from nextbest.experiments.attribution import attribute, purchases_of, windows_of
from nextbest.service import ServedModel
from nextbest.store.consent_store import Impression, Store

__all__ = [
    "SCHEMA_VERSION",
    "SCHEMA_PATH",
    "PAGE_SIZE",
    "ExportContext",
    "Section",
    "SECTIONS",
    "export_customer",
    "assemble",
    "iso",
    "to_json",
]

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "customer-export.v1.schema.json"
"""The JSON Schema of the document (shipped with the package)."""
PAGE_SIZE = 1000
"""Records per page of a paged section (events, impressions)."""
_EPOCH = dt.datetime(1970, 1, 1)


def iso(value: dt.datetime | None) -> str | None:
    """A naive UTC time as the export writes it: `2024-01-01T08:00:00.000000Z`."""
    return None if value is None else value.isoformat(timespec="microseconds") + "Z"


def _day_iso(day: float) -> str:
    return iso(_EPOCH + dt.timedelta(days=float(day)))


@dataclass(frozen=True)
class ExportContext:
    """One export: the customer, where their data is, and who asked."""

    customer_id: str
    store: Store
    model: ServedModel | None
    """The served model (None when none is loaded: the model section says so)."""
    default_allow: bool
    """policy.default_consent == "allow": the value of a purpose without a record."""
    client: str
    """The asking client's name (from its token; '' on a server without tokens)."""
    source: str
    """Who or what asked, as the request says ("preference-centre", "dpo:alice", ...)."""
    requested_at: dt.datetime
    tombstone: tuple[dt.datetime, str] | None
    page_size: int = PAGE_SIZE

    @classmethod
    def create(
        cls,
        store: Store,
        model: ServedModel | None,
        customer_id: str,
        *,
        default_allow: bool,
        client: str,
        source: str,
    ) -> ExportContext:
        """Write the request to the access log, then read the tombstone: the context of one
        export."""
        record = store.record_access(customer_id, what="export", client=client, source=source)
        return cls(
            customer_id=customer_id,
            store=store,
            model=model,
            default_allow=default_allow,
            client=client,
            source=source,
            requested_at=record.requested_at,
            tombstone=store.tombstone(customer_id),
        )


@dataclass(frozen=True)
class Section:
    """One top-level key of the document and the function that reads it."""

    name: str
    read: Callable[[ExportContext], Iterator]
    """Yields the section's value once, or (`paged`) its records a list (page) at a time."""
    paged: bool = False


def _export(ctx: ExportContext) -> Iterator[dict]:
    yield {
        "schema_version": SCHEMA_VERSION,
        "customer_id": ctx.customer_id,
        "exported_at": iso(ctx.requested_at),
        "requested_by": {"client": ctx.client, "source": ctx.source},
    }


def _tombstone(ctx: ExportContext) -> Iterator[dict | None]:
    if ctx.tombstone is None:
        yield None
        return
    erased_at, source = ctx.tombstone
    yield {"erased_at": iso(erased_at), "source": source}


def _consent(ctx: ExportContext) -> Iterator[list[dict] | None]:
    stored = ctx.store.get_consent(ctx.customer_id)
    if ctx.tombstone is not None and not stored:
        yield None  # erased: the defaults are not data about them
        return
    values = []
    for purpose in PURPOSES:
        r = stored.get(purpose)
        values.append(
            {
                "purpose": purpose,
                "granted": ctx.default_allow if r is None else r.granted,
                "updated_at": None if r is None else iso(r.updated_at),
                "source": "default" if r is None else r.source,
            }
        )
    yield values


def _consent_history(ctx: ExportContext) -> Iterator[list[dict]]:
    yield [
        {
            "purpose": r.purpose,
            "old_granted": r.old_granted,
            "new_granted": r.new_granted,
            "changed_at": iso(r.changed_at),
            "source": r.source,
        }
        for r in ctx.store.audit(ctx.customer_id)
    ]


def _events(ctx: ExportContext) -> Iterator[list[dict]]:
    after = 0
    while after >= 0:
        rows, after = ctx.store.events_page(ctx.customer_id, after, ctx.page_size)
        yield [
            {
                "product_id": product,
                "timestamp": iso(at),
                "event_type": kind,
                "quantity": quantity,
                "value": value,
                "channel": channel,
            }
            for product, at, kind, quantity, value, channel in rows
        ]


def _impressions(ctx: ExportContext) -> Iterator[list[dict]]:
    offset = 0
    while offset >= 0:
        rows, offset = ctx.store.impressions_page(ctx.customer_id, offset, ctx.page_size)
        yield [_impression(i) for i in rows]


def _impression(i: Impression) -> dict:
    return {
        "product_id": i.product_id,
        "channel": i.channel,
        "shown_at": iso(i.shown_at),
        "experiment": i.experiment or None,
        "variant": i.variant or None,
        "attribution_id": i.attribution_id or None,
        "rank": i.rank or None,
        "model_version": i.model_version or None,
        "reasons": [r for r in i.reasons.split(",") if r],
    }


def _experiments(ctx: ExportContext) -> tuple:
    return ctx.model.settings.experiments if ctx.model is not None else ()


def _experiment_assignment(ctx: ExportContext) -> Iterator[dict | None]:
    """The customer's experiment arm: computed from the config's keyed hash, never stored;
    a customer without personalization consent (or erased) is in no experiment."""
    if ctx.tombstone is not None:
        yield None
        return
    state = ctx.store.consent_state([ctx.customer_id], ctx.default_allow)
    personal = bool(state.allowed("personalization", pa.array([ctx.customer_id]))[0])
    arm = assign(ctx.customer_id, _experiments(ctx)) if personal else None
    yield {
        "in_experiment": arm is not None,
        "reason": (
            "" if arm is not None else ("no_consent" if not personal else "not_in_an_experiment")
        ),
        "experiment": arm.experiment if arm else None,
        "variant": arm.variant if arm else None,
        "control": arm.control if arm else None,
    }


def _attributions(ctx: ExportContext) -> Iterator[list[dict]]:
    """The customer's purchases attributed to what they were shown (derived from their events
    and impressions, as `nextbest experiments report` does)."""
    purchases = purchases_of(ctx.store.events([ctx.customer_id]))
    shown = ctx.store.impressions([ctx.customer_id]) if purchases else []
    yield [
        {
            "product_id": a.purchase.product_id,
            "purchased_at": iso(a.purchase.at),
            "value": a.purchase.value,
            "last_touch": _impression(a.last_touch),
            "touches": len(a.touches),
        }
        for a in attribute(purchases, shown, windows_of(_experiments(ctx)))
    ]


def _lifecycle(ctx: ExportContext) -> Iterator[dict | None]:
    if ctx.model is None:
        yield None if ctx.tombstone else {"computed": False, "reason": "no_model"}
        return
    state, why = ctx.model.customer_state(ctx.customer_id)
    if state is None:
        yield None if ctx.tombstone else {"computed": False, "reason": why}
        return
    risk = ctx.model.lifecycle.risk
    interval = None if np.isnan(state.interval_days) else float(state.interval_days)
    yield {
        "computed": True,
        "reason": "",
        "stage": state.stage,
        "churn_risk": float(state.churn_risk),
        "risk_model": risk.kind,
        "horizon_days": float(risk.horizon_days),
        "expected_purchases": float(state.expected_purchases),
        "expected_value": float(state.expected_value),
        "days_since_last_purchase": int(state.days_since_last_purchase),
        "purchase_days": int(state.purchase_days),
        "interval_days": interval,
        "reasons": list(state.reasons),
    }


def _model(ctx: ExportContext) -> Iterator[dict | None]:
    model = ctx.model
    if model is None:
        yield None if ctx.tombstone else {"version": None, "contains_customer": False}
        return
    b = model.bundle
    row = int(b.user_index(np.asarray([ctx.customer_id], dtype=str))[0])
    history = b.history
    learned = None
    if row >= 0 and history is not None:
        learned = {
            "first_event_at": _day_iso(history.first_day[row]),
            "last_event_at": _day_iso(history.last_day[row]),
            "events": int(history.events[row]),
            "purposes": list(history.purposes_of(row)),
        }
    if ctx.tombstone is not None:
        # Erased: the model files hold them only if it learned from events after the erasure.
        erased_day = (ctx.tombstone[0] - _EPOCH) / dt.timedelta(days=1)
        if learned is None or history.last_day[row] <= erased_day:
            yield None
            return
    manifest = b.manifest
    yield {
        "version": model.version,
        "trained_at": manifest.get("created_at"),
        "contains_customer": row >= 0,
        "history": learned,
        "default_consent": manifest.get("consent", {}).get("default_consent"),
    }


SECTIONS: list[Section] = [
    Section("export", _export),
    Section("tombstone", _tombstone),
    Section("consent", _consent),
    Section("consent_history", _consent_history),
    Section("events", _events, paged=True),
    Section("impressions", _impressions, paged=True),
    Section("attributions", _attributions),
    Section("experiment_assignment", _experiment_assignment),
    Section("lifecycle", _lifecycle),
    Section("model", _model),
]
"""The document's sections, in order."""


def export_customer(ctx: ExportContext) -> Iterator[tuple[str, object, bool]]:
    """(section, value, paged) in document order: a paged section comes as one or more pages
    (lists) to concatenate. Of an erased customer only the sections that hold something come
    (the tombstone, and what was recorded after the erasure)."""
    erased = ctx.tombstone is not None
    for section in SECTIONS:
        sent = False
        for value in section.read(ctx):
            if erased and (value is None or value == []) and section.name != "tombstone":
                continue
            sent = True
            yield section.name, value, section.paged
        if section.paged and not sent and not erased:
            yield section.name, [], True


def assemble(chunks: Iterable[tuple[str, object, bool]]) -> dict:
    """The document from `export_customer`'s (or the RPC's decoded) chunks."""
    document: dict = {}
    for name, value, paged in chunks:
        if name == "export":
            document.update(value)
        elif paged:
            document.setdefault(name, []).extend(value)
        else:
            document[name] = value
    return document


def to_json(document: dict) -> str:
    """The document as the export file holds it."""
    return json.dumps(document, indent=2, sort_keys=False) + "\n"
