"""The shipped Prometheus rules (deploy/prometheus/): promtool checks them and runs their unit
tests; the rest keeps them honest against docs/metrics.md and docs/errors.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "inbox-exporter.rules.yml"
UNIT_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
SEVERITIES = {"critical", "warning", "info"}
# The alerts on inbox_failure_info: together they must take every failure exactly once.
FAILURE_ALERTS = ("InboxCheckFailing", "InboxIPAllowlistSuspected", "InboxConnectionLimit",
                  "InboxAppPasswordRequired", "InboxCertificateUntrusted",
                  "InboxDeliverabilityDegraded")


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: install the Debian package `prometheus` (scripts/setup does)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(proc.args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}",
                    pytrace=False)


def test_promtool_check_rules():
    assert_ok(promtool("check", "rules", str(RULES)))


def test_there_are_unit_tests():
    assert len(UNIT_TESTS) >= 2, UNIT_TESTS


@pytest.mark.parametrize("path", UNIT_TESTS, ids=lambda p: p.name)
def test_promtool_test_rules(path):
    assert_ok(promtool("test", "rules", str(path)))


# --- the rules against the docs ---------------------------------------------------------------

def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def records() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def doc_values(section: str) -> set[str]:
    """First-column values of the table under `## section` in docs/errors.md."""
    text = (ROOT / "docs" / "errors.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", body, re.M))


CATEGORIES = doc_values("Categories")
REASONS = doc_values("Reasons and hints")


def doc_pairs() -> set[tuple[str, str]]:
    """The (category, reason) pairs the classification table in docs/errors.md can produce."""
    text = (ROOT / "docs" / "errors.md").read_text()
    body = text.split("## The rules, in order", 1)[1]
    steps = set(re.findall(r"→ `([a-z_]+)`", body))
    pairs = set()
    for row in re.findall(r"^\| \d+ \|.*$", body, re.M):
        category, reason = (c.strip() for c in row.strip("|").split("|")[-2:])
        cats = steps if category == "the step's" else set(re.findall(r"`([a-z_]+)`", category))
        pairs |= {(c, reason.strip("`")) for c in cats}
    return pairs


def test_docs_parsed():
    assert len(CATEGORIES) == 9 and "unauthorized" in CATEGORIES  # the guide's 8 + delivery_failed
    assert len(REASONS) > 20 and "ip_not_allowed" in REASONS
    pairs = doc_pairs()
    assert {c for c, _ in pairs} == CATEGORIES and {r for _, r in pairs} == REASONS


def test_metrics_are_the_documented_ones():
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), re.M))
    assert "inbox_failure_info" in documented and "inbox_step_latency_seconds" in documented
    used = set()
    for r in rules():
        used |= set(re.findall(r"(?<![a-z_])(inbox_[a-z_]+)", r["expr"]))
    assert used
    unknown = {m for m in used
               if m not in documented and re.sub(r"_(bucket|count|sum)$", "", m) not in documented}
    assert not unknown, f"metrics not in docs/metrics.md: {unknown}"


MATCHER = re.compile(r'(category|reason)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def matchers(expr: str) -> list[tuple[str, str, str]]:
    return MATCHER.findall(expr)


def test_label_values_are_closed_enums():
    for name, rule in alerts().items():
        for label, _, value in matchers(rule["expr"]):
            allowed = CATEGORIES if label == "category" else REASONS
            unknown = set(value.split("|")) - allowed
            assert not unknown, f"{name}: {label} values not in docs/errors.md: {unknown}"


def selects(expr: str, labels: dict[str, str]) -> bool:
    for label, op, value in matchers(expr):
        hit = (labels[label] == value if op in ("=", "!=")
               else re.fullmatch(value, labels[label]) is not None)
        if hit != (op in ("=", "=~")):
            return False
    return True


def test_every_failure_alerts_once():
    """One alert per failing step: every (category, reason) the classification can produce is
    taken by exactly one failure alert."""
    rules_ = alerts()
    for name in FAILURE_ALERTS:
        assert "inbox_failure_info" in rules_[name]["expr"], name
    for category, reason in sorted(doc_pairs()):
        taken = [n for n in FAILURE_ALERTS
                 if selects(rules_[n]["expr"], {"category": category, "reason": reason})]
        assert len(taken) == 1, (category, reason, taken)


def test_every_reason_has_a_hint():
    hint = alerts()["InboxCheckFailing"]["annotations"]["hint"]
    covered = set(re.findall(r'eq \$labels\.reason "([a-z_]+)"', hint))
    assert covered == REASONS, {"missing": REASONS - covered, "unknown": covered - REASONS}
    for name in FAILURE_ALERTS:
        assert alerts()[name]["annotations"]["hint"] == hint, name


def test_alerts_are_labelled_and_documented():
    readme = (RULES_DIR / "README.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", readme, re.M)}
    for name, rule in alerts().items():
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        assert {"summary", "description", "hint", "runbook_url"} <= set(rule["annotations"]), name
        url = rule["annotations"]["runbook_url"]
        assert url.endswith(f"deploy/prometheus/README.md#{name.lower()}"), (name, url)
        assert name.lower() in anchors, f"no README section for {name}"
        assert f"`{name}`" in readme or name in readme


def unit_tests() -> list[dict]:
    return [t for p in UNIT_TESTS for t in yaml.safe_load(p.read_text())["tests"]]


def test_every_alert_is_tested_firing_and_not_firing():
    fired, quiet = set(), set()
    for t in unit_tests():
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
            for alert in case.get("exp_alerts") or []:
                assert alert.get("exp_labels") and alert.get("exp_annotations"), case
    assert set(alerts()) <= fired, set(alerts()) - fired
    assert set(alerts()) <= quiet, set(alerts()) - quiet


def test_every_recording_rule_is_tested():
    exprs = " ".join(c["expr"] for t in unit_tests() for c in t.get("promql_expr_test", []))
    untested = {r for r in records() if r not in exprs}
    assert not untested, untested
