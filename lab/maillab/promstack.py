"""Real Prometheus and Alertmanager processes (Debian packages) on loopback, for the tests and
benchmarks of the alerting path: the monitoring side of the lab."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Service:
    name = "service"
    health_path = "/-/ready"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        log = open(self.workdir / f"{self.name}.log", "wb")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(self.url + self.health_path, timeout=1)
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"{self.name} did not start: "
                           + (self.workdir / f"{self.name}.log").read_text()[-2000:])

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get_json(self, path: str) -> Any:
        return json.load(urllib.request.urlopen(self.url + path, timeout=10))


class Alertmanager(_Service):
    name = "alertmanager"

    def command(self) -> list[str]:
        config = self.workdir / "alertmanager.yml"
        config.write_text(yaml.safe_dump({
            "route": {"receiver": "null", "group_wait": "1s", "group_interval": "1s"},
            "receivers": [{"name": "null"}]}))
        return ["prometheus-alertmanager", f"--config.file={config}",
                f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="]

    def alerts(self, **labels: str) -> list[dict]:
        """Active alerts whose labels include `labels`."""
        return [a for a in self.get_json("/api/v2/alerts?active=true&silenced=false&inhibited=false")
                if all(a["labels"].get(k) == v for k, v in labels.items())]


class Prometheus(_Service):
    name = "prometheus"

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path],
                 alertmanager_url: str):
        super().__init__(workdir)
        self.targets, self.rule_files, self.alertmanager_url = targets, rule_files, alertmanager_url

    def command(self) -> list[str]:
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in self.rule_files],
            "alerting": {"alertmanagers": [{"static_configs": [
                {"targets": [self.alertmanager_url.removeprefix("http://")]}]}]},
            "scrape_configs": [{"job_name": "inbox-exporter",
                                "static_configs": [{"targets": self.targets}]}]}))
        return ["prometheus", f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}"]

    def query(self, expr: str) -> list[dict]:
        from urllib.parse import quote

        return self.get_json(f"/api/v1/query?query={quote(expr)}")["data"]["result"]
