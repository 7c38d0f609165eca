"""The history file (--storage.path) read back: a damaged or foreign file is set aside once,
records that cannot be ours are dropped, and records keep their meaning when the enums change.
No mail server needed: results are built here."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from inbox_exporter.history import ENTRY, VOCABULARY, History
from inbox_exporter.model import ALL_STEPS, Category, CheckResult, Diagnosis, Reason, Status, Step, StepResult
from inbox_exporter.storage import FILE, HistoryStorage

NOW = 1_800_000_000.0


def result(started_at: float, failing: tuple[Step, Category, Reason] | None = None) -> CheckResult:
    """Every step ok (each with its own duration), or `failing` failed and the rest ok."""
    steps = tuple(
        StepResult(s, Status.FAILED, 0.25, Diagnosis(failing[1], failing[2], "hint", "detail"))
        if failing and s is failing[0] else StepResult(s, Status.OK, 0.1 + i / 100)
        for i, s in enumerate(ALL_STEPS))
    return CheckResult("x", started_at, 1.0, steps, "probe-id")


def storage(directory: Path, history: History | None = None) -> HistoryStorage:
    return HistoryStorage(str(directory), history or History(), clock=lambda: NOW)


def filled(directory: Path, inboxes: int = 1, checks: int = 3) -> None:
    """A history file of `inboxes` inboxes, `checks` healthy checks each."""
    history = History()
    for n in range(inboxes):
        for i in range(checks):
            history.add(f"inbox-{n}", result(NOW - 600 + i))
    s = storage(directory, history)
    s.stop()  # flushes


def set_aside(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".corrupt-" in p.name)


def warnings(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def assert_fresh_and_working(directory: Path, caplog) -> None:
    """The fresh file holds what is written to it, and a second start warns about nothing."""
    history = History()
    s = storage(directory, history)
    assert s.load() == 0
    history.add("new", result(NOW))
    s.stop()
    caplog.clear()
    again = History()
    s = storage(directory, again)
    assert s.load() == 1 and len(again.entries("new")) == 1
    s.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_damaged_file_sqlite_still_opens_is_set_aside_once_and_a_fresh_one_started(
        tmp_path, caplog):
    filled(tmp_path, inboxes=300, checks=100)  # ~150 pages
    path = tmp_path / FILE
    with path.open("r+b") as f:  # pages 20 to 40 overwritten; the header (page 1) intact
        f.seek(4096 * 20)
        f.write(bytes(range(256)) * 16 * 20)
    with sqlite3.connect(path) as db:  # SQLite still opens it and reads its first pages
        assert db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
    db.close()

    history = History()
    s = storage(tmp_path, history)
    assert s.load() == 0
    s.stop()
    assert len(set_aside(tmp_path)) == 1
    assert len(warnings(caplog, "moved aside")) == 1
    assert_fresh_and_working(tmp_path, caplog)


@pytest.mark.parametrize("schema", [
    "CREATE TABLE history (id INTEGER PRIMARY KEY, data TEXT)",
    "CREATE TABLE history (inbox TEXT PRIMARY KEY, records TEXT)",
    "CREATE TABLE meta (name TEXT, setting INTEGER)",
])
def test_a_file_with_tables_of_another_shape_is_set_aside_once(tmp_path, schema, caplog):
    with sqlite3.connect(tmp_path / FILE) as db:
        db.execute(schema)
    db.close()
    s = storage(tmp_path)
    assert s.load() == 0
    s.stop()
    assert len(set_aside(tmp_path)) == 1 and len(warnings(caplog, "moved aside")) == 1
    assert_fresh_and_working(tmp_path, caplog)


def record(started: int = int(NOW), ok: int = 1, step: int = 255, category: int = 255,
           reason: int = 255) -> bytes:
    return ENTRY.pack(started, ok, step, category, reason, *[10] * len(ALL_STEPS))


INVALID = {  # inbox -> its stored records, and how many of them are invalid
    "all-ff": (b"\xff" * ENTRY.size * 3, 3),
    "ok-byte-2": (record() + record(ok=2), 1),
    "step-out-of-range": (record(ok=0, step=len(ALL_STEPS), category=0, reason=0), 1),
    "category-out-of-range": (record(ok=0, step=0, category=len(Category), reason=0), 1),
    "reason-out-of-range": (record(ok=0, step=0, category=0, reason=200), 1),
    "ok-with-a-reason": (record(ok=1, step=0, category=0, reason=0), 1),
    "started-in-1970": (record(started=5) + record(), 1),
    "started-in-2106": (record() + record(started=0xFFFFFFFF), 1),
    "torn": (record() + record()[:7], 2),
}


def test_records_that_cannot_be_ours_drop_their_inbox_with_a_warning_naming_it(
        tmp_path, caplog):
    filled(tmp_path)
    with sqlite3.connect(tmp_path / FILE) as db:
        db.executemany("INSERT INTO history VALUES (?, ?)",
                       [(name, records) for name, (records, _) in INVALID.items()])
    db.close()

    history = History()
    s = storage(tmp_path, history)
    assert s.load() == 1  # inbox-0 only
    s.stop()
    assert len(history.entries("inbox-0")) == 3 and history.uptime("inbox-0") == 1.0
    dropped = {r.__dict__["inbox"]: (r.__dict__["records"], r.__dict__["invalid"])
               for r in warnings(caplog, "not plausible")}
    assert dropped == {name: (len(records) // ENTRY.size + (len(records) % ENTRY.size > 0),
                              invalid) for name, (records, invalid) in INVALID.items()}
    for name in INVALID:
        assert history.uptime(name) is None and history.entries(name) == []
    with sqlite3.connect(tmp_path / FILE) as db:  # dropped from the file: no warning next time
        assert [r[0] for r in db.execute("SELECT inbox FROM history")] == ["inbox-0"]
    db.close()


def test_records_read_back_by_name_after_the_enums_are_reordered_or_extended(tmp_path):
    """An older version wrote these: its lists had a reason and a category we no longer know,
    in another order, and its steps in another order (durations follow them)."""
    filled(tmp_path, inboxes=0)
    old = {"steps": list(reversed(VOCABULARY["steps"])),
           "categories": ["gone_category", *reversed(VOCABULARY["categories"])],
           "reasons": [*VOCABULARY["reasons"][:3], "gone_reason", *VOCABULARY["reasons"][3:]]}
    ms = {step: 100 + i for i, step in enumerate(ALL_STEPS)}

    def written_then(started: int, step: str, category: str, reason: str) -> bytes:
        return ENTRY.pack(started, 0, old["steps"].index(step), old["categories"].index(category),
                          old["reasons"].index(reason), *[ms[Step(s)] for s in old["steps"]])

    rows = {
        "login": written_then(int(NOW) - 60, "imap_login", "unauthorized", "auth_failed")
        + written_then(int(NOW), "smtp_login", "imap_settings_incorrect", "too_many_connections"),
        "gone": written_then(int(NOW), "test_email", "gone_category", "gone_reason"),
    }
    with sqlite3.connect(tmp_path / FILE) as db:
        db.execute("UPDATE meta SET value=? WHERE key='names'", (json.dumps(old),))
        db.executemany("INSERT INTO history VALUES (?, ?)", rows.items())
    db.close()

    for _ in range(2):  # the first load rewrites the file in today's order: the same again
        history = History()
        s = storage(tmp_path, history)
        assert s.load() == 2
        s.stop()
        first, second = history.entries("login")
        assert (first.failing_step, first.category, first.reason) == (
            Step.IMAP_LOGIN, Category.UNAUTHORIZED, Reason.AUTH_FAILED)
        assert (second.failing_step, second.category, second.reason) == (
            Step.SMTP_LOGIN, Category.IMAP_SETTINGS_INCORRECT, Reason.TOO_MANY_CONNECTIONS)
        assert first.step_ms == tuple(ms[s] for s in ALL_STEPS)
        (gone,) = history.entries("gone")
        assert (gone.failing_step, gone.category, gone.reason) == (
            Step.TEST_EMAIL, None, Reason.UNKNOWN)
    with sqlite3.connect(tmp_path / FILE) as db:
        names = db.execute("SELECT value FROM meta WHERE key='names'").fetchone()[0]
    db.close()
    assert json.loads(names) == {k: list(v) for k, v in VOCABULARY.items()}
