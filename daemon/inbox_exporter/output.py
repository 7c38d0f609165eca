"""Rendering check results for people (a table per inbox) and for tools (the JSON shape)."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence

from .model import CheckResult, Status
from .transcript import unpack

_MARK = {Status.OK: "ok", Status.FAILED: "FAILED", Status.SKIPPED: "skipped"}


def render_json(results: Sequence[CheckResult], transcript: bool = False) -> str:
    def one(r: CheckResult) -> dict:
        doc = r.to_json()
        if transcript:
            doc["transcript"] = unpack(r.transcript)
        return doc

    return json.dumps({"inboxes": [one(r) for r in results]}, indent=2)


def render_text(results: Sequence[CheckResult], width: int = 100,
                transcript: bool = False) -> str:
    out: list[str] = []
    for r in results:
        verdict = "OK" if r.ok else "FAILING"
        out.append(f"{r.inbox}: {verdict} in {_ms(r.duration_seconds)}")
        out.append(f"  {'STEP':<15} {'STATUS':<8} {'LATENCY':>9}  CATEGORY / REASON")
        for s in r.steps:
            latency = _ms(s.duration_seconds) if s.status is not Status.SKIPPED else "-"
            d = s.diagnosis
            why = f"{d.category.value} / {d.reason.value}" if d else (s.note or "")
            out.append(f"  {s.step.value:<15} {_MARK[s.status]:<8} {latency:>9}  {why}".rstrip())
            if d:
                for label, text in (("hint", d.hint), ("detail", d.detail)):
                    wrapped = textwrap.wrap(f"{label}: {text}", width - 6)
                    out.extend("      " + line for line in wrapped)
        if transcript and r.transcript:
            out.append("  transcript (redacted):")
            out.extend("    " + line for line in (unpack(r.transcript) or "").splitlines())
        out.append("")
    failing = sum(1 for r in results if not r.ok)
    out.append(f"{len(results) - failing} of {len(results)} inboxes OK")
    return "\n".join(out)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"
