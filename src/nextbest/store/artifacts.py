"""Model artifacts: atomic publication of `models/<version>/`, the `CURRENT` pointer, loading.

A version directory holds plain arrays (`.npz`, read with `allow_pickle=False`), the catalog and
content snapshots (`catalog.parquet`, `content.parquet`) and `manifest.json`, written last, which
lists every file with its sha256. Publication writes into `models/.tmp-<version>-<pid>/`, fsyncs,
renames the directory into place and only then replaces `CURRENT` (write a temporary file, fsync,
`os.replace`). A crash at any point leaves `CURRENT` on a complete model; `load_bundle` refuses a
version whose files do not match its manifest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from nextbest.bundle import FEATURES, ModelBundle
from nextbest.cf import CFModel
from nextbest.data.interactions import RepeatStats
from nextbest.data.readers import CONTENT_SCHEMA
from nextbest.errors import ModelError

__all__ = [
    "FORMAT",
    "sha256_file",
    "publish",
    "load_bundle",
    "read_manifest",
    "current_version",
    "set_current",
    "list_versions",
    "promote",
    "rollback",
]

logger = logging.getLogger(__name__)

FORMAT = 4
"""2: adds the content snapshot (`content.parquet`, manifest `content_items`). 3: adds every
customer's CF candidates (`candidates.npy`, computed by the trainer, memory-mapped at load)."""
READABLE_FORMATS = (2, 3, 4)
"""Formats this version loads: a format-2 version gets its CF candidates computed at load."""
CANDIDATES = "candidates.npy"
LIFECYCLE = "lifecycle.npz"
"""Format 4: the lifecycle summaries and churn-risk model (optional: absent when the data could
not fit risk); `manifest["lifecycle"]` describes it."""
HISTORY = "history.npz"
"""Optional in format 4: each customer's learned history (`history.CustomerHistory`: period,
events, purposes), listed in the manifest's files when present."""
CURRENT = "CURRENT"
_FILES = (
    "ids.npz",
    "user_items.npz",
    "repeat.npz",
    "cf.npz",
    "items.npz",
    "catalog.parquet",
    "content.parquet",
)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())


def _save_parquet(path: Path, table: pa.Table) -> None:
    with open(path, "wb") as fh:
        pq.write_table(table, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _new_version() -> str:
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(models_dir: Path) -> None:
    """Remove `.tmp-*` directories left by publishers that died (their pid is gone)."""
    for tmp in models_dir.glob(".tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def publish(
    bundle: ModelBundle, models_dir: str | Path, manifest: dict, *, promote: bool = True
) -> str:
    """Write `bundle` as a new version, then (unless `promote` is False) point `CURRENT` at it.
    Returns the version."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(models_dir)
    version = _new_version()
    tmp = models_dir / f".tmp-{version}-{os.getpid()}"
    tmp.mkdir()
    rs = bundle.repeat
    pattern = rs.days_bought
    _save_npz(
        tmp / "ids.npz", user_ids=bundle.user_ids.astype(str), item_ids=bundle.item_ids.astype(str)
    )
    ui = bundle.user_items.tocsr()
    _save_npz(
        tmp / "user_items.npz",
        data=ui.data,
        indices=ui.indices,
        indptr=ui.indptr,
        shape=np.asarray(ui.shape, dtype=np.int64),
    )
    _save_npz(
        tmp / "repeat.npz",
        indptr=pattern.indptr,
        indices=pattern.indices,
        days_bought=pattern.data,
        last_day=rs.last_day.data,
        first_day=rs.first_day.data,
        user_days=rs.user_days,
        user_days_plain=rs.user_days if rs.user_days_plain is None else rs.user_days_plain,
        recency_weighted=rs.recency_weighted.data,
        item_repeat_rate=rs.item_repeat_rate,
        item_interval_days=rs.item_interval_days,
        item_buyers=rs.item_buyers,
        item_recent_buyers=rs.item_recent_buyers,
        item_prev_buyers=rs.item_prev_buyers,
        season_days=rs.season_days.data,
        item_season_buyers=rs.item_season_buyers,
        season_covered=np.asarray(rs.season_covered),
    )
    _save_npz(tmp / "cf.npz", **bundle.cf.arrays())
    _save_npz(
        tmp / "items.npz",
        item_sensitive=bundle.item_sensitive,
        item_available=bundle.item_available,
        item_repurchase_days=bundle.item_repurchase_days,
        best_sellers=bundle.best_sellers,
        recent_best_sellers=bundle.recent_best_sellers,
        blend_weights=bundle.blend_weights,
    )
    if bundle.cf_candidates is None:
        raise ValueError("publish: the bundle has no CF candidates (train() computes them)")
    with open(tmp / CANDIDATES, "wb") as fh:
        np.save(fh, np.ascontiguousarray(bundle.cf_candidates, dtype=np.int32), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    extra = [CANDIDATES]
    if bundle.lifecycle is not None:
        _save_npz(tmp / LIFECYCLE, **bundle.lifecycle.to_arrays())
        extra.append(LIFECYCLE)
    if bundle.history is not None:
        _save_npz(tmp / HISTORY, **bundle.history.to_arrays())
        extra.append(HISTORY)
    _save_parquet(tmp / "catalog.parquet", bundle.catalog)
    content = bundle.content.select(CONTENT_SCHEMA.names).cast(CONTENT_SCHEMA)
    _save_parquet(tmp / "content.parquet", content)
    full = {
        "format": FORMAT,
        "version": version,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cf_model": bundle.cf.kind,
        "customers": int(bundle.shape[0]),
        "products": int(bundle.shape[1]),
        "content_items": content.num_rows,
        "reference_day": bundle.reference_day,
        "reference_time": _day_iso(bundle.reference_day),
        "features": list(FEATURES),
        "blend_intercept": bundle.blend_intercept,
        **manifest,
        **({"lifecycle": bundle.lifecycle.manifest()} if bundle.lifecycle is not None else {}),
        "files": {name: sha256_file(tmp / name) for name in (*_FILES, *extra)},
    }
    with open(tmp / "manifest.json", "w") as fh:
        json.dump(full, fh, indent=2, sort_keys=True, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    os.rename(tmp, models_dir / version)
    _fsync_dir(models_dir)
    if promote:
        set_current(models_dir, version)
    logger.info("published model %s in %s", version, models_dir)
    return version


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _day_iso(day: float) -> str:
    return (dt.datetime(1970, 1, 1) + dt.timedelta(days=day)).isoformat(timespec="seconds")


def set_current(models_dir: str | Path, version: str) -> None:
    """Atomically point `CURRENT` at `version`."""
    models_dir = Path(models_dir)
    tmp = models_dir / f".{CURRENT}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, models_dir / CURRENT)
    _fsync_dir(models_dir)


def current_version(models_dir: str | Path) -> str:
    """The version `CURRENT` points at; ModelError when there is none."""
    path = Path(models_dir) / CURRENT
    try:
        version = path.read_text().strip()
    except FileNotFoundError:
        raise ModelError(f"{path}: no model published yet (run `nextbest train`)") from None
    if not version:
        raise ModelError(f"{path}: empty")
    return version


def read_manifest(models_dir: str | Path, version: str) -> dict:
    """The manifest of one version; ModelError when missing or unreadable."""
    path = Path(models_dir) / version / "manifest.json"
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise ModelError(f"{path}: not found (incomplete or unknown model version)") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{path}: not a manifest (a JSON {type(manifest).__name__})")
    if manifest.get("format") not in READABLE_FORMATS:
        raise ModelError(
            f"{path}: format {manifest.get('format')!r}, expected one of {READABLE_FORMATS}"
        )
    if manifest.get("version") != version:
        # A copied or renamed directory: served under the manifest's name it would never match
        # CURRENT, and a watcher would load it again every round.
        raise ModelError(f"{path}: names version {manifest.get('version')!r}, not {version!r}")
    return manifest


def _verify(directory: Path, manifest: dict) -> None:
    extra = (CANDIDATES,) if manifest.get("format", 0) >= 3 else ()
    extra += (LIFECYCLE,) if "lifecycle" in manifest else ()
    extra += (HISTORY,) if HISTORY in manifest.get("files", {}) else ()
    for name in (*_FILES, *extra):
        expected = manifest.get("files", {}).get(name)
        path = directory / name
        if expected is None or not path.is_file():
            raise ModelError(f"{path}: missing from model version {directory.name}")
        if sha256_file(path) != expected:
            raise ModelError(f"{path}: checksum does not match the manifest")


_CORRUPT = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    EOFError,
    zipfile.BadZipFile,
    pa.ArrowException,
)
"""What reading a corrupt or inconsistent version can raise (a truncated .npz: BadZipFile)."""


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except _CORRUPT as exc:
        raise ModelError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def _load_catalog(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except _CORRUPT as exc:
        raise ModelError(f"{path}: not a catalog snapshot ({exc})") from None


def _load_content(path: Path) -> pa.Table:
    try:
        table = pq.read_table(path)
        return table.select(CONTENT_SCHEMA.names).cast(CONTENT_SCHEMA)
    except _CORRUPT as exc:
        raise ModelError(f"{path}: not a content snapshot ({exc})") from None


def load_bundle(models_dir: str | Path, version: str | None = None) -> ModelBundle:
    """Load one version (default: `CURRENT`), verifying every file against the manifest.
    ModelError for anything broken: a missing, unreadable or truncated file (even one whose
    checksum the manifest repeats), a manifest of another format or with missing fields."""
    models_dir = Path(models_dir)
    version = version or current_version(models_dir)
    directory = models_dir / version
    manifest = read_manifest(models_dir, version)
    try:
        _verify(directory, manifest)
        return _read_bundle(directory, manifest)
    except _CORRUPT as exc:
        raise ModelError(
            f"{directory}: cannot be loaded ({type(exc).__name__}: {exc})".splitlines()[0]
        ) from None


def _read_bundle(directory: Path, manifest: dict) -> ModelBundle:
    ids = _load_npz(directory / "ids.npz")
    ui = _load_npz(directory / "user_items.npz")
    rep = _load_npz(directory / "repeat.npz")
    items = _load_npz(directory / "items.npz")
    shape = tuple(int(x) for x in ui["shape"])
    user_items = sp.csr_matrix((ui["data"], ui["indices"], ui["indptr"]), shape=shape)

    def pattern(values: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((values, rep["indices"], rep["indptr"]), shape=shape)

    repeat = RepeatStats(
        days_bought=pattern(rep["days_bought"]),
        last_day=pattern(rep["last_day"]),
        first_day=pattern(rep["first_day"]),
        user_days=rep["user_days"],
        user_days_plain=rep.get("user_days_plain"),
        recency_weighted=pattern(rep["recency_weighted"]),
        item_repeat_rate=rep["item_repeat_rate"],
        item_interval_days=rep["item_interval_days"],
        item_buyers=rep["item_buyers"],
        item_recent_buyers=rep["item_recent_buyers"],
        item_prev_buyers=rep["item_prev_buyers"],
        season_days=pattern(rep["season_days"]),
        item_season_buyers=rep["item_season_buyers"],
        season_covered=bool(rep["season_covered"]),
    )
    if manifest.get("features") != list(FEATURES):
        raise ModelError(f"{directory}: blend features differ from this version of nextbest")
    try:
        cf = CFModel.from_arrays(manifest["cf_model"], _load_npz(directory / "cf.npz"))
    except (KeyError, ValueError) as exc:
        raise ModelError(f"{directory}: CF model cannot be rebuilt ({exc})") from None
    return ModelBundle(
        user_ids=ids["user_ids"],
        item_ids=ids["item_ids"],
        user_items=user_items,
        repeat=repeat,
        cf=cf,
        blend_weights=items["blend_weights"],
        blend_intercept=float(manifest["blend_intercept"]),
        reference_day=float(manifest["reference_day"]),
        item_sensitive=items["item_sensitive"],
        item_available=items["item_available"],
        item_repurchase_days=items["item_repurchase_days"],
        best_sellers=items["best_sellers"],
        recent_best_sellers=items["recent_best_sellers"],
        catalog=_load_catalog(directory / "catalog.parquet"),
        content=_load_content(directory / "content.parquet"),
        manifest=manifest,
        cf_candidates=_load_candidates(directory, manifest, shape[0]),
        lifecycle=_load_lifecycle(directory, manifest, ids["user_ids"]),
        history=_load_history(directory, manifest, shape[0]),
    )


def _load_history(directory: Path, manifest: dict, n_users: int):
    """The customers' learned history when the version has one, else None."""
    if HISTORY not in manifest.get("files", {}):
        return None
    from nextbest.history import CustomerHistory

    try:
        return CustomerHistory.from_arrays(_load_npz(directory / HISTORY), n_users)
    except (KeyError, ValueError) as exc:
        raise ModelError(f"{directory / HISTORY}: cannot be read ({exc})") from None


def _load_lifecycle(directory: Path, manifest: dict, user_ids: np.ndarray):
    """The lifecycle model of a format-4 version that has one, else None."""
    if "lifecycle" not in manifest:
        return None
    from nextbest.config import LifecycleSettings
    from nextbest.lifecycle.model import LifecycleModel

    try:
        return LifecycleModel.from_arrays(
            user_ids.astype(str),
            _load_npz(directory / LIFECYCLE),
            manifest["lifecycle"],
            LifecycleSettings(**manifest["lifecycle"].get("settings", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{directory / LIFECYCLE}: cannot be read ({exc})") from None


def _load_candidates(directory: Path, manifest: dict, n_users: int) -> np.ndarray | None:
    """The trainer's CF candidates, memory-mapped copy-on-write (pages are read when used; a
    forgotten customer's row is changed in this process only); None for a format-2 version."""
    if manifest.get("format", 0) < 3:
        return None
    path = directory / CANDIDATES
    try:
        candidates = np.load(path, mmap_mode="c", allow_pickle=False)
    except _CORRUPT as exc:
        raise ModelError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if candidates.ndim != 2 or candidates.shape[0] != n_users or candidates.dtype != np.int32:
        raise ModelError(f"{path}: {candidates.shape} {candidates.dtype} does not fit the model")
    return candidates


def list_versions(models_dir: str | Path) -> list[dict]:
    """Every complete version, oldest first: version, created_at, cf_model, current."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    try:
        current = current_version(models_dir)
    except ModelError:
        current = None
    out = []
    for d in sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            m = read_manifest(models_dir, d.name)
        except ModelError:
            continue
        out.append(
            {
                "version": d.name,
                "created_at": m.get("created_at"),
                "cf_model": m.get("cf_model"),
                "customers": m.get("customers"),
                "products": m.get("products"),
                "current": d.name == current,
            }
        )
    return out


def promote(models_dir: str | Path, version: str) -> None:
    """Point `CURRENT` at `version` after checking that it loads completely."""
    load_bundle(models_dir, version)
    set_current(models_dir, version)


def rollback(models_dir: str | Path) -> str:
    """Point `CURRENT` at the newest complete version older than the current one."""
    current = current_version(models_dir)
    older = [v["version"] for v in list_versions(models_dir) if v["version"] < current]
    for version in reversed(older):
        try:
            promote(models_dir, version)
        except ModelError as exc:
            logger.warning("skipping %s: %s", version, exc)
            continue
        return version
    raise ModelError(f"no complete model version older than {current} to roll back to")
