"""What a training run learns from: the input files and the consent store, read and gated.

    inputs = read_inputs(InputFiles(events="events.parquet", catalog="catalog.csv"), settings)
    bundle, report, _ = train(inputs.events, inputs.catalog, settings, content=inputs.content)

The consent gate (`policy.filter_training_events`) runs here, once for `nextbest train` and
`nextbest evaluate` alike: customers without personalization consent, the history of erased
customers (the store's tombstones: everything dated at or before the erasure, and everything
until personalization consent is recorded again; the `--erased` file: everything) and the
events their consents do not allow never reach the trainer. A consent file's records of an
erased customer dated at or before the erasure are erased data too and are not read. The
store's recorded events are learned from; its consent records win over a consent file's.
`TrainingInputs.meta` is what the model's manifest records of them.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from nextbest.config import Settings
from nextbest.data.readers import (
    PURPOSES,
    read_catalog,
    read_consent,
    read_content,
    read_customer_ids,
    read_events,
)
from nextbest.errors import DataError
from nextbest.store.artifacts import sha256_file

__all__ = ["InputFiles", "TrainingInputs", "read_inputs", "rejects_path"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class InputFiles:
    """Where a training run's inputs are (the `--events`, `--catalog`, ... of the CLI)."""

    events: str | Path
    """Events file (CSV or Parquet, SPEC §2)."""
    catalog: str | Path | None = None
    """Catalog file; events on products missing from it are rejected."""
    consent: str | Path | None = None
    """Consent file (customer_id, purpose, granted, updated_at)."""
    erased: str | Path | None = None
    """File with a customer_id column: erased customers."""
    store: str | None = None
    """Consent and event store URL; None = `serve.store` when it exists."""
    content: str | Path | None = None
    """Content file: the model's content snapshot."""
    rejects: str | Path | None = None
    """Rejected event rows go here; other files' rejects beside it (`<name>-catalog`, ...)."""


@dataclass(frozen=True)
class TrainingInputs:
    """The gated inputs of one training run."""

    events: pa.Table
    """Events the consent gate let through (file and store)."""
    catalog: pa.Table | None
    content: pa.Table | None
    meta: dict
    """For the manifest: `data` (paths, sha256, read reports) and `consent` (gate counts)."""


def rejects_path(base: str | None, kind: str) -> Path | None:
    """Events rejects go to --rejects itself, other files' rejects beside it (`<stem>-catalog`)."""
    if base is None:
        return None
    path = Path(base)
    if kind == "events":
        return path
    suffix = "".join(path.suffixes) or ".csv"
    return path.with_name(f"{path.name[: len(path.name) - len(suffix)]}-{kind}{suffix}")


def _store_inputs(url: str, events: pa.Table, catalog: pa.Table | None, settings: Settings):
    """From the consent store: its recorded events (appended; on products the catalog knows),
    the consent records of every customer in the events, and the erased customers."""
    from nextbest.store.consent_store import open_store

    store = open_store(url)
    try:
        recorded = store.events()
        if catalog is not None and recorded.num_rows:
            known = pc.is_in(recorded["product_id"], catalog["product_id"].combine_chunks())
            unknown = recorded.num_rows - pc.sum(known).as_py()
            if unknown:
                logger.info(
                    "%s: %d recorded events on products not in the catalog skipped",
                    store.url,  # the URL with any password hidden
                    unknown,
                )
            recorded = recorded.filter(known)
        recorded, ahead = _within_lead(
            recorded, events, store.url, settings.train.max_store_lead_days
        )
        events = pa.concat_tables([events, recorded.cast(events.schema)])
        customers = pc.unique(events["customer_id"]).to_pylist()
        consent = store.consent_state(customers, settings.policy.default_consent == "allow")
        tombstones = store.tombstones()
    finally:
        store.close()
    logger.info(
        "%s: %d recorded events added, %d tombstones applied",
        store.url,
        recorded.num_rows,
        len(tombstones),
    )
    return events, consent, tombstones, ahead


def _within_lead(
    recorded: pa.Table, events: pa.Table, url: str, lead_days: float
) -> tuple[pa.Table, int]:
    """The recorded events dated at most `lead_days` after the newest event of the events file
    (`train.max_store_lead_days`: the model's clock must not jump to the server's receive
    time), and how many were left out (with a warning naming the store `url`, password
    hidden)."""
    newest = pc.max(events["timestamp"]).as_py() if events.num_rows else None
    if newest is None or not recorded.num_rows:
        return recorded, 0
    limit = newest + dt.timedelta(days=lead_days)
    ahead = pc.greater(recorded["timestamp"], pa.scalar(limit, pa.timestamp("us")))
    n = int(pc.sum(ahead).as_py() or 0)
    if n:
        logger.warning(
            "%s: %d recorded events dated after %s (train.max_store_lead_days = %g after the "
            "newest event of the events file, %s; the latest %s) left out of this training: "
            "the model's clock stays at the newest event it learns from. Events recorded "
            "without a timestamp are dated by the server's clock",
            url,
            n,
            limit.isoformat(sep=" ", timespec="seconds"),
            lead_days,
            newest.isoformat(sep=" ", timespec="seconds"),
            pc.max(recorded["timestamp"]).as_py().isoformat(sep=" ", timespec="seconds"),
        )
    return recorded.filter(pc.invert(ahead)), n


def read_inputs(files: InputFiles, settings: Settings) -> TrainingInputs:
    """Read catalog, events, the store's recorded events, consent and erased customers, apply
    the consent gate, and read the content: everything one training run learns from, and the
    manifest's record of where it came from (paths, sha256, read reports, consent counts)."""
    from nextbest.policy import (
        FOR_GOOD,
        ConsentState,
        consent_state,
        erased_rows,
        filter_training_events,
        sensitive_mask,
    )

    share = settings.data.max_reject_share
    catalog = None
    if files.catalog:
        catalog, report = read_catalog(
            files.catalog,
            rejects_path=rejects_path(files.rejects, "catalog"),
            max_reject_share=share,
        )
        logger.info("%s", report.summary())
    event_types = ("purchase", "return", *settings.data.event_weights)
    events, report = read_events(
        files.events,
        event_types=tuple(dict.fromkeys(event_types)),
        known_products=catalog["product_id"].combine_chunks() if catalog is not None else None,
        rejects_path=rejects_path(files.rejects, "events"),
        max_reject_share=share,
    )
    logger.info("%s", report.summary())
    reports = {"events": report.as_dict()}
    store_consent = None
    tombstones: dict = {}
    ahead = 0
    store_url = files.store
    if store_url is None:
        from nextbest.store.consent_store import store_exists

        # The configured store (serve.store) by default: its tombstones bind every training.
        default = settings.serve.store
        store_url = default if store_exists(default) else None
    if store_url:
        events, store_consent, tombstones, ahead = _store_inputs(
            store_url, events, catalog, settings
        )
    consent = None
    consent_time = None
    if files.consent:
        consent, c_report = read_consent(
            files.consent,
            rejects_path=rejects_path(files.rejects, "consent"),
            max_reject_share=share,
        )
        logger.info("%s", c_report.summary())
        reports["consent"] = c_report.as_dict()
        if consent.num_rows:
            consent_time = pc.max(consent["updated_at"]).as_py().isoformat()
    erased = dict(tombstones)
    if files.erased:
        ids, e_report = read_customer_ids(files.erased)
        logger.info("%s", e_report.summary())
        erased.update(dict.fromkeys(ids.to_pylist(), FOR_GOOD))  # no time: erased for good
    if consent is not None and erased:
        replayed = erased_rows(
            consent["customer_id"].combine_chunks(), consent["updated_at"].combine_chunks(), erased
        )
        consent = consent.filter(pa.array(~replayed))
    state = consent_state(consent, settings.policy)
    if store_consent is not None:
        # The store is the live record: its values win over the file's for the same purpose.
        merged = {p: dict(state.granted.get(p, {})) for p in PURPOSES}
        for purpose, records in store_consent.granted.items():
            merged[purpose].update(records)
        state = ConsentState(default_allow=state.default_allow, granted=merged)
    sensitive = pa.array([], pa.string())
    if catalog is not None:
        is_sensitive = pa.array(sensitive_mask(catalog, settings.policy))
        sensitive = catalog["product_id"].combine_chunks().filter(is_sensitive)
    events, c_report = filter_training_events(
        events, state, sensitive_products=sensitive, erased=erased
    )
    logger.info("%s", c_report.summary())
    if events.num_rows == 0:
        raise DataError(
            f"{files.events}: no events left after the consent rules (default consent is "
            f"{settings.policy.default_consent!r}; see --consent and --default-consent)"
        )
    meta = {
        "data": {
            "events": str(files.events),
            "events_sha256": sha256_file(files.events),
            "catalog": str(files.catalog) if files.catalog else None,
            "catalog_sha256": sha256_file(files.catalog) if files.catalog else None,
            "read": reports,
            "store_events_beyond_lead": ahead,
        },
        "consent": {
            "file": str(files.consent) if files.consent else None,
            "snapshot_time": consent_time,
            "default_consent": settings.policy.default_consent,
            **vars(c_report),
        },
    }
    content = None
    if files.content:
        content, ct_report = read_content(
            files.content,
            rejects_path=rejects_path(files.rejects, "content"),
            max_reject_share=share,
        )
        logger.info("%s", ct_report.summary())
        reports["content"] = ct_report.as_dict()
    meta["data"]["content"] = str(files.content) if files.content else None
    meta["data"]["content_sha256"] = sha256_file(files.content) if files.content else None
    return TrainingInputs(events=events, catalog=catalog, content=content, meta=meta)
