"""The deployment artifacts, checked by the real tools: the Dockerfile with hadolint, the Helm
chart with `helm lint --strict`, `helm template` and `kubernetes-validate --strict`, the
Prometheus Operator objects against the shape of their CRDs, the PrometheusRule with promtool.
Also: the chart's config is valid for the daemon, its flags are the daemon's, sharding renders a
StatefulSet whose pods split the inboxes, the rules and the dashboard are the repository's files
(symlinks, one source of truth), the values schema rejects typos, and the secured endpoints
(values: web) render a web config file the daemon accepts, with the TLS files beside it in one
projected volume (so a renewed certificate is re-read), HTTPS or TCP probes, and a ServiceMonitor
that scrapes over HTTPS with basic auth.

The tools come from scripts/install-deploy-tools (into .venv); promtool from scripts/setup.
Nothing is skipped: a missing tool fails with what to run.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
from pathlib import Path

import bcrypt
import certifi
import jsonschema
import pytest
import yaml

from inbox_exporter.sharding import parse_shard
from inbox_exporter.web.webconfig import WebConfigFile

from .webtls import issue, make_ca

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "deploy" / "helm" / "inbox-exporter"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RULES_LINK = ROOT / "deploy" / "prometheus" / "inbox-exporter.rules.yml"
RULES_FILE = CHART / "files" / "inbox-exporter.rules.yml"
DASHBOARD_LINK = CHART / "files" / "inbox-exporter.json"
DASHBOARD = ROOT / "deploy" / "grafana" / "inbox-exporter.json"
RELEASE, NAMESPACE = "rel", "mail"
FULLNAME = f"{RELEASE}-inbox-exporter"
KUBE_VERSION = "1.30.0"  # for `helm template` (Capabilities)
# kubernetes-validate: the chart's floor (Chart.yaml kubeVersion), a middle and a recent one.
VALIDATE_VERSIONS = ("1.25.0", "1.30.0", "1.33.0")
UID = 65532
INSTALL = "run scripts/install-deploy-tools"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


# --- tools ----------------------------------------------------------------------------------

def tool(name: str, hint: str = INSTALL) -> str:
    """NAME from the virtualenv of this Python (where install-deploy-tools puts it), else PATH."""
    venv = Path(sys.executable).parent / name
    exe = str(venv) if venv.exists() else shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} not found: {hint}", pytrace=False)
    return exe


def run(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    return proc


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = run(tool("helm"), *args, check=False)
    if "error evaluating symlink" in proc.stderr:
        pytest.fail(f"the chart does not load: {DASHBOARD_LINK.relative_to(ROOT)} points to "
                    f"{DASHBOARD.relative_to(ROOT)}, which must exist:\n{proc.stderr}",
                    pytrace=False)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    return proc


def values_args(values: Path | None) -> list[str]:
    return ["-f", str(values)] if values else []


@functools.cache
def render(values: Path | None = None, *sets: str) -> tuple[dict, ...]:
    """`helm template` -> the objects (parsed YAML documents)."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE,
            "--kube-version", KUBE_VERSION, *values_args(values)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def find(objects, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)]


def one(objects, kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


def workload(objects) -> dict:
    [w] = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    return w


def container(objects) -> dict:
    [c] = workload(objects)["spec"]["template"]["spec"]["containers"]
    return c


ALL_VALUES = [None, *CI_VALUES]
IDS = ["default", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]
by_values = pytest.mark.parametrize("values", ALL_VALUES, ids=IDS)


def ci(name: str) -> Path:
    path = CHART / "ci" / f"{name}-values.yaml"
    assert path.exists(), path
    return path


def test_ci_values_files():
    names = {p.name for p in CI_VALUES}
    assert {"sharded-values.yaml", "existing-secret-values.yaml",
            "everything-values.yaml"} <= names, names


# --- Dockerfile -----------------------------------------------------------------------------

def test_hadolint_no_warnings():
    proc = run(tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE),
               check=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def dockerfile_stages() -> list[list[str]]:
    """Instructions per stage (from its FROM on), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for ln in (ln.strip() for ln in text.splitlines()):
        if not ln or ln.startswith("#"):
            continue
        if ln.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(ln)
    return stages


def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    builder, runtime = dockerfile_stages()[-2:]
    assert builder[0].startswith("FROM ${PYTHON_IMAGE} AS builder"), builder[0]
    assert runtime[0] == "FROM ${PYTHON_IMAGE}", runtime[0]
    build = " ".join(builder)
    assert "pip wheel" in build and "--no-cache-dir" in build and "python -m venv" in build
    rt = "\n".join(runtime)
    # the runtime stage gets the virtualenv and nothing else from the builder; no build tools
    assert re.findall(r"^COPY .*", rt, re.M) == [
        "COPY --from=builder /opt/inbox-exporter /opt/inbox-exporter"]
    assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", rt), rt
    assert f"USER {UID}:{UID}" in runtime
    assert 'ENTRYPOINT ["inbox-exporter"]' in runtime
    assert 'CMD ["run", "--config.file=/etc/inbox-exporter/config.yaml"]' in runtime
    assert "EXPOSE 9857" in runtime and "STOPSIGNAL SIGTERM" in runtime
    assert "PYTHONDONTWRITEBYTECODE=1" in rt and "PYTHONUNBUFFERED=1" in rt
    for label in ("title", "description", "version", "revision", "created", "licenses", "source"):
        assert f"org.opencontainers.image.{label}=" in rt, label
    # the entry point is the package's console script; the default command is a valid `run`
    assert 'inbox-exporter = "inbox_exporter.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert_daemon_accepts(["run", "--config.file=/etc/inbox-exporter/config.yaml"])


def test_dockerignore_keeps_the_context_small():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!daemon/"} <= set(lines)
    # everything the Dockerfile copies is let in
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M):
        for item in src.split():
            assert f"!{item}" in lines, item


# --- the daemon's view ----------------------------------------------------------------------

@functools.cache
def run_help() -> str:
    return run(tool("inbox-exporter", "run scripts/setup"), "run", "--help").stdout


def assert_daemon_accepts(args: list[str]) -> None:
    """Every --flag the image/chart passes to `inbox-exporter run` is one of its flags."""
    assert args[0] == "run", args
    known = set(re.findall(r"(--[a-z][a-z.-]*)", run_help()))
    for a in args[1:]:
        flag = a.split("=", 1)[0]
        assert flag in known, f"`inbox-exporter run` has no flag {flag} (known: {sorted(known)})"


# --- Helm: lint, template, kubernetes-validate ------------------------------------------------

def test_helm_is_v3():
    out = helm("version", "--template", "{{.Version}}").stdout
    assert out.startswith("v3."), out


@by_values
def test_helm_lint_strict(values):
    proc = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values_args(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout, proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@by_values
def test_kubernetes_validate_strict(values, tmp_path):
    objects = [o for o in render(values) if o["kind"] not in CRD_KINDS]
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    args = [tool("kubernetes-validate"), "--strict"]
    for v in VALIDATE_VERSIONS:
        args += ["-k", v]
    proc = run(*args, str(path), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # a kind without a schema is only a WARN for kubernetes-validate: not here
    bad = [ln for ln in out.splitlines() if not ln.startswith("INFO ")]
    assert not bad, out
    assert out.count(" passed for resource ") == len(objects) * len(VALIDATE_VERSIONS), out


# The Prometheus Operator CRDs (monitoring.coreos.com/v1) are unknown to kubernetes-validate:
# the subset of their OpenAPI schemas that the chart uses, with no other field allowed, so a
# misspelt or outdated field (e.g. metricRelabelConfigs) fails.
def _obj(props: dict, required=()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": props,
            "required": list(required)}


_STR, _MAP = {"type": "string"}, {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = _obj({"matchLabels": _MAP, "matchExpressions": {"type": "array", "items": _obj(
    {"key": _STR, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
     "values": {"type": "array", "items": _STR}}, ["key", "operator"])}})
_RELABEL = _obj({"sourceLabels": {"type": "array", "items": _STR}, "separator": _STR,
                 "targetLabel": _STR, "regex": _STR, "modulus": {"type": "integer"},
                 "replacement": _STR,
                 "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop",
                                     "hashmod", "HashMod", "labelmap", "LabelMap", "labeldrop",
                                     "LabelDrop", "labelkeep", "LabelKeep", "lowercase",
                                     "uppercase", "keepequal", "dropequal"]}})
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_META = _obj({"name": _STR, "namespace": _STR, "labels": _MAP, "annotations": _MAP},
             ["name", "namespace"])
_KEY_REF = _obj({"name": _STR, "key": _STR, "optional": {"type": "boolean"}}, ["key"])
_SECRET_OR_CONFIGMAP = _obj({"secret": _KEY_REF, "configMap": _KEY_REF})
_TLS_VERSION = {"enum": ["TLS10", "TLS11", "TLS12", "TLS13"]}
_TLS_CONFIG = _obj({"ca": _SECRET_OR_CONFIGMAP, "cert": _SECRET_OR_CONFIGMAP,
                    "keySecret": _KEY_REF, "caFile": _STR, "certFile": _STR, "keyFile": _STR,
                    "serverName": _STR, "insecureSkipVerify": {"type": "boolean"},
                    "minVersion": _TLS_VERSION, "maxVersion": _TLS_VERSION})
CRD_SCHEMAS = {
    "ServiceMonitor": _obj({
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": _META,
        "spec": _obj({
            "jobLabel": _STR,
            "namespaceSelector": _obj({"any": {"type": "boolean"},
                                       "matchNames": {"type": "array", "items": _STR}}),
            "selector": _LABEL_SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": _obj({
                "port": _STR, "path": _STR, "scheme": {"enum": ["http", "https"]},
                "tlsConfig": _TLS_CONFIG,
                "basicAuth": _obj({"username": _KEY_REF, "password": _KEY_REF}),
                "interval": _DURATION, "scrapeTimeout": _DURATION,
                "honorLabels": {"type": "boolean"},
                "relabelings": {"type": "array", "items": _RELABEL},
                "metricRelabelings": {"type": "array", "items": _RELABEL}})},
        }, ["selector", "endpoints"])}, ["apiVersion", "kind", "metadata", "spec"]),
    "PrometheusRule": _obj({
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": _META,
        "spec": _obj({"groups": {"type": "array", "minItems": 1, "items": _obj({
            "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
            "limit": {"type": "integer"},
            "rules": {"type": "array", "items": _obj({
                "alert": _STR, "record": _STR, "expr": {"type": ["string", "integer"]},
                "for": _DURATION, "keep_firing_for": _DURATION,
                "labels": _MAP, "annotations": _MAP}, ["expr"])}}, ["name", "rules"])}},
            ["groups"])}, ["apiVersion", "kind", "metadata", "spec"]),
}


@by_values
def test_crds_have_the_operator_shape(values):
    for obj in render(values):
        if obj["kind"] in CRD_KINDS:
            jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])


def test_every_kind_is_checked():
    kinds = {o["kind"] for v in ALL_VALUES for o in render(v)}
    assert kinds == {"ConfigMap", "Deployment", "NetworkPolicy", "PersistentVolumeClaim",
                     "PodDisruptionBudget", "PrometheusRule", "Secret", "Service",
                     "ServiceAccount", "ServiceMonitor", "StatefulSet"}, kinds


# --- the pod --------------------------------------------------------------------------------

def parse_seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)s", duration)
    assert m, duration
    return float(m.group(1))


@by_values
def test_restricted_pod(values):
    objects = render(values)
    pod = workload(objects)["spec"]["template"]
    spec, c = pod["spec"], container(objects)
    psc, csc = spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == UID
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]} and csc["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    tls = web_tls(values)
    for probe, path in (("livenessProbe", "/-/healthy"), ("readinessProbe", "/-/ready")):
        assert probe_handler(c[probe]) == expected_probe(tls, path), (probe, c[probe])
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    [port] = c["ports"]
    assert port["name"] == "http" and f"--web.listen-address=:{port['containerPort']}" in c["args"]
    grace = [parse_seconds(a.split("=", 1)[1]) for a in c["args"]
             if a.startswith("--shutdown.grace-period=")]
    assert grace and spec["terminationGracePeriodSeconds"] > grace[0]
    assert re.fullmatch(r"[0-9a-f]{64}", pod["metadata"]["annotations"]["checksum/config"])
    # the configuration is mounted where --config.file points
    assert "--config.file=/etc/inbox-exporter/config.yaml" in c["args"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/inbox-exporter" and mount["readOnly"] is True
    vol = next(v for v in spec["volumes"] if v["name"] == "config")
    source = vol.get("configMap") or vol.get("secret")
    assert source["items"][0]["path"] == "config.yaml"
    # every secret value reaches the pod from a Secret, never inline
    for e in c.get("env", []):
        assert "value" not in e, e
    assert_daemon_accepts(c["args"])


def web_tls(values: Path | None) -> dict:
    """The web.tls values of a values file (the chart's defaults filled in)."""
    given = yaml.safe_load(values.read_text()).get("web", {}) if values else {}
    return {"enabled": False, "clientAuthType": "NoClientCert", **given.get("tls", {})}


def probe_handler(probe: dict) -> dict:
    return {k: v for k, v in probe.items() if k in ("httpGet", "tcpSocket", "exec", "grpc")}


def expected_probe(tls: dict, path: str) -> dict:
    """GET over HTTP, or HTTPS with web.tls; a TCP connection when client certificates are
    required (the kubelet has none, the handshake would fail)."""
    if tls["enabled"] and tls["clientAuthType"] == "RequireAndVerifyClientCert":
        return {"tcpSocket": {"port": "http"}}
    get = {"path": path, "port": "http"}
    return {"httpGet": {**get, "scheme": "HTTPS"} if tls["enabled"] else get}


@by_values
def test_selectors_match_the_pods(values):
    objects = render(values)
    pod_labels = workload(objects)["spec"]["template"]["metadata"]["labels"]
    assert workload(objects)["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for svc in find(objects, "Service"):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for obj in find(objects, kind):
            sel = obj["spec"].get("selector") or obj["spec"]["podSelector"]
            assert sel["matchLabels"].items() <= pod_labels.items(), kind


def test_default_is_one_deployment():
    objects = render()
    dep = one(objects, "Deployment", FULLNAME)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert not find(objects, "StatefulSet")
    assert not [a for a in container(objects)["args"] if a.startswith("--shard.")]
    assert [s["metadata"]["name"] for s in find(objects, "Service")] == [FULLNAME]
    assert {o["kind"] for o in objects} == {"ConfigMap", "Deployment", "Service", "ServiceAccount"}


def test_sharded_renders_a_statefulset():
    objects = render(ci("sharded"))
    shards = yaml.safe_load(ci("sharded").read_text())["shards"]
    assert shards > 1
    assert not find(objects, "Deployment")
    sts = one(objects, "StatefulSet", FULLNAME)
    assert sts["spec"]["replicas"] == shards
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    args = container(objects)["args"]
    assert f"--shard.count={shards}" in args and "--shard.index=hostname" in args
    headless = one(objects, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    # the daemon reads each pod's ordinal from its hostname (<statefulset>-<i>), and the pods
    # split the inboxes: each one is checked by exactly one pod
    pods = [parse_shard(shards, "hostname", f"{sts['metadata']['name']}-{i}")
            for i in range(shards)]
    assert [p.index for p in pods] == list(range(shards))
    config = yaml.safe_load(one(objects, "ConfigMap", FULLNAME)["data"]["config.yaml"])
    names = [i["name"] for i in config["inboxes"]] + [f"inbox-{n}" for n in range(200)]
    for name in names:
        assert sum(p.owns(name) for p in pods) == 1, name
    assert all(any(p.owns(n) for n in names) for p in pods)  # no idle shard here


def test_existing_secret():
    values = yaml.safe_load(ci("existing-secret").read_text())
    objects = render(ci("existing-secret"))
    assert not find(objects, "ConfigMap"), "no config rendered when it comes from a Secret"
    spec = workload(objects)["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["config"]["secret"] == {
        "secretName": values["existingConfigSecret"],
        "items": [{"key": values["configKey"], "path": "config.yaml"}]}
    c = container(objects)
    assert c["envFrom"] == values["envFrom"]
    for m in values["extraSecretMounts"]:
        assert vols[m["name"]]["secret"]["secretName"] == m["secretName"]
        mount = next(x for x in c["volumeMounts"] if x["name"] == m["name"])
        assert mount == {"name": m["name"], "mountPath": m["mountPath"], "readOnly": True}


# --- OAuth refresh tokens (values: oauthTokens) -------------------------------------------

SEED_PATH = "/run/inbox-exporter/oauth-seed"


def pod_spec(objects) -> dict:
    return workload(objects)["spec"]["template"]["spec"]


def oauth_values() -> dict:
    return yaml.safe_load(ci("oauth").read_text())["oauthTokens"]


def test_oauth_tokens_claim_seeded_by_an_init_container():
    """A Deployment: a writable claim at mountPath, seeded from the Secret by an init container
    that runs restricted like the exporter, and every refresh_token_file inside the volume."""
    values = oauth_values()
    objects = render(ci("oauth"))
    spec, c = pod_spec(objects), container(objects)
    claim = one(objects, "PersistentVolumeClaim", f"{FULLNAME}-oauth-tokens")["spec"]
    pvc = values["persistentVolumeClaim"]
    assert claim == {"accessModes": ["ReadWriteOnce"], "storageClassName": pvc["storageClassName"],
                     "resources": {"requests": {"storage": pvc["size"]}}}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["oauth-tokens"] == {"name": "oauth-tokens", "persistentVolumeClaim": {
        "claimName": f"{FULLNAME}-oauth-tokens"}}
    assert vols["oauth-tokens-seed"]["secret"] == {"secretName": values["existingSecret"],
                                                   "defaultMode": 0o440}
    mount_path = "/var/lib/inbox-exporter/oauth"  # the default
    # the exporter writes rotated tokens there; it never sees the seed
    assert {"name": "oauth-tokens", "mountPath": mount_path} in c["volumeMounts"]
    assert "oauth-tokens-seed" not in {m["name"] for m in c["volumeMounts"]}
    config = yaml.safe_load(one(objects, "ConfigMap", FULLNAME)["data"]["config.yaml"])
    files = [i["auth"]["refresh_token_file"] for i in config["inboxes"]
             if "refresh_token_file" in i.get("auth", {})]
    assert files and all(f.startswith(mount_path + "/") for f in files), files

    [init] = spec["initContainers"]
    assert init["name"] == "oauth-tokens" and init["image"] == c["image"]
    assert init["securityContext"] == c["securityContext"]  # restricted, read-only root, 65532
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["fsGroup"] == UID  # the volume is the exporter's to write
    assert init["volumeMounts"] == [
        {"name": "oauth-tokens", "mountPath": mount_path},
        {"name": "oauth-tokens-seed", "mountPath": SEED_PATH, "readOnly": True}]
    assert init["command"][:2] == ["sh", "-ec"] and init["command"][3:] == [
        "oauth-tokens", SEED_PATH, mount_path]


def test_oauth_tokens_sharded_get_a_claim_per_pod():
    """The StatefulSet variant: one claim per shard from volumeClaimTemplates, none made by the
    chart, each seeded by the init container."""
    objects = render(ci("everything"))
    sts = one(objects, "StatefulSet", FULLNAME)
    templates = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    template = templates["oauth-tokens"]  # (and "history": test_history_claim_per_shard)
    assert template["spec"] == {"accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": "128Mi"}}}
    assert not find(objects, "PersistentVolumeClaim")
    spec = pod_spec(objects)
    assert "oauth-tokens" not in {v["name"] for v in spec["volumes"]}  # the template's claim
    assert {"name": "oauth-tokens", "mountPath": "/var/lib/inbox-exporter/oauth"} \
        in container(objects)["volumeMounts"]
    [init] = spec["initContainers"]
    assert {"name": "oauth-tokens", "mountPath": "/var/lib/inbox-exporter/oauth"} \
        in init["volumeMounts"]
    # an existing claim cannot serve several pods
    proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION,
                "-f", str(ci("everything")),
                "--set", "oauthTokens.persistentVolumeClaim.existingClaim=tokens", check=False)
    assert proc.returncode != 0 and "existingClaim works with shards: 1 only" in proc.stderr


def test_oauth_tokens_emptydir_and_existing_claim():
    objects = render(None, "oauthTokens.enabled=true")
    vols = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert vols["oauth-tokens"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
    assert "oauth-tokens-seed" not in vols and "initContainers" not in pod_spec(objects)
    assert not find(objects, "PersistentVolumeClaim")
    objects = render(ci("oauth"), "oauthTokens.persistentVolumeClaim.existingClaim=tokens")
    assert not find(objects, "PersistentVolumeClaim")
    vols = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert vols["oauth-tokens"]["persistentVolumeClaim"] == {"claimName": "tokens"}
    # off by default: nothing of it
    text = yaml.safe_dump_all(render())
    assert "oauth-tokens" not in text


def test_oauth_seed_script(tmp_path):
    """The init container's script on a Secret volume as the kubelet lays it out (keys are
    links into ..data): copies each key, 0600; keeps a token the exporter rotated while the
    Secret is unchanged; takes the Secret's value again once it changes."""
    [init] = pod_spec(render(ci("oauth")))["initContainers"]
    script = init["command"][2]
    seed, tokens = tmp_path / "seed", tmp_path / "tokens"
    (seed / "..2024_01_01").mkdir(parents=True)
    tokens.mkdir()
    (seed / "..data").symlink_to("..2024_01_01")
    for key, value in (("sales-m365", "seed-1"), ("sales-gws", "seed-g")):
        (seed / "..2024_01_01" / key).write_text(value + "\n")
        (seed / key).symlink_to(f"..data/{key}")

    def run_init() -> str:
        return run("sh", "-ec", script, "oauth-tokens", str(seed), str(tokens)).stdout

    out = run_init()
    assert "sales-m365: copied" in out and "sales-gws: copied" in out
    for key, value in (("sales-m365", "seed-1"), ("sales-gws", "seed-g")):
        assert (tokens / key).read_text() == value + "\n"
        assert (tokens / key).stat().st_mode & 0o777 == 0o600
    assert {p.name for p in tokens.iterdir()} == {"sales-m365", "sales-gws", ".seeded"}
    # the exporter rotated a token; a restart must not put the Secret's older one back
    (tokens / "sales-m365").write_text("rotated\n")
    assert "sales-m365: kept" in run_init()
    assert (tokens / "sales-m365").read_text() == "rotated\n"
    # a new sign-in put into the Secret wins
    (seed / "..2024_01_01" / "sales-m365").write_text("seed-2\n")
    out = run_init()
    assert "sales-m365: copied" in out and "sales-gws: kept" in out
    assert (tokens / "sales-m365").read_text() == "seed-2\n"
    assert (tokens / "sales-gws").read_text() == "seed-g\n"


def test_checksum_follows_the_config():
    def ann(objs):
        return workload(objs)["spec"]["template"]["metadata"]["annotations"]

    a, b = render(), render(None, "config.defaults.interval=5m")
    assert ann(a)["checksum/config"] != ann(b)["checksum/config"]


@pytest.mark.parametrize("values", [None, *(p for p in CI_VALUES if "existing" not in p.name)],
                         ids=lambda v: v.name.removesuffix("-values.yaml") if v else "default")
def test_config_is_valid_for_the_daemon(values, tmp_path):
    """The rendered config.yaml passes `inbox-exporter check-config` with the pod's environment
    (dummy secret values) and its secret files (dummy files in place of the mounts)."""
    objects = render(values)
    text = one(objects, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    c = container(objects)
    env = {**os.environ, **{e["name"]: "https://key@sentry.example.com/1" if "DSN" in e["name"]
                            else "dummy-secret" for e in c.get("env", [])}}
    # the pod's mounts, emulated: secret mounts -> a dir of dummy files, CA -> a real PEM bundle
    for m in c["volumeMounts"]:
        if m["name"] == "config":
            continue
        local = tmp_path / m["name"]
        local.mkdir()
        for path in re.findall(re.escape(m["mountPath"]) + r"/[^\s\"']+", text):
            target = local / Path(path).relative_to(m["mountPath"])
            if path.endswith(".pem"):
                target.write_text(Path(certifi.where()).read_text())
            else:
                target.write_text("dummy-password\n")
        text = text.replace(m["mountPath"] + "/", f"{local}/")
    config = tmp_path / "config.yaml"
    config.write_text(text)
    proc = run(tool("inbox-exporter", "run scripts/setup"), "check-config",
               "--config.file", str(config), env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Prometheus Operator objects ------------------------------------------------------------

def test_servicemonitor_scrapes_each_pod_once():
    objects = render(ci("everything"))
    sm = one(objects, "ServiceMonitor", FULLNAME)
    sel = sm["spec"]["selector"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}

    def selected(svc):
        labels = svc["metadata"]["labels"]
        ok = sel["matchLabels"].items() <= labels.items()
        for e in sel.get("matchExpressions", []):
            ok &= (e["key"] in labels) == (e["operator"] == "Exists")
        return ok

    services = find(objects, "Service")
    assert len(services) == 2  # the service and the StatefulSet's headless one
    assert [s["metadata"]["name"] for s in services if selected(s)] == [FULLNAME]
    [ep] = sm["spec"]["endpoints"]
    assert ep["port"] == "http" and ep["path"] == "/metrics"
    assert ep["relabelings"][0] == {"action": "replace", "targetLabel": "job",
                                    "replacement": "inbox-exporter"}


def test_rules_file_is_one_source_of_truth():
    assert RULES_LINK.is_symlink() and not RULES_FILE.is_symlink()
    assert os.readlink(RULES_LINK) == "../helm/inbox-exporter/files/inbox-exporter.rules.yml"
    assert RULES_LINK.resolve() == RULES_FILE.resolve()


def test_prometheusrule_is_the_shipped_rules(tmp_path):
    rule = one(render(ci("everything")), "PrometheusRule", FULLNAME)
    shipped = yaml.safe_load(RULES_LINK.read_text())
    assert rule["spec"] == shipped  # groups and nothing else
    assert rule["spec"]["groups"] == shipped["groups"] and len(shipped["groups"]) >= 2
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    run(tool("promtool", "install the Debian package `prometheus` (scripts/setup does)"),
        "check", "rules", str(path))


def test_prometheusrule_follows_the_job_name(tmp_path):
    objects = render(None, "serviceMonitor.enabled=true", "prometheusRule.enabled=true",
                     "serviceMonitor.jobName=mail-exporter")
    sm, rule = one(objects, "ServiceMonitor"), one(objects, "PrometheusRule")
    assert sm["spec"]["endpoints"][0]["relabelings"][0]["replacement"] == "mail-exporter"
    text = yaml.safe_dump(rule["spec"])
    assert 'job="inbox-exporter"' in RULES_LINK.read_text()
    assert 'job="inbox-exporter"' not in text and 'up{job="mail-exporter"}' in text
    path = tmp_path / "rules.yml"
    path.write_text(text)
    run(tool("promtool", "install the Debian package `prometheus` (scripts/setup does)"),
        "check", "rules", str(path))


def test_dashboard_configmap_is_the_repository_dashboard():
    assert DASHBOARD_LINK.is_symlink()
    assert os.readlink(DASHBOARD_LINK) == "../../../grafana/inbox-exporter.json"
    assert DASHBOARD.exists(), f"{DASHBOARD.relative_to(ROOT)} is missing"
    cm = one(render(ci("everything")), "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    # Helm followed the symlink out of the chart: the ConfigMap holds the file, byte for byte
    assert cm["data"]["inbox-exporter.json"] == DASHBOARD.read_text()
    json.loads(cm["data"]["inbox-exporter.json"])


def test_packaged_chart_carries_the_files(tmp_path):
    """`helm package` follows both symlinks: a chart published from this repository holds the
    rules and the dashboard themselves."""
    helm("package", str(CHART), "--destination", str(tmp_path))
    [tgz] = tmp_path.glob("inbox-exporter-*.tgz")
    out = helm("template", RELEASE, str(tgz), "--namespace", NAMESPACE, "--kube-version",
               KUBE_VERSION, "-f", str(ci("everything"))).stdout
    objects = [d for d in yaml.safe_load_all(out) if d]
    assert one(objects, "PrometheusRule")["spec"] == yaml.safe_load(RULES_FILE.read_text())
    dashboard = one(objects, "ConfigMap", f"{FULLNAME}-dashboard")["data"]["inbox-exporter.json"]
    assert dashboard == DASHBOARD.read_text()
    with tarfile.open(tgz) as tar:
        names = tar.getnames()
    assert "inbox-exporter/files/inbox-exporter.json" in names
    assert not [n for n in names if "/ci/" in n], names  # .helmignore


def test_networkpolicy():
    values = yaml.safe_load(ci("everything").read_text())["networkPolicy"]
    np = one(render(ci("everything")), "NetworkPolicy", FULLNAME)["spec"]
    assert np["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = np["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert ingress["from"] == values["ingress"]["from"]
    ports = [{(p["port"], p["protocol"]) for p in rule["ports"]} for rule in np["egress"]]
    assert ports[0] == {(53, "UDP"), (53, "TCP")}
    assert ports[1] == {(p, "TCP") for p in values["egress"]["mail"]["ports"]}
    assert {993, 143, 465, 587, 25} <= {p for p, _ in ports[1]}
    assert ports[2] == {(p, "TCP") for p in values["egress"]["alerting"]["ports"]}
    assert len(np["egress"]) == 3  # nothing else is allowed out
    assert np["egress"][2]["to"] == values["egress"]["alerting"]["to"]


def test_pdb():
    pdb = one(render(ci("sharded")), "PodDisruptionBudget", FULLNAME)
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    pdb = one(render(ci("sharded"), "podDisruptionBudget.minAvailable=2"), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2 and "maxUnavailable" not in pdb["spec"]


# --- the endpoints secured (values: web) -------------------------------------------------

WEB_DIR = "/etc/inbox-exporter-web"
WEB_FLAG = f"--web.config.file={WEB_DIR}/web-config.yml"
WEB_SECRET = f"{FULLNAME}-web-config"
SERVER_NAME = f"{FULLNAME}.{NAMESPACE}.svc"
SCRAPE_PASSWORD = "scrape-secret"  # the password of the bcrypt hash in ci/web-values.yaml
MTLS = ("web.tls.clientAuthType=RequireAndVerifyClientCert",
        "web.tls.clientCA.secretName=inbox-exporter-clients-ca")


def web_config(objects) -> dict:
    """The web config file the chart rendered (its Secret, decoded)."""
    data = one(objects, "Secret", WEB_SECRET)["data"]
    assert set(data) == {"web-config.yml"}
    return yaml.safe_load(base64.b64decode(data["web-config.yml"]))


def web_volume(objects) -> tuple[dict, dict]:
    """The exporter's mount of the web volume, and the volume."""
    [mount] = [m for m in container(objects)["volumeMounts"] if m["name"] == "web-config"]
    [volume] = [v for v in pod_spec(objects)["volumes"] if v["name"] == "web-config"]
    return mount, volume


def web_args(objects) -> list[str]:
    return [a for a in container(objects)["args"] if a.startswith("--web.")
            and not a.startswith("--web.listen-address=")]


def endpoint(objects) -> dict:
    [ep] = one(objects, "ServiceMonitor", FULLNAME)["spec"]["endpoints"]
    return ep


@pytest.mark.parametrize("sets", [(), ("shards=3",)], ids=["deployment", "statefulset"])
def test_web_default_is_plain_http(sets):
    """Nothing of it by default: no web config, no flags, no volume, HTTP probes and scrapes."""
    objects = render(None, *sets, "serviceMonitor.enabled=true")
    assert not find(objects, "Secret")
    assert web_args(objects) == []
    assert "web-config" not in {v["name"] for v in pod_spec(objects)["volumes"]}
    assert "web-config" not in {m["name"] for m in container(objects)["volumeMounts"]}
    c = container(objects)
    assert probe_handler(c["livenessProbe"]) == expected_probe(web_tls(None), "/-/healthy")
    ep = endpoint(objects)
    assert ep["scheme"] == "http" and "tlsConfig" not in ep and "basicAuth" not in ep


@pytest.mark.parametrize("sets", [(), ("shards=3",)], ids=["deployment", "statefulset"])
def test_web_tls_and_basic_auth(sets):
    """ci/web-values.yaml: TLS from a kubernetes.io/tls Secret, basic auth, both APIs on; in a
    Deployment and in a StatefulSet (the same pod template)."""
    values = yaml.safe_load(ci("web").read_text())
    objects = render(ci("web"), *sets)
    workload_kind = "StatefulSet" if sets else "Deployment"
    assert workload(objects)["kind"] == workload_kind
    c = container(objects)
    assert web_args(objects) == [WEB_FLAG, "--web.enable-lifecycle", "--web.enable-probe"]
    assert_daemon_accepts(c["args"])
    # the web config: tls_server_config from web.tls, the rest of web.config verbatim; bcrypt
    # hashes only, in a Secret (never a ConfigMap)
    config = web_config(objects)
    assert config == {
        "tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key",
                              "client_auth_type": "NoClientCert", "min_version": "TLS13"},
        **values["web"]["config"]}
    hashed = config["basic_auth_users"]["prometheus"]
    assert bcrypt.checkpw(SCRAPE_PASSWORD.encode(), hashed.encode())
    for cm in find(objects, "ConfigMap"):
        assert "basic_auth_users" not in json.dumps(cm), cm["metadata"]["name"]
    # one projected volume, read-only: the web config file and the certificate side by side
    mount, volume = web_volume(objects)
    assert mount == {"name": "web-config", "mountPath": WEB_DIR, "readOnly": True}
    assert volume["projected"] == {"defaultMode": 0o440, "sources": [
        {"secret": {"name": WEB_SECRET,
                    "items": [{"key": "web-config.yml", "path": "web-config.yml"}]}},
        {"secret": {"name": "inbox-exporter-tls",
                    "items": [{"key": "tls.crt", "path": "tls.crt"},
                              {"key": "tls.key", "path": "tls.key"}]}}]}
    # the exporter re-reads the file: no checksum rolls the pods when it changes
    annotations = workload(objects)["spec"]["template"]["metadata"]["annotations"]
    assert list(annotations) == ["checksum/config"]
    # HTTPS probes (the kubelet does not verify the certificate, nor send credentials)
    for probe, path in (("livenessProbe", "/-/healthy"), ("readinessProbe", "/-/ready")):
        assert probe_handler(c[probe]) == {"httpGet": {"path": path, "port": "http",
                                                       "scheme": "HTTPS"}}
    # the ServiceMonitor scrapes over HTTPS, checks the Service's name, sends basic auth
    ep = endpoint(objects)
    assert ep["scheme"] == "https"
    assert ep["tlsConfig"] == {"ca": {"secret": {"name": "inbox-exporter-tls", "key": "ca.crt"}},
                               "serverName": SERVER_NAME}
    assert ep["basicAuth"] == values["serviceMonitor"]["basicAuth"]
    jsonschema.validate(one(objects, "ServiceMonitor"), CRD_SCHEMAS["ServiceMonitor"])


@pytest.mark.parametrize("values, sets", [(ci("web"), MTLS), (ci("everything"), ())],
                         ids=["deployment", "statefulset"])
def test_web_mutual_tls_probes_tcp(values, sets):
    """RequireAndVerifyClientCert: the client CA is mounted beside the web config, and the
    probes are TCP checks, since the kubelet cannot present a client certificate."""
    objects = render(values, *sets)
    c = container(objects)
    assert probe_handler(c["livenessProbe"]) == {"tcpSocket": {"port": "http"}}
    assert probe_handler(c["readinessProbe"]) == {"tcpSocket": {"port": "http"}}
    assert c["livenessProbe"]["periodSeconds"] == 10  # the timing values still apply
    config = web_config(objects)["tls_server_config"]
    assert config["client_auth_type"] == "RequireAndVerifyClientCert"
    assert config["client_ca_file"] == "client-ca.crt"
    _, volume = web_volume(objects)
    ca_key = "ca.pem" if values == ci("everything") else "ca.crt"  # clientCA.key
    assert volume["projected"]["sources"][2] == {"secret": {
        "name": "inbox-exporter-clients-ca", "items": [{"key": ca_key, "path": "client-ca.crt"}]}}
    assert WEB_FLAG in c["args"]
    assert endpoint(objects)["scheme"] == "https"


def test_web_everything_merges_and_passes_client_certificates():
    """ci/everything: web.config's tls_server_config keys are merged into the chart's, and the
    ServiceMonitor's tlsConfig (client certificate, CA from a ConfigMap, serverName) is kept."""
    values = yaml.safe_load(ci("everything").read_text())
    objects = render(ci("everything"))
    assert workload(objects)["kind"] == "StatefulSet"
    config = web_config(objects)
    assert config == {"tls_server_config": {
        "cert_file": "tls.crt", "key_file": "tls.key", "client_ca_file": "client-ca.crt",
        "client_auth_type": "RequireAndVerifyClientCert", "min_version": "TLS12",
        **values["web"]["config"]["tls_server_config"]}}
    ep = endpoint(objects)
    assert ep["scheme"] == "https" and ep["tlsConfig"] == values["serviceMonitor"]["tlsConfig"]
    assert "basicAuth" not in ep


def test_web_existing_config_secret():
    """The whole web config file from a Secret the chart does not manage: no Secret rendered,
    the TLS files still mounted beside it, the probes from web.tls."""
    objects = render(None, "web.existingConfigSecret=my-web-config",
                     "web.existingConfigKey=web.yml", "web.tls.enabled=true",
                     "web.tls.secretName=my-tls")
    assert not find(objects, "Secret")
    assert web_args(objects) == [WEB_FLAG]
    _, volume = web_volume(objects)
    assert [src["secret"]["name"] for src in volume["projected"]["sources"]] == [
        "my-web-config", "my-tls"]
    assert volume["projected"]["sources"][0]["secret"]["items"] == [
        {"key": "web.yml", "path": "web-config.yml"}]
    assert container(objects)["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    # only the optional APIs: no web config file at all
    objects = render(None, "web.enableProbe=true")
    assert web_args(objects) == ["--web.enable-probe"] and not find(objects, "Secret")


def kubelet_project(volume: dict, secrets: dict[str, dict[str, str]], directory: Path) -> None:
    """Write a projected volume the way the kubelet's AtomicWriter does: every file into a new
    timestamped directory, `..data` switched to it by a rename, each visible name a symlink
    into `..data`, the previous directory removed."""
    files = {}
    for source in volume["projected"]["sources"]:
        secret = secrets[source["secret"]["name"]]
        for item in source["secret"]["items"]:
            files[item["path"]] = secret[item["key"]]
    directory.mkdir(exist_ok=True)
    data = directory / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    n = len(list(directory.glob("..20*")))
    ts = directory / f"..2025_01_01_00_00_0{n}.{os.getpid()}"
    ts.mkdir()
    for path, content in files.items():
        (ts / path).write_text(content)
        (ts / path).chmod(volume["projected"]["defaultMode"])
    (directory / "..data_tmp").symlink_to(ts.name)
    os.replace(directory / "..data_tmp", data)
    for path in files:
        if not (directory / path).is_symlink():
            (directory / path).symlink_to(f"..data/{path}")
    if old:
        shutil.rmtree(directory / old)


@pytest.mark.parametrize("values, sets, verify", [
    (ci("web"), (), ssl.CERT_NONE),
    (ci("web"), ("web.tls.clientAuthType=VerifyClientCertIfGiven",
                 "web.tls.clientCA.secretName=inbox-exporter-tls"), ssl.CERT_OPTIONAL),
    (ci("everything"), (), ssl.CERT_REQUIRED),
], ids=["tls", "verify-if-given", "mutual-tls"])
def test_web_config_is_valid_for_the_daemon(values, sets, verify, tmp_path):
    """The rendered web config file, in the pod's volume as the kubelet lays it out (with real
    certificates), is what the daemon reads; a renewed certificate, which changes only the TLS
    Secret, is picked up without a restart, because it shares the volume with the file."""
    objects = render(values, *sets)
    _, volume = web_volume(objects)
    ca, clients = make_ca(tmp_path / "ca"), make_ca(tmp_path / "clients")

    def tls_secret(name: str) -> dict[str, str]:
        cert, key = issue(ca, name)
        return {"tls.crt": cert.read_text(), "tls.key": key.read_text(),
                "ca.crt": ca.ca.read_text()}

    secrets = {
        WEB_SECRET: {"web-config.yml": base64.b64decode(
            one(objects, "Secret", WEB_SECRET)["data"]["web-config.yml"]).decode()},
        "inbox-exporter-tls": tls_secret("server"),
        "inbox-exporter-clients-ca": {"ca.pem": clients.ca.read_text()},
    }
    mount = tmp_path / "web"
    kubelet_project(volume, secrets, mount)
    now = [0.0]
    followed = WebConfigFile(str(mount / "web-config.yml"), clock=lambda: now[0])
    first = followed.current()
    assert first.tls is not None and first.tls.verify_mode == verify
    assert first.tls.minimum_version >= ssl.TLSVersion.TLSv1_2
    if values == ci("web"):
        assert set(first.users) == {"prometheus"} and first.rate_burst == 20
        assert dict(first.headers)["Strict-Transport-Security"] == "max-age=31536000"
    # cert-manager renews: only the TLS Secret changes; the kubelet rewrites the whole volume
    secrets["inbox-exporter-tls"] = tls_secret("server-renewed")
    kubelet_project(volume, secrets, mount)
    now[0] += 5
    renewed = followed.current()
    assert renewed is not first and renewed.tls is not first.tls, "certificate not re-read"


# --- what must fail -------------------------------------------------------------------------

@pytest.mark.parametrize("setting", [
    "shard=2",                               # unknown top-level key (shards)
    "serviceMonitor.enable=true",            # unknown nested key (enabled)
    "image.tags=1.0",                        # unknown nested key (tag)
    "config.inboxs[0].name=sales",           # unknown config section (inboxes)
    "networkPolicy.egress.mail.port[0]=993",  # unknown nested key (ports)
    "shards=0",                              # out of range
    "log.format=text",                       # not an allowed value
    "service.port=70000",                    # not a port
    "oauthTokens.enable=true",               # unknown nested key (enabled)
    "oauthTokens.persistentVolumeClaim.storageClass=fast",  # unknown (storageClassName)
    "oauthTokens.storage=hostPath",          # not an allowed value
    "oauthTokens.mountPath=/etc/inbox-exporter/oauth",  # inside the config volume
    "oauthTokens.mountPath=/etc/inbox-exporter-web",  # the web volume
    "web.enableLifecyle=true",               # unknown nested key (enableLifecycle)
    "web.tls.secretname=tls",                # unknown nested key (secretName)
    "web.tls.clientAuthType=RequireClientCert",  # not one the exporter serves
    "web.tls.minVersion=TLS14",              # not a TLS version
    "web.config.basic_auth_user.prometheus=x",  # unknown web config section (basic_auth_users)
    "web.config.basic_auth_users.prometheus=hunter2",  # a plain password, not a bcrypt hash
    "web.config.tls_server_config.cert_file=/x.pem",  # set by the chart from web.tls
    "web.config.rate_limit.interval=often",  # not a duration
    "serviceMonitor.tlsConfig.insecureSkipVerfy=true",  # unknown nested key
    "serviceMonitor.tlsConfig.ca.secret.name=tls",  # a key reference without its key
    "serviceMonitor.basicAuth.username.key=user",  # basic auth without a password
    "history.enable=true",                   # unknown nested key (enabled)
    "history.mountPath=/etc/inbox-exporter/history",  # inside the config volume
    "history.mountPath=/etc/inbox-exporter-web",  # the web volume
    "history.mountPath=var/lib/history",     # not absolute
    "history.storage=hostPath",              # not an allowed value
    "history.existingClaim=history",         # not here: persistentVolumeClaim.existingClaim
    "history.persistentVolumeClaim.storageClass=fast",  # unknown (storageClassName)
    "history.persistentVolumeClaim.size=lots",  # not a quantity
    "history.emptyDir.sizelimit=1Gi",        # unknown nested key (sizeLimit)
])
def test_schema_rejects_typos(setting):
    proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION,
                "--set", setting, check=False)
    assert proc.returncode != 0, f"--set {setting} rendered:\n{proc.stdout[:500]}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


# --- check history (values: history) ----------------------------------------------------

HISTORY_PATH = "/var/lib/inbox-exporter/history"  # the default mountPath
HISTORY_MOUNT = {"name": "history", "mountPath": HISTORY_PATH}  # read-write


def history_values(name: str) -> dict:
    return yaml.safe_load(ci(name).read_text())["history"]


def volumes(objects) -> dict[str, dict]:
    return {v["name"]: v for v in pod_spec(objects)["volumes"]}


@pytest.mark.parametrize("sets", [(), ("shards=3",)], ids=["deployment", "statefulset"])
def test_history_is_off_by_default_and_kept_in_an_emptydir_when_enabled(sets):
    objects = render(None, *sets)
    c = container(objects)
    assert not any(a.startswith("--storage.path") for a in c["args"])
    assert "history" not in volumes(objects)
    assert "history" not in {m["name"] for m in c["volumeMounts"]}
    objects = render(None, *sets, "history.enabled=true")
    c, spec = container(objects), pod_spec(objects)
    assert f"--storage.path={HISTORY_PATH}" in c["args"]
    assert HISTORY_MOUNT in c["volumeMounts"]  # no readOnly: the exporter writes history.db
    assert volumes(objects)["history"] == {"name": "history", "emptyDir": {"sizeLimit": "256Mi"}}
    assert not find(objects, "PersistentVolumeClaim")
    assert "volumeClaimTemplates" not in workload(objects)["spec"]
    # written by the image's user: the volume belongs to the pod's fsGroup
    assert spec["securityContext"]["fsGroup"] == UID == c["securityContext"]["runAsUser"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert_daemon_accepts(c["args"])


def test_history_emptydir_in_memory_and_elsewhere():
    objects = render(None, "history.enabled=true", "history.emptyDir.medium=Memory",
                     "history.emptyDir.sizeLimit=32Mi", "history.mountPath=/var/lib/history")
    assert volumes(objects)["history"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Mi"}
    c = container(objects)
    assert "--storage.path=/var/lib/history" in c["args"]
    assert {"name": "history", "mountPath": "/var/lib/history"} in c["volumeMounts"]


def test_history_claim_of_the_deployment():
    """history.storage: persistentVolumeClaim with one replica: the chart's claim
    <fullname>-history (ci/existing-secret), or an existing one."""
    pvc = history_values("existing-secret")["persistentVolumeClaim"]
    objects = render(ci("existing-secret"))
    one(objects, "Deployment", FULLNAME)
    claim = one(objects, "PersistentVolumeClaim", f"{FULLNAME}-history")
    assert claim["metadata"]["namespace"] == NAMESPACE
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"],
                             "storageClassName": pvc["storageClassName"],
                             "resources": {"requests": {"storage": pvc["size"]}}}
    assert volumes(objects)["history"] == {"name": "history", "persistentVolumeClaim": {
        "claimName": f"{FULLNAME}-history"}}
    c = container(objects)
    assert HISTORY_MOUNT in c["volumeMounts"] and f"--storage.path={HISTORY_PATH}" in c["args"]
    # one pod at a time mounts it: the default strategy stops the old pod first
    assert workload(objects)["spec"]["strategy"] == {"type": "Recreate"}
    # an existing claim: mounted, none created
    objects = render(ci("existing-secret"), "history.persistentVolumeClaim.existingClaim=hist")
    assert not find(objects, "PersistentVolumeClaim")
    assert volumes(objects)["history"]["persistentVolumeClaim"] == {"claimName": "hist"}


def test_history_claim_per_shard():
    """The StatefulSet variant (ci/everything): one claim per shard from volumeClaimTemplates,
    beside the refresh-token one, none made by the chart, no pod volume."""
    objects = render(ci("everything"))
    sts = one(objects, "StatefulSet", FULLNAME)
    templates = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    assert set(templates) == {"oauth-tokens", "history"}
    size = history_values("everything")["persistentVolumeClaim"]["size"]
    assert templates["history"] == {
        "metadata": {"name": "history", "labels": sts["spec"]["selector"]["matchLabels"]},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}}
    assert not find(objects, "PersistentVolumeClaim")
    assert "history" not in volumes(objects)  # the template's claim, history-<fullname>-<i>
    c = container(objects)
    assert HISTORY_MOUNT in c["volumeMounts"] and f"--storage.path={HISTORY_PATH}" in c["args"]
    # only the history claim, without oauthTokens
    objects = render(None, "shards=2", "history.enabled=true",
                     "history.storage=persistentVolumeClaim")
    [template] = workload(objects)["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "history"
    # an existing claim cannot serve several pods
    proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION,
                "-f", str(ci("everything")),
                "--set", "history.persistentVolumeClaim.existingClaim=hist", check=False)
    assert proc.returncode != 0, proc.stdout[:500]
    assert "history.persistentVolumeClaim.existingClaim works with shards: 1 only" in proc.stderr


def test_history_and_oauth_tokens_need_their_own_directories():
    proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION,
                "--set", "history.enabled=true", "--set", "oauthTokens.enabled=true",
                "--set", "history.mountPath=/var/lib/inbox-exporter/oauth", check=False)
    assert proc.returncode != 0, proc.stdout[:500]
    assert "history.mountPath and oauthTokens.mountPath are both" in proc.stderr, proc.stderr


def notes(tmp_path: Path, values: Path | None = None, *sets: str) -> str:
    """NOTES.txt as `helm install` prints it: `helm template` does not render it, so a copy of
    the chart renders it into a ConfigMap."""
    chart = tmp_path / "chart"
    if not chart.exists():
        shutil.copytree(CHART, chart)  # symlinks followed: the copy carries the files
        text = (chart / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "_notes.tpl").write_text(
            '{{- define "test.notes" -}}\n' + text + "\n{{- end }}\n")
        (chart / "templates" / "notes.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
            'data: {notes: {{ include "test.notes" . | toJson }}}\n')
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, "--kube-version",
            KUBE_VERSION, "--show-only", "templates/notes.yaml", *values_args(values)]
    for s in sets:
        args += ["--set", s]
    return yaml.safe_load(helm(*args).stdout)["data"]["notes"]


def test_history_notes(tmp_path):
    def history_lines(*args) -> list[str]:
        return [ln for ln in notes(tmp_path, *args).splitlines()
                if "history" in ln.lower() or ln.startswith("Warning")]
    assert history_lines(None) == []
    assert history_lines(None, "history.enabled=true") == [
        f"Check history (status page strips): {HISTORY_PATH}/history.db, in an emptyDir "
        "(kept across container restarts, lost with the pod)."]
    assert history_lines(ci("existing-secret")) == [
        f"Check history (status page strips): {HISTORY_PATH}/history.db, in claim "
        f"{FULLNAME}-history (kept across new pods)."]
    assert history_lines(ci("everything")) == [
        f"Check history (status page strips): {HISTORY_PATH}/history.db, in claims "
        f"history-{FULLNAME}-<i>, one per shard (kept across new pods)."]
    # a rolling update cannot move a ReadWriteOnce claim to the new pod
    [_, warning] = history_lines(ci("existing-secret"), "deploymentStrategy.type=RollingUpdate")
    assert warning.startswith("Warning: deploymentStrategy RollingUpdate with a ReadWriteOnce "
                              "claim"), warning


def test_inline_password_is_rejected():
    proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION,
                "--set", "config.inboxes[0].name=sales",
                "--set", "config.inboxes[0].password=hunter2", check=False)
    assert proc.returncode != 0 and "config.inboxes[sales]: an inline `password`" in proc.stderr, \
        proc.stderr


@pytest.mark.parametrize("sets, message", [
    (("web.tls.enabled=true",), "web.tls.enabled needs web.tls.secretName"),
    (("web.tls.secretName=tls",), "web.tls.enabled is false"),
    (("web.tls.enabled=true", "web.tls.secretName=tls",
      "web.tls.clientAuthType=RequireAndVerifyClientCert"), "needs web.tls.clientCA.secretName"),
    (("web.tls.enabled=true", "web.tls.secretName=tls", "web.tls.clientCA.secretName=ca"),
     "web.tls.clientAuthType is NoClientCert"),
    (("web.config.tls_server_config.max_version=TLS13",),
     "web.config.tls_server_config needs web.tls.enabled"),
    (("web.existingConfigSecret=web", "web.config.rate_limit.burst=5"),
     "web.config and web.existingConfigSecret"),
    (("serviceMonitor.enabled=true", "serviceMonitor.tlsConfig.serverName=x"),
     "serviceMonitor.tlsConfig is set but web.tls.enabled is false"),
], ids=["tls-without-secret", "secret-without-tls", "mtls-without-ca", "ca-without-client-auth",
        "tls-server-config-without-tls", "config-and-existing-secret", "tlsconfig-over-http"])
def test_web_values_the_exporter_would_refuse(sets, message):
    """Combinations the exporter would refuse at start-up (or serve other than meant) fail
    `helm template` with a line that says what to set."""
    args = ["template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION]
    for setting in sets:
        args += ["--set", setting]
    proc = helm(*args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_termination_grace_must_exceed_the_shutdown_grace():
    proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION,
                "--set", "terminationGracePeriodSeconds=20", check=False)
    assert proc.returncode != 0 and "must be greater than shutdownGracePeriodSeconds" in proc.stderr


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _closed(node: dict) -> bool:
    return node.get("type") == "object" and node.get("additionalProperties") is False


def test_values_yaml_documents_every_knob():
    """Every knob of values.yaml (a key of a chart-defined section, not a section itself) has a
    comment right above it, and every key the schema allows is in values.yaml or named in one
    of its comments."""
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    schema = json.loads((CHART / "values.schema.json").read_text())
    stack: list[tuple[int, str]] = []
    seen, commented = set(), {}
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        node = schema
        for k in path[:-1]:  # only keys whose ancestors are all chart-defined sections
            node = _resolve(schema, node)
            if not _closed(node) or k not in node["properties"]:
                break
            node = node["properties"][k]
        else:
            node = _resolve(schema, node)
            if not _closed(node):
                continue
            assert key in node["properties"], f"values.yaml:{i + 1}: {'.'.join(path)} not in schema"
            seen.add(".".join(path))
            commented[tuple(path)] = lines[i - 1].strip().startswith("#")
            if _closed(_resolve(schema, node["properties"][key])):
                continue  # a section: its knobs carry the comments
            # the knob's own comment, or the one of a small section documented as a whole
            # (deploymentStrategy: {type: Recreate})
            first_child_of_commented = (len(path) > 1 and commented.get(tuple(path[:-1]))
                                        and lines[i - 1].strip() == f"{path[-2]}:")
            assert commented[tuple(path)] or first_child_of_commented, \
                f"values.yaml:{i + 1}: {'.'.join(path)} has no comment"

    def allowed(node, prefix=""):
        node = _resolve(schema, node)
        if not _closed(node):
            return
        for k, sub in node["properties"].items():
            yield prefix + k
            yield from allowed(sub, prefix + k + ".")

    for key in allowed(schema):
        if key != "global":
            assert key in seen or re.search(rf"#.*\b{re.escape(key.rsplit('.', 1)[-1])}\b", text), \
                f"{key} is neither in values.yaml nor mentioned in a comment"
