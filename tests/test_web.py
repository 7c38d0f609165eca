"""The HTTP surface, with real clients: on-demand checks and their limits, the lifecycle API,
the exporter-toolkit web config (TLS, client certificates, basic auth, headers, rate limit),
gzip, the page's security headers, URL credentials, and clients that stall."""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inbox_exporter.daemon import Exporter
from inbox_exporter.web import WebOptions, WebServer
from inbox_exporter.web import auth as web_auth
from inbox_exporter.web.app import GZIP_MIN_BYTES

from .conftest import check_now, env_name, lab_entry, wait_until, write_config
from .fakeserver import SILENT, FakeServer
from .webtls import issue, make_ca

USER, WEB_PASSWORD = "prometheus", "scrape-secret-9f2"
# bcrypt cost 10, as `htpasswd -nBC 10` makes it
WEB_HASH = bcrypt.hashpw(WEB_PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None,
          context: ssl.SSLContext | None = None, timeout: float = 30) -> Reply:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class Served:
    exporter: Exporter
    server: WebServer
    config: Path
    quits: list[bool] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url


def closed_port_inboxes(n: int = 2) -> list[dict]:
    """Inboxes whose checks fail at once on a closed loopback port, checked once a day."""
    return [{"name": f"inbox{i}", "email": f"user{i}@example.test", "password": "pw",
             "interval": "24h", "imap": {"host": "127.0.0.1", "port": 9},
             "smtp": {"host": "127.0.0.1", "port": 9}} for i in range(n)]


@pytest.fixture
def serve(tmp_path):
    started: list[Served] = []

    def start(inboxes: list[dict] | None = None, env: dict[str, str] | None = None,
              options: WebOptions | None = None, config_path: Path | None = None,
              **top) -> Served:
        path = config_path
        if path is None:
            path = tmp_path / "config.yaml"
            path.write_text(yaml.safe_dump({"inboxes": inboxes or closed_port_inboxes(), **top}))
        exporter = Exporter(str(path), environ=env or {})
        served = Served(exporter, None, path)  # type: ignore[arg-type]  # the server is set below
        served.server = WebServer(("127.0.0.1", 0), exporter, options or WebOptions(),
                                  on_quit=lambda: served.quits.append(True))
        exporter.start()
        served.server.start()
        started.append(served)
        return served

    yield start
    for s in started:
        s.exporter.stop(5)
        s.server.stop()


# --- on-demand checks -----------------------------------------------------------------------

def test_probe_is_post_only_and_off_unless_enabled(serve):
    off = serve()
    got = fetch(off.url + "/probe?inbox=inbox0")
    assert got.status == 405 and got.headers["allow"] == "POST"
    refused = fetch(off.url + "/probe?inbox=inbox0", "POST")
    assert refused.status == 403 and "--web.enable-probe" in refused.text


def test_an_inbox_is_checked_on_demand_at_most_once_per_min_interval(serve, lab, tmp_path):
    config = write_config(tmp_path, lab, [{**lab_entry(lab, "a"), "interval": "1h"},
                                          {**lab_entry(lab, "b"), "interval": "1h"}])
    env = {env_name(n): lab.users["alice"].password for n in ("a", "b")}
    served = serve(env=env, config_path=config, options=WebOptions(enable_probe=True))
    first = fetch(served.url + "/probe?inbox=a", "POST")
    assert first.status == 200
    assert 'inbox_check_success{inbox="a"} 1' in first.text
    again = fetch(served.url + "/probe?inbox=a", "POST")
    assert again.status == 429
    assert 55 <= int(again.headers["retry-after"]) <= 60
    assert "web.probe_min_interval" in again.text
    assert fetch(served.url + "/probe?inbox=b", "POST").status == 200  # per inbox


def test_no_on_demand_check_while_the_inbox_backs_off_after_a_credential_failure(serve, lab,
                                                                                 tmp_path):
    config = write_config(tmp_path, lab, [{**lab_entry(lab, "locked"), "interval": "1h"}],
                          web={"probe_min_interval": "1ms"})
    served = serve(env={env_name("locked"): "wrong-password"}, config_path=config,
                   options=WebOptions(enable_probe=True))
    for _ in range(2):  # the alert threshold: backing off starts here
        check_now(served.exporter, "locked")
    refused = fetch(served.url + "/probe?inbox=locked", "POST")
    assert refused.status == 429
    assert "backing off after auth_failed" in refused.text and "lock the account" in refused.text
    assert int(refused.headers["retry-after"]) > 3000  # the next check: 2 h away


def test_an_on_demand_check_never_stacks_on_one_in_flight_and_never_holds_the_server(serve,
                                                                                    tmp_path):
    with FakeServer([(None, SILENT)]) as silent:  # a greeting that never comes
        inboxes = [{"name": "hung", "email": "u@example.test", "password": "pw",
                    "interval": "24h", "timeout": "4s",
                    "imap": {"host": "127.0.0.1", "port": silent.port, "security": "ssl"},
                    "smtp": {"host": "127.0.0.1", "port": silent.port, "security": "ssl"}}]
        served = serve(inboxes, options=WebOptions(enable_probe=True),
                       web={"probe_min_interval": "1ms"})
        first: list[Reply] = []
        t = threading.Thread(target=lambda: first.append(
            fetch(served.url + "/probe?inbox=hung", "POST")))
        t.start()
        wait_until(lambda: served.exporter.runner.running, what="the check to start")
        t0 = time.monotonic()
        second = fetch(served.url + "/probe?inbox=hung", "POST")
        health = fetch(served.url + "/-/healthy")
        metrics = fetch(served.url + "/metrics")
        quick = time.monotonic() - t0
        t.join(30)
    assert second.status == 409 and "queued or running" in second.text
    assert health.status == 200 and metrics.status == 200 and quick < 1.0, quick
    assert first and first[0].status == 200  # the hung check ended at its deadline


def test_error_answers_never_echo_the_request(serve):
    served = serve(options=WebOptions(enable_probe=True))
    marker = "<script>alert(1)</script>"
    missing = fetch(served.url + "/probe?inbox=" + urllib.request.quote(marker), "POST")
    assert missing.status == 404 and "script" not in missing.text
    page = fetch(served.url + "/" + urllib.request.quote(marker))
    assert page.status == 404 and "script" not in page.text
    assert page.headers["x-content-type-options"] == "nosniff"


# --- lifecycle ------------------------------------------------------------------------------

def test_reload_and_quit_answer_403_unless_the_lifecycle_api_is_enabled(serve):
    served = serve()
    for path in ("/-/reload", "/-/quit"):
        got = fetch(served.url + path, "POST")
        assert got.status == 403 and "--web.enable-lifecycle" in got.text
    assert served.quits == []
    assert fetch(served.url + "/-/reload").status == 405


def test_the_lifecycle_api_reloads_and_quits_and_a_failed_reload_shows_no_secret(serve):
    served = serve(options=WebOptions(enable_lifecycle=True))
    assert fetch(served.url + "/-/reload", "POST").text == "Reloaded\n"
    doc = yaml.safe_load(served.config.read_text())
    doc["alerting"] = {"webhooks": [{"url": "ftp://hook:hook-secret-77@hooks.example/x"}]}
    served.config.write_text(yaml.safe_dump(doc))
    failed = fetch(served.url + "/-/reload", "POST")
    assert failed.status == 500 and "alerting.webhooks[0].url" in failed.text
    assert "hook-secret-77" not in failed.text
    assert fetch(served.url + "/-/ready").status == 200  # the old config runs on
    assert fetch(served.url + "/-/quit", "PUT").status == 200 and served.quits == [True]


# --- status page, gzip ----------------------------------------------------------------------

def test_the_status_page_allows_only_its_own_style_and_script(serve):
    page = fetch(serve().url + "/")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "'unsafe-inline'" not in csp and "http" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"


def test_gzip_metrics_are_one_gzip_member_holding_the_plain_text(serve):
    served = serve(closed_port_inboxes(40))  # several blocks of the exposition
    plain = fetch(served.url + "/metrics").text
    packed = fetch(served.url + "/metrics", headers={"Accept-Encoding": "gzip"})
    assert packed.headers["content-encoding"] == "gzip"
    assert len(packed.body) < len(plain) / 3
    d = zlib.decompressobj(wbits=31)  # exactly one member: what strict readers accept
    text = d.decompress(packed.body).decode()
    assert d.eof and not d.unused_data
    inbox_lines = [line for line in plain.splitlines() if line.startswith(("inbox_", "# HELP inbox_"))
                   and not line.startswith("inbox_exporter")]
    assert inbox_lines and inbox_lines == [
        line for line in text.splitlines() if line.startswith(("inbox_", "# HELP inbox_"))
        and not line.startswith("inbox_exporter")]
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"inbox_check_success", "inbox_exporter_inboxes"} <= families
    refused = fetch(served.url + "/metrics", headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in refused.headers


def test_pages_and_json_are_gzipped_when_asked_and_keep_their_headers(serve):
    served = serve(closed_port_inboxes(40))
    name = closed_port_inboxes(40)[0]["name"]
    gzipped: list[str] = []
    for path in ("/", "/api/v1/status", f"/inbox/{name}", f"/api/v1/inboxes/{name}"):
        plain = fetch(served.url + path)
        packed = fetch(served.url + path, headers={"Accept-Encoding": "gzip"})
        assert plain.status == packed.status == 200, path
        assert "content-encoding" not in plain.headers, path
        if len(plain.body) < GZIP_MIN_BYTES:  # not worth it: sent as it is
            assert "content-encoding" not in packed.headers and packed.body == plain.body, path
            continue
        assert packed.headers["content-encoding"] == "gzip", path
        assert packed.headers["content-type"] == plain.headers["content-type"], path
        assert packed.headers.get("content-security-policy") == \
            plain.headers.get("content-security-policy"), path
        body = zlib.decompress(packed.body, wbits=31)
        gzipped.append(path)
        if path.startswith("/api/"):  # the documents agree (ages in them may tick between)
            assert json.loads(body).keys() == json.loads(plain.body).keys(), path
        else:
            assert body.startswith(b"<!doctype html>") and len(packed.body) < len(body) / 2, path
    # small answers and errors go out as they are
    assert len(gzipped) >= 3, "the status page, its JSON and an inbox page are over the threshold"
    assert "content-encoding" not in fetch(served.url + "/-/healthy",
                                           headers={"Accept-Encoding": "gzip"}).headers
    assert "content-encoding" not in fetch(served.url + "/inbox/nope",
                                           headers={"Accept-Encoding": "gzip"}).headers


# --- the web config file --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    material = make_ca(tmp_path_factory.mktemp("webtls"))
    issue(material, "server")
    issue(material, "server2")
    issue(material, "client", client=True)
    return material


def web_file(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(sections))
    return path


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True,
                          text=True, timeout=20)


def tls_section(tls, **extra) -> dict:
    cert, key = tls.pair("server")
    return {"cert_file": str(cert), "key_file": str(key), **extra}


def test_over_tls_with_basic_auth_curl_needs_the_password_and_health_does_not(serve, tls,
                                                                             tmp_path):
    path = web_file(tmp_path, tls_server_config=tls_section(tls),
                    basic_auth_users={USER: WEB_HASH},
                    http_server_config={"headers": {"Strict-Transport-Security": "max-age=300"}})
    served = serve(options=WebOptions(config_file=str(path)))
    assert served.url.startswith("https://")
    url = served.url + "/metrics"
    anonymous = curl("--cacert", str(tls.ca), "-o", "/dev/null", "-w", "%{http_code}", url)
    assert anonymous.stdout == "401"
    wrong = curl("--cacert", str(tls.ca), "-u", f"{USER}:nope", "-o", "/dev/null",
                 "-w", "%{http_code}", url)
    assert wrong.stdout == "401"
    right = curl("--cacert", str(tls.ca), "-u", f"{USER}:{WEB_PASSWORD}", "-D", "-", url)
    assert right.returncode == 0, right.stderr
    assert "HTTP/2 200" in right.stdout or "HTTP/1.1 200" in right.stdout
    assert "strict-transport-security: max-age=300" in right.stdout.lower()
    assert "inbox_exporter_inboxes 2.0" in right.stdout
    health = curl("--cacert", str(tls.ca), served.url + "/-/healthy")
    assert health.stdout == "Healthy\n"
    # plain HTTP is not served on a TLS port
    plain = curl("http://" + served.url.removeprefix("https://") + "/metrics")
    assert plain.returncode != 0 or "inbox_exporter" not in plain.stdout
    assert WEB_PASSWORD not in served.exporter.render_metrics()[0].decode()


def test_basic_auth_pays_bcrypt_once_for_repeated_credentials(serve, tmp_path, monkeypatch):
    calls = []
    real = web_auth._verify
    monkeypatch.setattr(web_auth, "_verify", lambda pw, h: calls.append(1) or real(pw, h))
    path = web_file(tmp_path, basic_auth_users={USER: WEB_HASH})
    served = serve(options=WebOptions(config_file=str(path)))
    for _ in range(10):
        assert fetch(served.url + "/metrics", headers=basic(USER, WEB_PASSWORD)).status == 200
    assert len(calls) == 1
    for _ in range(3):  # an unknown user costs a bcrypt too (no enumeration by timing)
        assert fetch(served.url + "/metrics", headers=basic("mallory", "x")).status == 401
    assert len(calls) == 2


def test_client_certificates_are_required_when_configured(serve, tls, tmp_path):
    path = web_file(tmp_path, tls_server_config=tls_section(
        tls, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(tls.ca),
        min_version="TLS13"))
    served = serve(options=WebOptions(config_file=str(path)))
    without = curl("--cacert", str(tls.ca), served.url + "/metrics")
    assert without.returncode != 0
    cert, key = tls.pair("client")
    with_cert = curl("--cacert", str(tls.ca), "--cert", str(cert), "--key", str(key),
                     served.url + "/metrics")
    assert with_cert.returncode == 0 and "inbox_exporter_inboxes" in with_cert.stdout
    old = curl("--cacert", str(tls.ca), "--cert", str(cert), "--key", str(key), "--tls-max",
               "1.2", served.url + "/metrics")
    assert old.returncode != 0  # min_version TLS13


def test_a_new_certificate_is_served_without_a_restart_and_a_broken_edit_is_ignored(
        serve, tls, tmp_path, caplog):
    cert, key = tls.pair("server")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    path = web_file(tmp_path, tls_server_config={"cert_file": "live.pem", "key_file": "live.key"})
    served = serve(options=WebOptions(config_file=str(path)))
    host, port = served.server.server_address[:2]

    def serial() -> int:
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        with socket.create_connection((host, port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            der = s.getpeercert(binary_form=True)
        return int.from_bytes(der, "big")  # the certificate itself, compared as a number

    before = serial()
    cert2, key2 = tls.pair("server2")
    live_key.write_bytes(key2.read_bytes())  # renewed in place, as certbot does: the web
    live_cert.write_bytes(cert2.read_bytes())  # config file itself is not touched
    wait_until(lambda: serial() != before, timeout=5, what="the new certificate")
    caplog.set_level(logging.ERROR)
    path.write_text("tls_server_config: {min_version: TLS99}\n")
    time.sleep(1.2)  # the file is looked at once a second
    assert fetch(served.url + "/-/healthy", context=ssl.create_default_context(
        cafile=str(tls.ca))).status == 200
    assert any("not valid" in r.getMessage() for r in caplog.records)
    path.write_bytes(b"# \xe9dit\xe9 en Latin-1\n")  # an editor's wrong encoding
    time.sleep(1.2)
    for _ in range(2):  # handshakes and requests go on with the last good config
        assert fetch(served.url + "/metrics", context=ssl.create_default_context(
            cafile=str(tls.ca))).status == 200
        time.sleep(1.1)
    assert any("not UTF-8" in getattr(r, "error", "") for r in caplog.records)


def test_the_rate_limit_of_the_web_config_answers_429(serve, tmp_path):
    path = web_file(tmp_path, rate_limit={"interval": "1m", "burst": 2})
    served = serve(options=WebOptions(config_file=str(path)))
    codes = [fetch(served.url + "/api/v1/status").status for _ in range(3)]
    assert codes == [200, 200, 429]
    assert fetch(served.url + "/-/healthy").status == 200


INVALID_WEB_CONFIGS = [
    ({"tls_server_config": {"cert_file": "c.pem", "key_file": "k.pem", "min_version": "TLS99"}},
     "tls_server_config.min_version"),
    ({"tls_server_config": {"key_file": "k.pem"}}, "tls_server_config.cert_file: missing"),
    ({"tls_server_config": {"cert_file": "nope.pem", "key_file": "nope.key"}},
     "cannot load the certificate"),
    ({"tls_server_config": {"cert_file": "c", "key_file": "k", "client_auth_type": "RequireAnyClientCert"}},
     "not supported"),
    ({"tls_server_config": {"cert_file": "c", "key_file": "k", "cipher_suites": ["TLS_FAKE"]}},
     "unknown cipher"),
    ({"basic_auth_users": {"u": "plaintext-password"}}, "basic_auth_users.u: must be a bcrypt hash"),
    ({"http_server_config": {"headers": {"Server": "x"}}}, "can not be configured"),
    ({"tls_config": {}}, "tls_config: unknown key"),
    (b"# Gr\xfc\xdfe (Latin-1)\nbasic_auth_users: {}\n", "web.yml: line 1: not UTF-8 text (byte 0xfc)"),
]


@pytest.mark.parametrize("content,message", INVALID_WEB_CONFIGS,
                         ids=[m for _, m in INVALID_WEB_CONFIGS])
def test_a_bad_web_config_file_stops_the_start_with_one_line_naming_the_key(tmp_path, content,
                                                                           message):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"inboxes": closed_port_inboxes(1)}))
    if isinstance(content, bytes):
        web = tmp_path / "web.yml"
        web.write_bytes(content)
    else:
        web = web_file(tmp_path, **content)
    r = subprocess.run(["inbox-exporter", "run", f"--config.file={config}",
                        f"--web.config.file={web}", "--web.listen-address=127.0.0.1:0"],
                       capture_output=True, text=True, timeout=30,
                       env={"PATH": str(Path(__import__("sys").executable).parent)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert "plaintext-password" not in r.stderr


# --- a real Prometheus over TLS with basic auth ---------------------------------------------

def test_a_real_prometheus_scrapes_over_tls_with_basic_auth(serve, tls, tmp_path):
    from maillab.promstack import Prometheus

    path = web_file(tmp_path, tls_server_config=tls_section(tls),
                    basic_auth_users={USER: WEB_HASH})
    served = serve(options=WebOptions(config_file=str(path)))
    target = served.url.removeprefix("https://")

    class ScrapingPrometheus(Prometheus):
        def command(self) -> list[str]:
            config = self.workdir / "prometheus.yml"
            config.write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [{
                    "job_name": "inbox-exporter", "scheme": "https",
                    "tls_config": {"ca_file": str(tls.ca)},
                    "basic_auth": {"username": USER, "password": WEB_PASSWORD},
                    "static_configs": [{"targets": [target]}]}]}))
            return ["prometheus", f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}"]

    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    with ScrapingPrometheus(prom_dir, [target], [], "") as prom:
        def scraped():
            up = prom.query('up{job="inbox-exporter"}')
            inboxes = prom.query('inbox_exporter_inboxes{job="inbox-exporter"}')
            return up and up[0]["value"][1] == "1" and inboxes and inboxes[0]["value"][1] == "2"

        wait_until(scraped, timeout=30, what="Prometheus to scrape over TLS with basic auth")
        targets = prom.get_json("/api/v1/targets")["data"]["activeTargets"]
    assert targets[0]["scrapeUrl"].startswith("https://") and targets[0]["health"] == "up"


# --- URL credentials ------------------------------------------------------------------------

def test_url_credentials_become_an_authorization_header_and_never_reach_a_log(tmp_path, caplog):
    from .httpcapture import Capture

    caplog.set_level(logging.DEBUG)
    with Capture() as am:
        host_port = am.url.removeprefix("http://")
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({
            "inboxes": closed_port_inboxes(1),
            "alerting": {"failure_threshold": 1, "alertmanager": {
                "url": f"http://am-user:am-pass-31@{host_port}/", "resend_interval": "1h"}}}))
        exporter = Exporter(str(config), environ={})
        exporter.start()
        try:
            check_now(exporter, "inbox0")
            requests = am.wait_for(1)
        finally:
            exporter.stop(5)
    assert requests and requests[0]["path"] == "/api/v2/alerts"
    assert requests[0]["headers"]["Authorization"] == "Basic " + base64.b64encode(
        b"am-user:am-pass-31").decode()
    assert "am-pass-31" not in caplog.text
    assert "am-pass-31" in exporter._secrets()  # the Sentry scrubber knows it


def test_log_lines_redact_url_credentials_whoever_wrote_them():
    from inbox_exporter.logs import JSONFormatter, LogfmtFormatter

    record = logging.makeLogRecord({"msg": "nonnumeric port: http://u:pw-42@host/ failed",
                                    "url": "https://a:pw-43@b.example:9/"})
    for formatter in (LogfmtFormatter(), JSONFormatter()):
        line = formatter.format(record)
        assert "pw-42" not in line and "pw-43" not in line and "<redacted>@host" in line


# --- clients that stall ---------------------------------------------------------------------

def test_stalled_clients_neither_delay_metrics_nor_cost_threads_and_are_cut(serve):
    served = serve(closed_port_inboxes(50))
    host, port = served.server.server_address[:2]
    threads_before = threading.active_count()
    stalled = []
    for i in range(200):  # half say nothing, half stop in the middle of their headers
        s = socket.create_connection((host, port), timeout=5)
        if i % 2:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        stalled.append(s)
    t0 = time.monotonic()
    assert fetch(served.url + "/metrics", timeout=5).status == 200
    assert fetch(served.url + "/-/healthy", timeout=5).status == 200
    took = time.monotonic() - t0
    assert took < 2.0, took
    assert threading.active_count() <= threads_before + 3  # the render pool, not a thread each
    opened = time.monotonic()

    def cut(s: socket.socket) -> bool:
        s.settimeout(0.01)
        for _ in range(10):  # an error page may come first: read on to the close
            try:
                if s.recv(65536) == b"":
                    return True
            except (TimeoutError, BlockingIOError):
                return False
            except OSError:
                return True  # reset
        return False

    def all_cut() -> bool:
        return all(cut(s) for s in stalled)

    wait_until(all_cut, timeout=20, what="the server to cut the stalled connections")
    assert time.monotonic() - opened < 15
    for s in stalled:
        s.close()


def test_sentry_breadcrumbs_lose_url_credentials_and_known_secrets():
    from inbox_exporter.alerts.sentry import breadcrumb_scrubber

    scrub = breadcrumb_scrubber(lambda: ["token-55"])
    crumb = scrub({"message": "POST https://user:pw-44@sink.example/ with token-55",
                   "data": {"url": "http://a:pw-45@b/"}}, {})
    text = json.dumps(crumb)
    assert "pw-44" not in text and "pw-45" not in text and "token-55" not in text
