"""The status of every inbox for people: the JSON of /api/v1/status and the HTML page at /.

Everything shown comes from check results (hints, redacted details) and the non-secret parts
of the config; the page has no external assets and works on a phone.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from .history import Entry
from .model import Diagnosis, Status
from .store import InboxState


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def human(iso: str | None) -> str | None:
    """'2026-11-27T05:36:37+00:00' -> '2026-11-27 05:36:37 UTC' for the page."""
    return None if iso is None else iso.replace("T", " ").replace("+00:00", " UTC")


def state_word(state: InboxState) -> str:
    if state.last is None:
        return "pending"
    return "ok" if state.last.ok else "failing"


SHOWN = 20  # recent checks in a status's "history" (the page per inbox shows all 100)


def inbox_status(state: InboxState, next_run: float | None, recent: Sequence[Entry] = (),
                 older_failures: Sequence[Entry] = ()) -> dict:
    """`recent`: the inbox's history entries, oldest first; `older_failures`: those that
    scrolled out of it."""
    last = state.last
    first_failure = last.failures[0] if last and last.failures else None
    diagnosis = first_failure.diagnosis if first_failure else None
    return {
        "name": state.inbox.name,
        "provider": state.inbox.provider,
        "imap": f"{state.inbox.imap.host}:{state.inbox.imap.port} ({state.inbox.imap.security})",
        "smtp": f"{state.inbox.smtp.host}:{state.inbox.smtp.port} ({state.inbox.smtp.security})",
        # how it logs in: "password", or "oauth2 (xoauth2, refresh_token)"; never a secret
        "auth": (f"oauth2 ({state.inbox.oauth.mechanism}, {state.inbox.oauth.grant})"
                 if state.inbox.oauth else "password"),
        "state": state_word(state),
        "ok": None if last is None else last.ok,
        "failing_step": first_failure.step.value if first_failure else None,
        "category": diagnosis.category.value if diagnosis else None,
        "reason": diagnosis.reason.value if diagnosis else None,
        "hint": diagnosis.hint if diagnosis else None,
        "consecutive_failures": state.consecutive_failures,
        # why the interval is stretched (credential failure, rate limit), or None
        "backing_off": _backing_off(state, diagnosis),
        "interval_seconds": state.interval,
        "last_check": _iso(last.started_at) if last else None,
        "last_check_duration_seconds": round(last.duration_seconds, 6) if last else None,
        "last_success": _iso(state.last_success_at),
        "last_test_email": _iso(state.last_test_email_at),
        "next_run": _iso(next_run),
        "steps": [{**s.to_json(), "note": s.note} for s in last.steps] if last else [],
        "delivery": None if state.delivery is None else {
            **state.delivery.step.to_json(), "probe_id": state.delivery.probe_id,
            "folder": state.delivery.folder,
            "authentication": None if state.delivery.verdict is None else {
                "results": state.delivery.verdict.results,
                "reasons": state.delivery.verdict.reasons,
                "authserv_id": state.delivery.verdict.authserv_id,
                "source": state.delivery.verdict.source,
                "summary": state.delivery.verdict.summary()},
            "received_seconds": state.delivery.received_seconds},
        # Recent checks, newest first, then failures that scrolled out: what happened before.
        "history": [_summary(e) for e in (*reversed(recent[-SHOWN:]), *reversed(older_failures))],
        "certificates": [
            {"protocol": c.protocol.value, "trusted": c.trusted, "expires": _iso(c.not_after)}
            for c in (last.certificates if last else ())],
    }


def _backing_off(state: InboxState, diagnosis: Diagnosis | None) -> str | None:
    """Why the inbox is checked less often than configured, or None."""
    if not state.effective_interval:
        return None
    why = diagnosis.reason.value if diagnosis else "a failure"
    pace = f"checked every {duration(state.effective_interval)}"
    if state.effective_interval != state.inbox.interval:
        pace += f" instead of {duration(state.inbox.interval)}"
    return f"after {why}: {pace} until a check succeeds, so the account is not locked"


def duration(seconds: float) -> str:
    """3600 -> '1h', 5400 -> '1h30m', 90 -> '1m30s'."""
    s = int(seconds)
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v) or "0s"


def _summary(e: Entry) -> dict:
    return {"started_at": _iso(e.started_at), "ok": e.ok,
            "failing_step": e.failing_step.value if e.failing_step else None,
            "category": e.category.value if e.category else None,
            "reason": e.reason.value if e.reason else None}


def render_json(statuses: list[dict], load: dict | None = None) -> str:
    failing = sum(1 for s in statuses if s["state"] == "failing")
    return json.dumps({"generated_at": _iso(time.time()), "inboxes_total": len(statuses),
                       "inboxes_failing": failing, "load": load, "inboxes": statuses}, indent=2)


def _load_line(load: dict | None) -> str:
    """Saturation, where the operator looks first: connections open and waiting for a slot."""
    if not load:
        return ""
    text = f"{load['connections_active']} connections open"
    if load["connections_waiting"]:
        text += (f", <strong>{load['connections_waiting']} waiting for a slot</strong> (a slow "
                 "or hanging server, or more inboxes than its connection cap allows)")
    return f" · {text}"


PAGE_CSS = """
:root{--ok:#1a7f37;--bad:#cf222e;--wait:#6e7781;--line:#d0d7de;
 font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
body{margin:0;padding:1rem;color:#1f2328;background:#f6f8fa}
h1{font-size:1.3rem;margin:0 0 .3rem}
.summary{margin:0 0 1rem;color:#57606a}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid var(--line)}
th,td{text-align:left;padding:.5rem .6rem;border-bottom:1px solid var(--line);vertical-align:top}
th{cursor:pointer;user-select:none;background:#f6f8fa;white-space:nowrap}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:1rem;color:#fff;font-weight:600;
 font-size:.85rem}
.ok .badge{background:var(--ok)}.failing .badge{background:var(--bad)}.pending .badge{background:var(--wait)}
tr.failing td:first-child{border-left:4px solid var(--bad)}
tr.ok td:first-child{border-left:4px solid var(--ok)}
code{font-size:.85rem}
.steps td{padding:.2rem .4rem}.muted{color:#57606a}
@media (max-width:700px){table,thead,tbody,tr,td{display:block}thead{display:none}
 tr{margin-bottom:.7rem;border:1px solid var(--line);background:#fff}td{border:none}
 td[data-label]::before{content:attr(data-label) ": ";font-weight:600;color:#57606a}
 .steps tr{margin:0;border:none}}
"""

_JS = """
document.querySelectorAll('th[data-key]').forEach(function(th){th.tabIndex=0;
 th.addEventListener('keydown',function(e){if(e.key==='Enter'||e.key===' '){e.preventDefault();th.click()}});
 th.addEventListener('click',function(){
 var table=th.closest('table'),body=table.tBodies[0],
  i=Array.prototype.indexOf.call(th.parentNode.children,th);
 var asc=th.getAttribute('aria-sort')!=='ascending';
 table.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort')});
 th.setAttribute('aria-sort',asc?'ascending':'descending');
 var rows=Array.prototype.slice.call(body.rows);
 rows.sort(function(a,b){var x=a.cells[i].getAttribute('data-sort')||a.cells[i].textContent,
  y=b.cells[i].getAttribute('data-sort')||b.cells[i].textContent;return (x<y?-1:x>y?1:0)*(asc?1:-1)});
 rows.forEach(function(r){body.appendChild(r)});});});
"""

def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def shell(title: str, css: str, body: str, script: str | None = None, refresh: int = 30) -> str:
    """A whole page: its own inline style (and script), nothing from elsewhere."""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
            f"<meta http-equiv=refresh content={refresh}><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>{body}"
            + (f"<script>{script}</script>" if script else "") + "</body></html>")


def content_security_policy(*styles: str, scripts: tuple[str, ...] = ()) -> str:
    """Only these inline styles and scripts (by hash): nothing else may load, run, frame the
    page or be posted from it, so an injected tag would be inert."""
    script_src = " ".join(_sha256(s) for s in scripts) or "'none'"
    return (f"default-src 'none'; style-src {' '.join(_sha256(s) for s in styles)}; "
            f"script-src {script_src}; img-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


CONTENT_SECURITY_POLICY = content_security_policy(PAGE_CSS, scripts=(_JS,))


def latency(step: dict) -> str:
    return "" if step["status"] == Status.SKIPPED else f"{step['duration_seconds'] * 1000:.0f} ms"


_RANK = {"failing": "0", "pending": "1", "ok": "2"}


def render_html(statuses: list[dict], load: dict | None = None,
                strips: dict[str, str] | None = None) -> str:
    """The status page; `strips`: inbox name -> its history strip (svg.strip, merged)."""
    strips = strips or {}
    e = html.escape
    failing = sum(1 for s in statuses if s["state"] == "failing")
    rows = []
    for s in sorted(statuses, key=lambda s: (_RANK[s["state"]], s["name"])):
        why = f"{s['category']} / {s['reason']}" if s["category"] else ""
        rows.append(
            f"<tr class={s['state']} data-inbox=\"{e(s['name'])}\">"
            f"<td data-label=Inbox><a href=\"/inbox/{e(s['name'])}\"><strong>{e(s['name'])}"
            f"</strong></a><br>"
            f"<span class=muted>{e(s['provider'])}</span></td>"
            f"<td data-label=Status data-sort={_RANK[s['state']]}>"
            f"<span class=badge>{e(s['state'])}</span></td>"
            f"<td data-label=\"Failing step\">{e(s['failing_step'] or '')}</td>"
            f"<td data-label=Why><code>{e(why)}</code></td>"
            f"<td data-label=Hint>{e(s['hint'] or '')}</td>"
            f"<td data-label=\"Last success\" data-sort=\"{e(s['last_success'] or '')}\">"
            f"{e(human(s['last_success']) or 'never')}</td>"
            f"<td data-label=\"Last check\">{e(human(s['last_check']) or 'not yet')}</td>"
            f"<td data-label=History data-sort=\"{s.get('uptime', '')}\">"
            f"{strips.get(s['name'], '')}</td></tr>")
    head = "".join(f"<th data-key={k}>{label}</th>" for k, label in (
        ("name", "Inbox"), ("state", "Status"), ("step", "Failing step"), ("why", "Why"),
        ("hint", "Hint"), ("success", "Last success"), ("check", "Last check"),
        ("history", "History")))
    body = (
        f"<h1>Connected inboxes</h1>"
        f"<p class=summary id=summary>{len(statuses) - failing} of {len(statuses)} OK"
        f"{f', {failing} failing' if failing else ''}{_load_line(load)} · "
        "<a href=/metrics>metrics</a> · <a href=/api/v1/status>JSON</a></p>"
        f"<table id=inboxes><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return shell("inbox-exporter", PAGE_CSS, body, script=_JS)
