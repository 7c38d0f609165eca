"""The last HISTORY checks of every inbox, compact: what the status page's strips, uptime and
latency sparklines are drawn from, and what `--storage.path` keeps across restarts.

One check is one fixed-size record (ENTRY, 19 bytes): when it started, whether it passed, the
first failing step and its reason, and each step's duration in milliseconds. An inbox's history
is one bytearray of at most HISTORY records, oldest first: 1.9 KB an inbox, 19 MB at 10,000
inboxes, against ~100 MB as Python objects.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from .model import ALL_STEPS, CheckResult, Reason, Status, Step

HISTORY = 100
# started_at (s, uint32: good until 2106), ok, failing step (255: none), reason (255: none),
# then one uint16 of milliseconds per step (65535: skipped)
ENTRY = struct.Struct("<IBBB" + "H" * len(ALL_STEPS))
_REASONS = list(Reason)
_NONE = 255
_SKIPPED = 0xFFFF


@dataclass(frozen=True)
class Entry:
    started_at: int
    ok: bool
    failing_step: Step | None
    reason: Reason | None
    step_ms: tuple[int | None, ...]  # per ALL_STEPS; None: skipped

    @property
    def total_ms(self) -> int:
        return sum(ms for ms in self.step_ms if ms is not None)


def encode(result: CheckResult) -> bytes:
    first = result.failures[0] if result.failures else None
    reason = first.diagnosis.reason if first is not None and first.diagnosis else None
    durations = []
    for step in ALL_STEPS:
        s = result.step(step)
        durations.append(_SKIPPED if s.status is Status.SKIPPED
                         else min(round(s.duration_seconds * 1000), _SKIPPED - 1))
    return ENTRY.pack(int(result.started_at), result.ok,
                      ALL_STEPS.index(first.step) if first is not None else _NONE,
                      _REASONS.index(reason) if reason is not None else _NONE, *durations)


def decode(record: bytes) -> Entry:
    started, ok, step, reason, *ms = ENTRY.unpack(record)
    return Entry(started, bool(ok), ALL_STEPS[step] if step < len(ALL_STEPS) else None,
                 _REASONS[reason] if reason < len(_REASONS) else None,
                 tuple(None if m == _SKIPPED else m for m in ms))


class History:
    def __init__(self, size: int = HISTORY):
        self.size = size
        self._rings: dict[str, bytearray] = {}
        self._dirty: set[str] = set()  # changed since the last take_dirty() (persistence)
        self._lock = threading.Lock()

    def add(self, name: str, result: CheckResult) -> None:
        record = encode(result)
        with self._lock:
            ring = self._rings.setdefault(name, bytearray())
            ring += record
            excess = len(ring) - self.size * ENTRY.size
            if excess > 0:
                del ring[:excess]
            self._dirty.add(name)

    def entries(self, name: str) -> list[Entry]:
        """Oldest first."""
        with self._lock:
            ring = bytes(self._rings.get(name, b""))
        return [decode(ring[i:i + ENTRY.size]) for i in range(0, len(ring), ENTRY.size)]

    def keep(self, names: Iterable[str]) -> None:
        """A reload: inboxes no longer configured lose their history."""
        wanted = set(names)
        with self._lock:
            for name in self._rings.keys() - wanted:
                del self._rings[name]
                self._dirty.add(name)

    # --- persistence (storage.py) --------------------------------------------------------

    def take_dirty(self) -> dict[str, bytes | None]:
        """What changed since the last call: name -> its records (None: gone)."""
        with self._lock:
            out = {n: bytes(self._rings[n]) if n in self._rings else None for n in self._dirty}
            self._dirty.clear()
        return out

    def restore(self, name: str, records: bytes) -> bool:
        """Records read back from storage; refused (False) when they are not whole records."""
        if len(records) % ENTRY.size:
            return False
        with self._lock:
            ring = bytearray(records) + self._rings.get(name, bytearray())  # older first
            self._rings[name] = ring[-self.size * ENTRY.size:]
        return True

    def nbytes(self) -> int:
        with self._lock:
            return sum(len(r) for r in self._rings.values())
