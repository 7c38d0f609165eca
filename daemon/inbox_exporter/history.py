"""The last HISTORY checks of every inbox, compact: what the status page's strips, uptime and
latency sparklines are drawn from, and what `--storage.path` keeps across restarts.

One check is one fixed-size record (ENTRY, 20 bytes): when it started, whether it passed, the
first failing step, its category and reason, and each step's duration in milliseconds. An
inbox's history is one bytearray of at most HISTORY records, oldest first: 2 KB an inbox, 20 MB
at 10,000 inboxes, against ~100 MB as Python objects. Failures that scroll out of it are kept
apart (the last FAILURES of them, as blackbox_exporter does): what went wrong last week stays
visible after a week of successes.

A record holds its failing step, category and reason as positions in today's enum lists; what
those positions mean is VOCABULARY, which storage.py keeps beside the records, so that records
written before a reason was added or moved read back as what they said (`Translation`).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .model import ALL_STEPS, Category, CheckResult, Reason, Status, Step

HISTORY = 100
FAILURES = 20
# started_at (s, uint32: good until 2106), ok, failing step, category, reason (255: none),
# then one uint16 of milliseconds per step (65535: skipped)
ENTRY = struct.Struct("<IBBBB" + "H" * len(ALL_STEPS))
_KEY = struct.Struct(f"<I4s{ENTRY.size - 8}x")  # started_at, and the outcome bytes only
_REASONS = list(Reason)
_CATEGORIES = list(Category)
_NONE = 255
_SKIPPED = 0xFFFF
# The names behind the index bytes, in index order (see Translation).
VOCABULARY: dict[str, tuple[str, ...]] = {
    "steps": tuple(s.value for s in ALL_STEPS),
    "categories": tuple(c.value for c in _CATEGORIES),
    "reasons": tuple(r.value for r in _REASONS)}
EPOCH = 1_577_836_800  # 2020-01-01: no check of ours started earlier
CLOCK_SKEW = 86_400  # a stored check may have started this far "in the future", not more


@dataclass(frozen=True)
class Entry:
    started_at: int
    ok: bool
    failing_step: Step | None
    category: Category | None
    reason: Reason | None
    step_ms: tuple[int | None, ...]  # per ALL_STEPS; None: skipped

    @property
    def total_ms(self) -> int:
        return sum(ms for ms in self.step_ms if ms is not None)


def encode(result: CheckResult) -> bytes:
    first = result.failures[0] if result.failures else None
    d = first.diagnosis if first is not None else None
    durations = []
    for step in ALL_STEPS:
        s = result.step(step)
        durations.append(_SKIPPED if s.status is Status.SKIPPED
                         else min(round(s.duration_seconds * 1000), _SKIPPED - 1))
    return ENTRY.pack(int(result.started_at), result.ok,
                      ALL_STEPS.index(first.step) if first is not None else _NONE,
                      _CATEGORIES.index(d.category) if d is not None else _NONE,
                      _REASONS.index(d.reason) if d is not None else _NONE, *durations)


def decode(record: bytes) -> Entry:
    started, ok, step, category, reason, *ms = ENTRY.unpack(record)
    return Entry(started, bool(ok), ALL_STEPS[step] if step < len(ALL_STEPS) else None,
                 _CATEGORIES[category] if category < len(_CATEGORIES) else None,
                 _REASONS[reason] if reason < len(_REASONS) else None,
                 tuple(None if m == _SKIPPED else m for m in ms))


@dataclass
class Run:
    """Consecutive checks with the same outcome (ok, or the same step failing the same way)."""

    first: Entry
    last_started_at: int
    count: int


class InvalidRecords(ValueError):
    """Stored records that cannot be ours (torn, out of range, from 2106): none is shown."""

    def __init__(self, invalid: int, total: int):
        super().__init__(f"{invalid} of {total} records invalid")
        self.invalid = invalid
        self.total = total


class Translation:
    """Records as stored -> records in today's indexes, each checked first.

    Built from the names the file's records were written with. A name we no longer know reads
    back as Reason.UNKNOWN (a reason) or None (a step, a category); the step durations follow
    the step names too. Raises ValueError for names that cannot describe our record layout.
    """

    def __init__(self, names: Mapping[str, Sequence[str]]):
        if not isinstance(names, Mapping) or set(names) != set(VOCABULARY) or any(
                not isinstance(n, list | tuple) or len(n) >= _NONE
                or not all(isinstance(x, str) for x in n) for n in names.values()):
            raise ValueError("not a vocabulary of ours")
        steps = list(names["steps"])
        if len(steps) != len(ALL_STEPS):
            raise ValueError(f"{len(steps)} steps stored, records hold {len(ALL_STEPS)}")
        self.identity = all(tuple(names[k]) == v for k, v in VOCABULARY.items())
        self._step = _table(steps, VOCABULARY["steps"], _NONE)
        self._category = _table(names["categories"], VOCABULARY["categories"], _NONE)
        self._reason = _table(names["reasons"], VOCABULARY["reasons"],
                              _REASONS.index(Reason.UNKNOWN))
        # today's step i takes its duration from where its name was (a new step: skipped)
        self._durations = [steps.index(s) if s in steps else None for s in VOCABULARY["steps"]]

    def __call__(self, records: bytes, now: float) -> bytes:
        """Raises InvalidRecords unless every record is plausible: whole, ok 0 or 1 (and then
        no failure), every index known to the stored names, started since EPOCH and not
        later than `now` plus CLOCK_SKEW."""
        total, torn = divmod(len(records), ENTRY.size)
        if torn:
            raise InvalidRecords(total + 1, total + 1)
        out, invalid = bytearray(), 0
        for started, ok, step, category, reason, *ms in ENTRY.iter_unpack(records):
            indexes = (self._step[step], self._category[category], self._reason[reason])
            if (ok > 1 or None in indexes or not EPOCH <= started <= now + CLOCK_SKEW
                    or (ok and (step, category, reason) != (_NONE, _NONE, _NONE))):
                invalid += 1
            elif not invalid and not self.identity:
                out += ENTRY.pack(started, ok, *indexes,
                                  *(_SKIPPED if i is None else ms[i] for i in self._durations))
        if invalid:
            raise InvalidRecords(invalid, total)
        return records if self.identity else bytes(out)


def _table(stored: Sequence[str], today: Sequence[str], unknown: int) -> list[int | None]:
    """Stored index -> today's index; None: an index the stored names do not have."""
    table: list[int | None] = [today.index(n) if n in today else unknown for n in stored]
    table += [None] * (_NONE - len(table)) + [_NONE]
    return table


def _decode_all(ring: bytes) -> list[Entry]:
    return [decode(ring[i:i + ENTRY.size]) for i in range(0, len(ring), ENTRY.size)]


class History:
    def __init__(self, size: int = HISTORY):
        self.size = size
        self._rings: dict[str, bytearray] = {}
        self._failures: dict[str, bytearray] = {}  # failures scrolled out of the ring
        # changed by every add, never reused (an inbox removed and added back does not find
        # its old number): lets pages cache drawings
        self._versions: dict[str, int] = {}
        self._last_version = 0
        self._dirty: set[str] = set()  # changed since the last take_dirty() (persistence)
        self._lock = threading.Lock()

    def add(self, name: str, result: CheckResult) -> None:
        record = encode(result)
        with self._lock:
            ring = self._rings.setdefault(name, bytearray())
            ring += record
            self._bump(name)
            excess = len(ring) - self.size * ENTRY.size
            if excess > 0:
                for i in range(0, excess, ENTRY.size):
                    if not ring[i + 4]:  # the ok byte: a failure scrolls into its own ring
                        kept = self._failures.setdefault(name, bytearray())
                        kept += ring[i:i + ENTRY.size]
                        del kept[:max(0, len(kept) - FAILURES * ENTRY.size)]
                del ring[:excess]
            self._dirty.add(name)

    def entries(self, name: str, last: int | None = None) -> list[Entry]:
        """Oldest first; only the `last` ones when given (no more decoded than shown)."""
        with self._lock:
            ring = self._rings.get(name, b"")
            ring = bytes(ring if last is None else ring[-last * ENTRY.size:])
        return _decode_all(ring)

    def runs(self, name: str) -> list[Run]:
        """The ring as runs, oldest first; only the first record of each run is decoded (the
        status page draws 10,000 of these)."""
        with self._lock:
            ring = bytes(self._rings.get(name, b""))
        runs: list[Run] = []
        previous = None
        for i, (started, key) in enumerate(_KEY.iter_unpack(ring)):
            if key == previous:
                runs[-1].last_started_at = started
                runs[-1].count += 1
            else:
                runs.append(Run(decode(ring[i * ENTRY.size:(i + 1) * ENTRY.size]), started, 1))
                previous = key
        return runs

    def version(self, name: str) -> int:
        return self._versions.get(name, 0)

    def older_failures(self, name: str) -> list[Entry]:
        """Failures that scrolled out of the ring, oldest first."""
        with self._lock:
            ring = bytes(self._failures.get(name, b""))
        return _decode_all(ring)

    def uptime(self, name: str) -> float | None:
        """The share of ok checks, from the ok bytes alone (no record decoded)."""
        with self._lock:
            oks = bytes(self._rings.get(name, b"")[4::ENTRY.size])
        return sum(oks) / len(oks) if oks else None

    def keep(self, names: Iterable[str]) -> None:
        """A reload: inboxes no longer configured lose their history (and version)."""
        wanted = set(names)
        with self._lock:
            for name in (self._rings.keys() | self._versions.keys()) - wanted:
                self._rings.pop(name, None)
                self._failures.pop(name, None)
                self._versions.pop(name, None)
                self._dirty.add(name)

    # --- persistence (storage.py) --------------------------------------------------------

    def take_dirty(self) -> dict[str, bytes | None]:
        """What changed since the last call: name -> its records (None: gone)."""
        with self._lock:
            out = {n: bytes(self._rings[n]) if n in self._rings else None for n in self._dirty}
            self._dirty.clear()
        return out

    def restore(self, name: str, records: bytes) -> bool:
        """Records read back from storage (checked and translated: Translation); refused
        (False) when they are not whole records."""
        if len(records) % ENTRY.size:
            return False
        with self._lock:
            ring = bytearray(records) + self._rings.get(name, bytearray())  # older first
            self._rings[name] = ring[-self.size * ENTRY.size:]
            self._bump(name)
        return True

    def _bump(self, name: str) -> None:
        self._last_version += 1
        self._versions[name] = self._last_version

    def nbytes(self) -> int:
        with self._lock:
            return sum(len(r) for r in (*self._rings.values(), *self._failures.values()))
