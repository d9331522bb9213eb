"""``sepnet relocate STUDY [--from OLD] [--dry-run]``: point a moved or copied study's MLflow store at its folder.

MLflow keeps absolute artifact locations (``file:///<root>/mlartifacts/...``) in its database, so a
study folder that was moved or copied shows no artifacts in the UI and downloads fail. This rewrites
the old folder prefix to the new one in the study's sqlite store (``<STUDY>/mlflow.db``): experiments'
artifact locations, runs' artifact URIs, logged models' and model versions' locations, traces'
artifact location tags. The old folder is read from the experiments' artifact locations (the folder
holding ``mlartifacts``) unless ``--from`` names it.

Safe to repeat: a store already pointing at STUDY is left alone. Before writing, the database is
copied (atomically) to ``mlflow.db.before-relocate``; the rewrite is one transaction. A study whose
``study.yaml`` sets a non-sqlite ``mlflow.tracking_uri`` (a server) is refused: its server owns the
locations.
"""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

from sepnet.core.errors import ConfigError, DataError
from sepnet.hpc.atomic import atomic_write_bytes

DB_NAME = "mlflow.db"
BACKUP_SUFFIX = ".before-relocate"
ARTIFACT_DIR = "mlartifacts"
# (table, column) holding artifact locations; a pair missing from an older MLflow schema is skipped
COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
           ("model_versions", "source"), ("model_versions", "storage_location"))
TRACE_TAG = ("trace_tags", "value", "key = 'mlflow.artifactLocation'")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="the study folder as it is now (holding mlflow.db)")
    p.add_argument("--from", dest="old", help="the folder the study was in (default: read from the store)")
    p.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")


def _check_store(root: Path) -> Path:
    """``<root>/mlflow.db``; ConfigError for a study tracked on a server, DataError when there is no store."""
    import yaml

    cfg_file = root / "study.yaml"
    if cfg_file.is_file():
        try:
            data = yaml.safe_load(cfg_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{cfg_file}: not valid YAML ({e})") from None
        uri = ((data.get("mlflow") or {}) if isinstance(data, dict) else {}).get("tracking_uri")
        if uri and urlparse(str(uri)).scheme != "sqlite":
            raise ConfigError(f"{cfg_file}: mlflow.tracking_uri is {uri}, not a sqlite store; relocate rewrites "
                              f"only a study's own {DB_NAME}")
    db = root / DB_NAME
    if not db.is_file():
        raise DataError(f"{db}: no MLflow sqlite store in this study folder")
    return db


def _spellings(folder: Path) -> list[str]:
    """The spellings of ``folder`` at the start of a stored location: file URI (encoded, plain), path."""
    return [folder.as_uri() + "/", f"file://{folder}/", f"{folder}/"]


def _pairs(old: Path, new: Path) -> list[tuple[str, str]]:
    """(old prefix, its replacement in the same spelling), each old prefix once."""
    return list(dict(zip(_spellings(old), _spellings(new))).items())


def _old_root(conn: sqlite3.Connection, db: Path) -> Path:
    """The folder holding ``mlartifacts`` in the experiments' artifact locations (one, or DataError)."""
    roots = set()
    for (loc,) in conn.execute("SELECT artifact_location FROM experiments"):
        p = unquote(urlparse(loc).path) if loc and loc.startswith("file:") else loc
        if p and Path(p).name == ARTIFACT_DIR:
            roots.add(Path(p).parent)
    if len(roots) != 1:
        found = ", ".join(sorted(map(str, roots))) or "none"
        raise DataError(f"{db}: cannot tell the study's old folder from its experiments' artifact locations "
                        f"(found: {found}); name it with --from")
    return roots.pop()


def _columns(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    have = {name: {r[1] for r in conn.execute(f"PRAGMA table_info({name})")}
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    out = [(t, c, "1") for t, c in COLUMNS if c in have.get(t, ())]
    if TRACE_TAG[1] in have.get(TRACE_TAG[0], ()):
        out.append(TRACE_TAG)
    return out


def plan(conn: sqlite3.Connection, old: Path, new: Path) -> dict[str, int]:
    """``"table.column"`` -> how many values start with ``old`` (in any spelling) and would change."""
    counts: dict[str, int] = {}
    for table, col, where in _columns(conn):
        n = 0
        for pre, _ in _pairs(old, new):
            n += conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {where} AND substr({col}, 1, ?) = ?",
                              (len(pre), pre)).fetchone()[0]
        if n:
            counts[f"{table}.{col}"] = n
    return counts


def rewrite(conn: sqlite3.Connection, old: Path, new: Path) -> int:
    """Replace the ``old`` prefix by ``new`` (same spelling: URI stays URI) in one transaction; the count."""
    total = 0
    with conn:  # one transaction: all or nothing
        for table, col, where in _columns(conn):
            for pre, rep in _pairs(old, new):
                cur = conn.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?) "
                                   f"WHERE {where} AND substr({col}, 1, ?) = ?", (rep, len(pre) + 1, len(pre), pre))
                total += cur.rowcount
    return total


def relocate(study: str | Path, *, old: str | Path | None = None, dry_run: bool = False) -> dict[str, int]:
    """Point ``study``'s sqlite store at ``study`` (from ``old``, default read from the store); returns the
    changes by ``table.column`` (empty when it already points there). Writes nothing when ``dry_run``."""
    root = Path(study).resolve()
    if not root.is_dir():
        raise DataError(f"{study}: not a folder")
    db = _check_store(root)
    try:
        conn = sqlite3.connect(db)
        conn.execute("SELECT 1 FROM experiments LIMIT 1")
    except sqlite3.DatabaseError as e:
        raise DataError(f"{db}: not an MLflow sqlite store ({e})") from None
    try:
        src = Path(old).expanduser().absolute() if old is not None else _old_root(conn, db)
        if src == root:
            return {}
        counts = plan(conn, src, root)
        if dry_run or not counts:
            return counts
        atomic_write_bytes(db.with_name(DB_NAME + BACKUP_SUFFIX), conn.serialize())
        rewrite(conn, src, root)
        return counts
    finally:
        conn.close()


def run(args: argparse.Namespace) -> int:
    root = Path(args.study).resolve()
    counts = relocate(root, old=args.old, dry_run=args.dry_run)
    if not counts:
        print(f"{root / DB_NAME}: already points at {root}; nothing to change")
        return 0
    what = ", ".join(f"{k} {n}" for k, n in counts.items())
    if args.dry_run:
        print(f"would rewrite {sum(counts.values())} location(s) to {root} ({what}); nothing written")
    else:
        print(f"rewrote {sum(counts.values())} location(s) to {root} ({what}); "
              f"backup: {root / (DB_NAME + BACKUP_SUFFIX)}")
    return 0
