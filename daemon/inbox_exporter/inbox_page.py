"""One inbox, for a person: /inbox/NAME and /api/v1/inboxes/NAME.

The latest result step by step, its category, reason and hint, the certificates, the history
of the last checks as a strip (one cell per check), uptime and a latency sparkline over them,
why and until when the inbox backs off, and the redacted transcripts of the last check and the
last failure as plain text (select and copy). Everything comes from the status dict (no
secrets) and the redacted transcripts.
"""

from __future__ import annotations

import html
import json

from . import svg
from .history import Entry
from .model import ALL_STEPS
from .status import PAGE_CSS, content_security_policy, human, latency, shell

INBOX_CSS = """
.card{background:#fff;border:1px solid var(--line);padding:.8rem 1rem;margin:0 0 1rem}
.card h2{font-size:1.05rem;margin:0 0 .5rem}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;margin:0}
dt{color:#57606a}dd{margin:0}pre{white-space:pre-wrap;word-break:break-all;font-size:.8rem;background:#f6f8fa;
padding:.6rem;border:1px solid var(--line);max-height:40rem;overflow:auto}
.backoff{border-left:4px solid #bf8700}
"""
CONTENT_SECURITY_POLICY = content_security_policy(PAGE_CSS + INBOX_CSS)
STEP_NAMES = [s.value for s in ALL_STEPS]


def render_json(status: dict, entries: list[Entry], transcripts: dict[str, str | None]) -> str:
    up = svg.uptime(entries)
    return json.dumps({
        **status,
        "uptime": None if up is None else round(up, 4),
        "checks": [{"started_at": e.started_at, "ok": e.ok,
                    "failing_step": e.failing_step.value if e.failing_step else None,
                    "reason": e.reason.value if e.reason else None,
                    "step_ms": dict(zip(STEP_NAMES, e.step_ms, strict=True))}
                   for e in entries],
        "transcripts": transcripts}, indent=2)


def render_html(s: dict, entries: list[Entry], transcripts: dict[str, str | None]) -> str:
    e = html.escape
    up = svg.uptime(entries)
    steps = "".join(
        f"<tr><td>{e(st['step'])}</td><td>{e(st['status'])}</td>"
        f"<td>{latency(st)}</td>"
        f"<td>{e(st.get('category') or '')}{' / ' if st.get('reason') else ''}"
        f"{e(st.get('reason') or '')}</td><td>{e(st['detail'] or st['note'] or '')}</td></tr>"
        for st in s["steps"])
    verdict = ""
    if s["category"]:
        verdict = (f"<p><strong>{e(s['failing_step'])}</strong>: <code>{e(s['category'])} / "
                   f"{e(s['reason'])}</code></p><p>{e(s['hint'] or '')}</p>")
    backoff = ""
    if s.get("backing_off"):
        backoff = (f"<div class='card backoff'><h2>Backing off</h2><p>{e(s['backing_off'])}; "
                   f"next check {e(human(s['next_run']) or 'not scheduled')}.</p></div>")
    certs = "".join(f"<dt>{e(c['protocol'])}</dt><dd>{'trusted' if c['trusted'] else 'NOT trusted'}"
                    f", expires {e(human(c['expires']) or '?')}</dd>" for c in s["certificates"])
    history = ""
    if up is not None:  # there are entries
        history = (f"<div class=card><h2>Last {len(entries)} checks</h2>"
                   f"<p>uptime {up * 100:.1f} %</p>{svg.strip(entries, cell=6, height=20)}"
                   f"<p class=muted>check time, all steps</p>{svg.sparkline(entries)}</div>")
    texts = "".join(
        f"<div class=card><h2>Transcript: {e(label)}</h2><pre>{e(text or '(no lines recorded)')}"
        f"</pre></div>"
        for label, text in (("last check", transcripts.get("last")),
                            ("last failure", transcripts.get("last_failure"))) if text is not None)
    body = (
        f"<p class=summary><a href=/>all inboxes</a> · <a href=\"/api/v1/inboxes/{e(s['name'])}\">"
        f"JSON</a></p><h1>{e(s['name'])} <span class='{e(s['state'])}'><span class=badge>"
        f"{e(s['state'])}</span></span></h1>"
        f"<div class=card><dl><dt>provider</dt><dd>{e(s['provider'])}</dd>"
        f"<dt>IMAP</dt><dd>{e(s['imap'])}</dd><dt>SMTP</dt><dd>{e(s['smtp'])}</dd>"
        f"<dt>login</dt><dd>{e(s['auth'])}</dd>"
        f"<dt>last check</dt><dd>{e(human(s['last_check']) or 'not yet')}</dd>"
        f"<dt>last success</dt><dd>{e(human(s['last_success']) or 'never')}</dd>"
        f"<dt>next check</dt><dd>{e(human(s['next_run']) or '-')}</dd>{certs}</dl></div>"
        f"{backoff}<div class=card><h2>Latest result</h2>{verdict}"
        f"<table class=steps><thead><tr><th>step</th><th>status</th><th>time</th><th>why</th>"
        f"<th>detail</th></tr></thead><tbody>{steps}</tbody></table></div>{_delivery_card(s)}"
        f"{history}"
        f"{texts}")
    return shell(f"{s['name']} · inbox-exporter", PAGE_CSS + INBOX_CSS, body, refresh=60)


def _delivery_card(s: dict) -> str:
    """Where the last test email landed, and the receiver's SPF/DKIM/DMARC verdict on it."""
    d = s.get("delivery")
    if not d:
        return ""
    e = html.escape
    auth = d.get("authentication") or {}
    reasons = auth.get("reasons") or {}
    methods = "".join(
        f"<dt>{e(m)}</dt><dd>{e(r)}{f' ({e(reasons[m])})' if m in reasons else ''}</dd>"
        for m, r in (auth.get("results") or {}).items())
    where = (f"{e(auth['source'])} by {e(auth['authserv_id'] or 'an unnamed server')}"
             if auth.get("authserv_id") is not None else "no Authentication-Results from a "
             "trusted server")
    return (f"<div class=card><h2>Delivery of the last test email</h2><dl>"
            f"<dt>status</dt><dd>{e(d['status'])}"
            f"{' in ' + e(d['folder']) if d.get('folder') else ''}</dd>{methods}"
            f"<dt>verdict from</dt><dd>{where}</dd></dl></div>")
