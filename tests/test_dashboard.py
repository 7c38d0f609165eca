"""The Grafana dashboard (deploy/grafana/inbox-exporter.json).

1. It is a well-formed, importable Grafana JSON model: unique panel ids, every panel on the
   `${datasource}` variable, gridPos set and inside the 24-column grid, only built-in panel
   types, targets on every panel but rows, variables that exist.
2. Every metric it reads is in docs/metrics.md or recorded by deploy/prometheus/, and every
   reason in docs/errors.md has a hint in the failing-inboxes table.
3. Every PromQL expression in it (panel targets, nested rows' panels included, and the query
   variables' label_values) returns data from a real Prometheus, loaded with the shipped
   recording rules, that scraped the real daemon checking inboxes on the real mail lab: two
   healthy inboxes, a wrong password and a closed port. No panel is empty on a healthy demo.

The collapsed row "Delivery (when enabled)" reads inbox_delivery_duration_seconds,
inbox_delivery_success and the inbox_delivery_latency_seconds histogram, which exist only for
inboxes with the optional `delivery` step (issue 5). When this checkout's config accepts
`delivery`, one healthy inbox gets it and the row is held to the same rule as every other
panel. When it does not (a daemon without delivery confirmation), that row's queries are
explicitly excluded: they must still parse, but they cannot return data.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml

from inbox_exporter.model import Reason

from .conftest import env_name, lab_entry, write_config

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "inbox-exporter.json"
RULES = ROOT / "deploy" / "prometheus" / "inbox-exporter.rules.yml"
METRICS_DOC = ROOT / "docs" / "metrics.md"
ERRORS_DOC = ROOT / "docs" / "errors.md"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"row", "text", "stat", "table", "timeseries", "bargauge", "state-timeline",
               "gauge", "barchart", "piechart"}  # built into Grafana: no plugin to install

# The optional delivery step's metrics (issue 5), and the only row that reads them.
DELIVERY_METRICS = ("inbox_delivery_duration_seconds", "inbox_delivery_success",
                    "inbox_delivery_latency_seconds_bucket", "inbox_delivery_auth_result")
DELIVERY_ROW = "Delivery (when enabled)"

# Grafana's built-in interval variables, replaced by windows that hold data after a few
# 1 s scrapes (Grafana's $__rate_interval is at least 4 scrape intervals).
BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "5m",
            "__interval_ms": "60000", "__range_s": "300", "__range_ms": "300000"}


# --------------------------------------------------------------------------- the model

def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def walk(panels: list[dict], parent: dict | None = None):
    """(panel, enclosing collapsed row or None) for every panel, nested rows included."""
    for p in panels:
        yield p, parent
        if p.get("type") == "row":
            yield from walk(p.get("panels", []), p)


def expressions(dash: dict) -> list[tuple[str, dict | None, str]]:
    """(where, row, expr) for every panel target; `where` names the panel and its refId."""
    out = []
    for p, parent in walk(dash["panels"]):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f'panel "{p["title"]}" (id {p["id"]}, refId {t["refId"]})',
                            parent, t["expr"]))
    return out


def query_variables(dash: dict) -> list[dict]:
    return [v for v in dash["templating"]["list"] if v["type"] == "query"]


def variable_query(var: dict) -> str:
    q = var["query"]
    return q["query"] if isinstance(q, dict) else q


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$", re.S)
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's interpolation: known variables replaced, anything else (label_replace's $1) kept."""
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return values.get(name, m.group(0))

    return VARIABLE.sub(repl, expr)


def unresolved(expr: str) -> list[str]:
    return [m.group(0) for m in VARIABLE.finditer(expr)
            if not (m.group(1) or m.group(2) or m.group(3)).isdigit()]


# --------------------------------------------------------------------------- static checks

def test_dashboard_is_well_formed_for_grafana():
    dash = load()
    assert dash["uid"] == "inbox-exporter"
    assert 36 <= dash["schemaVersion"] <= 41, dash["schemaVersion"]
    assert dash["title"] and dash.get("id") is None  # importable into any Grafana
    # The Grafana sidecar (Helm ConfigMap) does not resolve import-time inputs: no __inputs,
    # no ${DS_...}; the datasource is the `datasource` variable.
    assert "__inputs" not in dash and "${DS_" not in DASHBOARD.read_text()

    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("provider", "inbox"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"], name
        assert v["datasource"] == DATASOURCE, name
    assert variable_query(variables["provider"]).startswith("label_values(inbox_info")
    assert variable_query(variables["inbox"]).startswith("label_values(inbox_info")
    assert '$provider' in variable_query(variables["inbox"])

    ids: list[int] = []
    for p, parent in walk(dash["panels"]):
        title = p.get("title")
        where = f"panel {title!r} (id {p.get('id')})"
        assert isinstance(p.get("id"), int), where
        ids.append(p["id"])
        assert title, where
        assert p["type"] in PANEL_TYPES, f"{where}: type {p['type']!r} needs a plugin"
        g = p.get("gridPos")
        assert g and set(g) >= {"x", "y", "w", "h"}, f"{where}: gridPos {g}"
        assert all(isinstance(g[k], int) for k in "xywh"), f"{where}: gridPos {g}"
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{where}: {g}"
        if p["type"] == "row":
            assert parent is None, f"{where}: a row inside a row"
            assert g["w"] == 24 and g["h"] == 1 and g["x"] == 0, f"{where}: {g}"
            # Grafana keeps a row's panels inside it only while it is collapsed
            assert bool(p.get("panels")) == bool(p.get("collapsed")), where
            continue
        if p["type"] == "text":
            continue
        assert p.get("datasource") == DATASOURCE, f"{where}: datasource {p.get('datasource')}"
        targets = p.get("targets") or []
        assert targets, f"{where}: no targets"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(set(refs)) == len(refs), f"{where}: refIds {refs}"
        for t in targets:
            assert t.get("datasource") == DATASOURCE, f"{where} {t['refId']}: datasource"
            assert t.get("expr", "").strip(), f"{where} {t['refId']}: empty expr"
            assert t.get("instant") or t.get("range"), f"{where} {t['refId']}: neither instant nor range"
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"

    # The expanded layout has no overlapping panels (rows' own children included once
    # they are expanded: their gridPos are absolute).
    cells: dict[tuple[int, int], str] = {}
    for p, parent in walk(dash["panels"]):
        if parent is not None and p["type"] != "row":
            continue  # collapsed: laid out only when expanded, below its row
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r} at {(x, y)}"
                cells[(x, y)] = p["title"]

    # Every variable an expression uses is defined (or one of Grafana's built-ins).
    known = set(variables) | set(BUILTINS)
    for where, _, expr in expressions(dash) + [(f"variable {v['name']}", None, variable_query(v))
                                              for v in query_variables(dash)]:
        names = {m.group(1) or m.group(2) or m.group(3) for m in VARIABLE.finditer(expr)}
        names = {n for n in names if not n.isdigit()}
        assert names <= known, f"{where}: undefined variables {names - known} in {expr}"


def test_the_delivery_row_is_collapsed_and_alone_in_reading_delivery_metrics():
    dash = load()
    rows = [p for p in dash["panels"] if p["type"] == "row" and p["title"] == DELIVERY_ROW]
    assert len(rows) == 1 and rows[0]["collapsed"]
    for where, row, expr in expressions(dash):
        uses_delivery = any(m in expr for m in DELIVERY_METRICS)
        in_row = row is not None and row["title"] == DELIVERY_ROW
        assert uses_delivery == in_row, f"{where}: {expr}"


PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                "group_right", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # strings
    text = re.sub(r"\{[^}]*\}", "", text)                   # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue  # a function or a keyword
        if text[m.start() - 1:m.start()].isdigit():
            continue  # 86400 etc. never start a name, but 1e3 does not either
        names.add(m.group(0))
    return names


def documented_metrics() -> set[str]:
    doc = METRICS_DOC.read_text()
    names = set()
    for line in doc.splitlines():
        m = re.match(r"\|\s*`([a-z_:]+)`\s*\|\s*(gauge|counter|histogram)?", line)
        if not m:
            continue
        name, kind = m.group(1), m.group(2)
        names.add(name)
        if kind == "histogram" or "histogram" in line:
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def recorded_metrics() -> set[str]:
    rules = yaml.safe_load(RULES.read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def test_every_metric_is_documented_or_recorded():
    dash = load()
    known = documented_metrics() | recorded_metrics() | {"up"} | set(DELIVERY_METRICS)
    exprs = expressions(dash) + [(f"variable {v['name']}", None, variable_query(v))
                                 for v in query_variables(dash)]
    for where, _, expr in exprs:
        m = LABEL_VALUES.match(expr)
        names = metric_names(m.group("selector") if m else expr)
        assert names, f"{where}: no metric found in {expr}"
        assert names <= known, f"{where}: {names - known} is neither in docs/metrics.md nor recorded"
    # The recording rules the dashboard promises are all used.
    used = {n for _, _, e in exprs for n in metric_names(e)}
    for record in ("provider:inbox_check_success:ratio_1d", "provider:inbox_check_success:ratio_30d",
                   "provider_step:inbox_step_latency_seconds:quantile_5m"):
        assert record in used, record


def test_every_reason_has_a_hint_in_the_failing_inboxes_table():
    dash = load()
    table = next(p for p, _ in walk(dash["panels"]) if p["title"] == "Failing inboxes")
    assert 'label_replace' in table["targets"][0]["expr"] and '"hint"' in table["targets"][0]["expr"]
    override = next(o for o in table["fieldConfig"]["overrides"]
                    if o["matcher"] == {"id": "byName", "options": "hint"})
    mappings = next(p["value"] for p in override["properties"] if p["id"] == "mappings")
    hints = {k: v["text"] for m in mappings for k, v in m["options"].items()}
    reasons_section = ERRORS_DOC.read_text().split("## Reasons and hints")[1].split("\n## ")[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \| ", reasons_section, re.M))
    reasons = documented | {r.value for r in Reason}  # the label values that can occur
    assert set(hints) == reasons, f"no hint for {reasons - set(hints)}, stale {set(hints) - reasons}"
    assert all(len(h) > 20 for h in hints.values())
    # The inbox column links to the exporter's status page (full hint and redacted reply).
    links = [p for o in table["fieldConfig"]["overrides"] if o["matcher"]["options"] == "inbox"
             for p in o["properties"] if p["id"] == "links"]
    assert links and "${__data.fields.instance}" in links[0]["value"][0]["url"]


# --------------------------------------------------------------------------- the live check

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def delivery_supported() -> bool:
    """Whether this daemon has the optional delivery step (a config key it accepts)."""
    from inbox_exporter.config import ConfigError, parse_config

    entry = {"name": "x", "email": "x@example.test", "password": "x",
             "imap": {"host": "127.0.0.1"}, "smtp": {"host": "127.0.0.1"},
             "delivery": {"mailbox": "self"}}
    try:
        parse_config(yaml.safe_dump({"inboxes": [entry]}), "probe.yaml", {})
    except ConfigError:
        return False
    return True


DELIVERY = delivery_supported()

INBOXES = {"healthy-imaps": "other", "healthy-starttls": "gmail", "wrong-password": "gmail",
           "closed-port": "other"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, lab, alertmanager):
    from inbox_exporter.daemon import Exporter
    from inbox_exporter.web import WebServer
    from maillab.promstack import Prometheus

    from .httpcapture import Capture

    tmp = tmp_path_factory.mktemp("dashboard")
    # An account of its own for the inbox whose delivery is confirmed: its polls then share
    # the one-IMAP-connection-per-account cap with that inbox's checks only.
    if "dashboard" not in lab.users:
        lab.add_user("dashboard", "dashboard-password")
    lab.set_password("dashboard", "dashboard-password")
    second = {"interval": "1s"}
    # The delivery row's data: the test email looked up in the inbox itself.
    # (sent at every check here: test_email.interval down to the 1 s interval)
    delivery = {"delivery": {"mailbox": "self", "timeout": "10s"},
                "test_email": {"to": lab.users["bcc"].address, "interval": "1s"}} if DELIVERY else {}
    inboxes = [
        # IMAPS + submission with STARTTLS
        lab_entry(lab, "healthy-imaps", "dashboard", **second, **delivery),
        # IMAP STARTTLS + SMTPS; labelled gmail (explicit hosts win over the preset) so the
        # provider panels have two providers
        lab_entry(lab, "healthy-starttls", "bob", provider="gmail",
                  imap={"port": lab.ports.imap, "security": "starttls"},
                  smtp={"port": lab.ports.smtps, "security": "ssl"}, **second),
        lab_entry(lab, "wrong-password", "bob", provider="gmail", **second),
        lab_entry(lab, "closed-port", "alice", imap={"port": free_port()}, **second),
    ]
    environ = {env_name("healthy-imaps"): "dashboard-password",
               env_name("healthy-starttls"): lab.users["bob"].password,
               env_name("wrong-password"): "not-" + lab.users["bob"].password,
               env_name("closed-port"): lab.users["alice"].password}
    with Capture() as webhook:
        # Both sinks, so "Alert notifications sent" has something per sink and result.
        config = write_config(tmp, lab, inboxes, alerting={
            "failure_threshold": 2,
            "alertmanager": {"url": alertmanager.url, "resend_interval": "1s"},
            "webhooks": [{"url": webhook.url}]})
        exporter = Exporter(str(config), environ=environ)
        server = WebServer(("127.0.0.1", 0), exporter)
        exporter.start()
        server.start()
        target = f"127.0.0.1:{server.server_address[1]}"
        try:
            # The shipped rules, unchanged: recording rules included.
            with Prometheus(tmp, [target], [RULES], alertmanager.url) as prom:
                yield prom
        finally:
            exporter.stop(5)
            server.stop()


def api(prom, path: str, params: list[tuple[str, str]]) -> dict:
    """GET a Prometheus API path; errors (a bad expression) come back as the JSON body."""
    try:
        return json.load(urllib.request.urlopen(f"{prom.url}{path}?{urlencode(params)}", timeout=10))
    except urllib.error.HTTPError as e:
        return json.loads(e.read() or b"{}") | {"status": "error", "http": e.code}


def scalar(prom, expr: str) -> float:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else math.nan


def wait_for_data(prom, timeout: float = 90):
    """Until Prometheus has what every panel needs: a few scrapes, a completed check of every
    inbox, both providers' ratios recorded, latency quantiles, notifications from both sinks
    seen over several scrapes (an increase() needs two samples)."""
    conditions = {
        "5 scrapes": ('min(count_over_time(up{job="inbox-exporter"}[1m]))', 5),
        "every inbox checked": ("count(inbox_last_check_timestamp_seconds >= 0)", len(INBOXES)),
        "failing steps": ("count(inbox_failure_info == 1)", 3),  # 2 logins + 1 connect
        "ratio_30d per provider": ("count(provider:inbox_check_success:ratio_30d >= 0)",
                                   len(set(INBOXES.values()))),
        "ratio_1d per provider": ("count(provider:inbox_check_success:ratio_1d >= 0)",
                                  len(set(INBOXES.values()))),
        "latency quantiles": ('count(provider_step:inbox_step_latency_seconds:quantile_5m >= 0)', 1),
        "both alert sinks": ("count(count by (sink) (inbox_exporter_alerts_sent_total))", 2),
        "alert counters scraped 3 times":
            ("min(count_over_time(inbox_exporter_alerts_sent_total[1m]))", 3),
        "certificates read": ("count(inbox_tls_certificate_expiry_timestamp_seconds)", 4),
    }
    if DELIVERY:
        conditions["a delivery confirmed"] = ("count(inbox_delivery_success == 1)", 1)
        conditions["deliveries in the last minute"] = (
            "sum(increase(inbox_delivery_latency_seconds_count[1m]))", 1)
    deadline = time.monotonic() + timeout
    while True:
        now = {what: scalar(prom, expr) for what, (expr, _) in conditions.items()}
        missing = {what: value for what, value in now.items() if not value >= conditions[what][1]}
        if not missing:
            return
        if time.monotonic() > deadline:
            failing = [{k: v for k, v in r["metric"].items() if k not in ("job", "instance")}
                       for r in prom.query("inbox_failure_info == 1")]
            raise AssertionError(f"Prometheus still lacks data after {timeout} s: {missing}; "
                                 f"failing now: {failing}")
        time.sleep(0.5)


def resolve_variables(prom, dash: dict) -> dict[str, str]:
    """Each query variable's values, in order, as Grafana would: label_values(selector, label)
    through /api/v1/series with match[]; "All" is the variable's allValue, else the regex of
    every value found."""
    values = {"datasource": "prometheus", **BUILTINS}
    now = time.time()
    for var in query_variables(dash):
        query = substitute(variable_query(var), values)
        m = LABEL_VALUES.match(query)
        assert m, f"variable {var['name']}: not a label_values() query: {query}"
        body = api(prom, "/api/v1/series", [("match[]", m.group("selector")),
                                            ("start", str(now - 300)), ("end", str(now))])
        assert body.get("status") == "success", f"variable {var['name']}: {query}: {body}"
        found = sorted({s[m.group("label")] for s in body["data"] if m.group("label") in s})
        assert found, f"variable {var['name']}: {query} returned no {m.group('label')} values"
        var["_found"] = found
        if var.get("allValue"):
            values[var["name"]] = var["allValue"]
        else:
            escaped = [re.escape(v).replace("\\", "\\\\") for v in found]  # regex in a PromQL string
            values[var["name"]] = "(" + "|".join(escaped) + ")"
    return values


def test_every_query_returns_data_from_a_real_prometheus(stack):
    prom = stack
    dash = load()
    wait_for_data(prom)

    values = resolve_variables(prom, dash)
    found = {v["name"]: v["_found"] for v in query_variables(dash)}
    assert found["provider"] == sorted(set(INBOXES.values()))
    assert found["inbox"] == sorted(INBOXES)
    # The inbox variable follows the provider variable.
    gmail = substitute(variable_query(next(v for v in query_variables(dash) if v["name"] == "inbox")),
                       {**values, "provider": "gmail"})
    body = api(prom, "/api/v1/series", [("match[]", LABEL_VALUES.match(gmail).group("selector"))])
    assert sorted({s["inbox"] for s in body["data"]}) == ["healthy-starttls", "wrong-password"]

    failures, skipped = [], []
    for where, row, expr in expressions(dash):
        query = substitute(expr, values)
        left = unresolved(query)
        if left:
            failures.append(f"{where}: unresolved {left} in {query}")
            continue
        body = api(prom, "/api/v1/query", [("query", query)])
        if body.get("status") != "success":
            failures.append(f"{where}: Prometheus refused the query: {body.get('error')}\n{query}")
            continue
        result = body["data"]["result"]
        if row is not None and row["title"] == DELIVERY_ROW and not DELIVERY:
            # Excluded on purpose: this daemon has no delivery step, so no inbox can have
            # these series (see the module docstring). The query parsed; that is all we ask.
            skipped.append(where)
            continue
        if not result:
            failures.append(f"{where}: no data for\n{query}")
        elif not any(math.isfinite(float(s["value"][1])) for s in result):
            failures.append(f"{where}: only NaN/Inf for\n{query}\n{result}")
    assert not failures, "\n\n".join(failures)
    print(f"{len(expressions(dash))} panel expressions and {len(query_variables(dash))} variables "
          f"checked against Prometheus; excluded (no delivery step in this daemon): {skipped}")
