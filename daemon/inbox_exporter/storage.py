"""`--storage.path`: the compact check history (history.py) in SQLite, so that a restart does not
blank the status page's strips. Nothing else is kept: metrics live in Prometheus, and a
transcript is only worth its latest version.

- One row per inbox holding its records; written in batches (every FLUSH_EVERY seconds, and at
  shutdown) by a thread of its own, so a check never waits for the disk.
- WAL journal, synchronous=NORMAL: a kill -9 loses at most the last batch, never the file.
- The names behind the records' step/category/reason indexes are kept with them (meta
  `names`, history.VOCABULARY at write time): after an upgrade that adds or moves a reason, old
  records are translated by name, and the file rewritten in today's indexes.
- A file that cannot be opened, is not SQLite, fails `PRAGMA quick_check`, has tables of
  another shape or holds another record format is a warning: it is moved aside
  (`history.db.corrupt-<time>`) and a fresh one started. An inbox whose records are not
  plausible (history.Translation) is a warning naming it; its row is dropped. Never a crash.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .history import ENTRY, VOCABULARY, History, InvalidRecords, Translation

log = logging.getLogger(__name__)

FILE = "history.db"
FLUSH_EVERY = 5.0
FORMAT = f"v1 {ENTRY.format}"  # a change of the record layout starts a fresh file
# PRAGMA table_info's (name, type) of each table: anything else is not our file
SCHEMA = {"meta": [("key", "TEXT"), ("value", "TEXT")],
          "history": [("inbox", "TEXT"), ("records", "BLOB")]}


class HistoryStorage:
    def __init__(self, directory: str, history: History,
                 clock: Callable[[], float] = time.time):
        self.path = Path(directory) / FILE
        self.history = history
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._translate = Translation(VOCABULARY)  # the file's names: replaced by _open
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("storage.path unusable: history is kept in memory only",
                        extra={"path": directory, "error": e.strerror})
            return
        self._db = self._open()

    def _open(self) -> sqlite3.Connection | None:
        for attempt in (1, 2):
            db = None
            try:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self._translate = self._prepare(db)
                return db
            except (sqlite3.Error, ValueError) as e:  # ValueError: names not ours (Translation)
                if db is not None:
                    db.close()
                if attempt == 2:
                    log.warning("history storage unusable: kept in memory only",
                                extra={"path": str(self.path), "error": str(e)})
                    return None
                self._set_aside(str(e))
        return None

    @staticmethod
    def _prepare(db: sqlite3.Connection) -> Translation:
        """Check the file and create what is missing; how its records read (Translation).
        Raises sqlite3.Error or ValueError when the file is damaged or not ours."""
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # A damaged file SQLite still opens: found here, not by the first query that fails.
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("quick_check: " + "; ".join(problems[:3]))
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("CREATE TABLE IF NOT EXISTS history "
                   "(inbox TEXT PRIMARY KEY, records BLOB NOT NULL)")
        for table, columns in SCHEMA.items():
            found = [(row[1], row[2]) for row in db.execute(f"PRAGMA table_info({table})")]
            if found != columns:
                raise sqlite3.DatabaseError(f"table {table} has columns {found}, not {columns}")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format", FORMAT) != FORMAT:
            raise sqlite3.DatabaseError(f"record format {meta['format']!r}, not {FORMAT!r}")
        # No names: a new file, or one from before they were kept (today's order, then).
        translate = Translation(json.loads(str(meta["names"])) if "names" in meta else VOCABULARY)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?), ('names', ?)",
                   (FORMAT, json.dumps(VOCABULARY)))
        return translate

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{FILE}.corrupt-{int(self._clock())}")
        log.warning("history file unreadable: moved aside, starting a fresh history",
                    extra={"path": str(self.path), "moved_to": str(aside), "error": why})
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            except FileNotFoundError:
                pass

    def load(self) -> int:
        """Read every inbox's history back into memory; the number of inboxes restored.
        Rows that are not plausible are dropped; records stored under other names (an older
        version) are rewritten in today's indexes."""
        if self._db is None:
            return 0
        try:
            with self._lock:
                rows = self._db.execute("SELECT inbox, records FROM history").fetchall()
        except sqlite3.Error as e:  # damage quick_check did not see
            with self._lock:
                self._db.close()
            self._set_aside(str(e))
            self._db = self._open()
            return 0
        now, kept, dropped = self._clock(), {}, []
        for name, records in rows:
            try:
                if not isinstance(name, str) or not isinstance(records, bytes):
                    raise InvalidRecords(1, 1)
                kept[name] = self._translate(records, now)
            except InvalidRecords as e:
                log.warning("stored history of an inbox is not plausible: dropped",
                            extra={"inbox": str(name), "records": e.total, "invalid": e.invalid})
                dropped.append(name)
        for name, records in kept.items():
            self.history.restore(name, records)
        if self._translate.identity:
            if dropped:
                self._write({}, dropped)
        elif self._write(kept, dropped, names=True):
            self._translate = Translation(VOCABULARY)
        else:  # rows in two orders under one set of names would be worse than no file
            log.warning("history storage unusable: kept in memory only",
                        extra={"path": str(self.path), "error": "records not migrated"})
            self.stop()
        return len(kept)

    def start(self) -> None:
        if self._db is None:
            return
        self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_EVERY):
            self.flush()

    def flush(self) -> None:
        """Write what changed since the last flush, in one transaction (after load(): the
        file's rows are in today's indexes only then)."""
        if not self._translate.identity:
            return
        changed = self.history.take_dirty()
        if changed:
            self._write({n: r for n, r in changed.items() if r is not None},
                        [n for n, r in changed.items() if r is None])

    def _write(self, rows: dict[str, bytes], gone: list[str], names: bool = False) -> bool:
        """One transaction: `rows` written, `gone` deleted; with `names`, today's names
        stamped (the rows are in today's indexes). False: not written (a warning)."""
        if self._db is None:
            return False
        try:
            with self._lock:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO history VALUES (?, ?) ON CONFLICT(inbox) DO UPDATE "
                    "SET records=excluded.records", rows.items())
                self._db.executemany("DELETE FROM history WHERE inbox=?", [(n,) for n in gone])
                if names:
                    self._db.execute("INSERT OR REPLACE INTO meta VALUES ('names', ?)",
                                     (json.dumps(VOCABULARY),))
                self._db.execute("COMMIT")
            return True
        except sqlite3.Error as e:
            log.warning("history not written", extra={"path": str(self.path), "error": str(e)})
            try:
                with self._lock:
                    self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        if self._db is not None:
            with self._lock:
                self._db.close()
            self._db = None
