"""`--storage.path`: the compact check history (history.py) in SQLite, so that a restart does not
blank the status page's strips. Nothing else is kept: metrics live in Prometheus, and a
transcript is only worth its latest version.

- One row per inbox holding its records; written in batches (every FLUSH_EVERY seconds, and at
  shutdown) by a thread of its own, so a check never waits for the disk.
- WAL journal, synchronous=NORMAL: a kill -9 loses at most the last batch, never the file.
- A file that cannot be opened, is not SQLite, or holds another record format is a warning: it
  is moved aside (`history.db.corrupt-<time>`) and a fresh one started. Never a crash.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from .history import ENTRY, History

log = logging.getLogger(__name__)

FILE = "history.db"
FLUSH_EVERY = 5.0
FORMAT = f"v1 {ENTRY.format}"  # a change of the record layout starts a fresh file


class HistoryStorage:
    def __init__(self, directory: str, history: History):
        self.path = Path(directory) / FILE
        self.history = history
        self._db: sqlite3.Connection | None = None
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
            try:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                db.execute("CREATE TABLE IF NOT EXISTS history "
                           "(inbox TEXT PRIMARY KEY, records BLOB NOT NULL)")
                row = db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
                elif row[0] != FORMAT:
                    raise sqlite3.DatabaseError(f"record format {row[0]!r}, not {FORMAT!r}")
                db.execute("PRAGMA quick_check")
                return db
            except sqlite3.Error as e:
                if attempt == 2:
                    log.warning("history storage unusable: kept in memory only",
                                extra={"path": str(self.path), "error": str(e)})
                    return None
                self._set_aside(str(e))
        return None

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{FILE}.corrupt-{int(time.time())}")
        log.warning("history file unreadable: moved aside, starting a fresh history",
                    extra={"path": str(self.path), "moved_to": str(aside), "error": why})
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            except FileNotFoundError:
                pass

    def load(self) -> int:
        """Read every inbox's history back into memory; the number of inboxes restored."""
        if self._db is None:
            return 0
        restored = 0
        try:
            with self._lock:
                rows = self._db.execute("SELECT inbox, records FROM history").fetchall()
        except sqlite3.Error as e:
            log.warning("history file unreadable: starting a fresh history",
                        extra={"path": str(self.path), "error": str(e)})
            return 0
        for name, records in rows:
            if isinstance(records, bytes) and self.history.restore(name, records):
                restored += 1
        return restored

    def start(self) -> None:
        if self._db is None:
            return
        self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_EVERY):
            self.flush()

    def flush(self) -> None:
        """Write what changed since the last flush, in one transaction."""
        changed = self.history.take_dirty()
        if not changed or self._db is None:
            return
        try:
            with self._lock:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO history VALUES (?, ?) ON CONFLICT(inbox) DO UPDATE "
                    "SET records=excluded.records",
                    [(n, r) for n, r in changed.items() if r is not None])
                self._db.executemany("DELETE FROM history WHERE inbox=?",
                                     [(n,) for n, r in changed.items() if r is None])
                self._db.execute("COMMIT")
        except sqlite3.Error as e:
            log.warning("history not written", extra={"path": str(self.path), "error": str(e)})
            try:
                with self._lock:
                    self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        if self._db is not None:
            with self._lock:
                self._db.close()
            self._db = None
