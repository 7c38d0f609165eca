"""TLS material for the web endpoint tests, made with the openssl command: a CA, server
certificates for 127.0.0.1 and a client certificate, all signed by that CA."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class WebTLS:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"


def make_ca(directory: Path) -> WebTLS:
    directory.mkdir(parents=True, exist_ok=True)
    tls = WebTLS(directory)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(directory / "ca.key"), "-out", str(tls.ca), "-days", "30",
             "-subj", "/CN=web test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return tls


def issue(tls: WebTLS, name: str, client: bool = False) -> tuple[Path, Path]:
    """A certificate signed by the CA: for 127.0.0.1/localhost, or for a client."""
    cert, key = tls.pair(name)
    csr = tls.dir / f"{name}.csr"
    ext = tls.dir / f"{name}.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   + ("extendedKeyUsage=clientAuth\n" if client else
                      "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"))
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(tls.ca), "-CAkey",
             str(tls.dir / "ca.key"), "-CAcreateserial", "-days", "30", "-extfile", str(ext),
             "-out", str(cert))
    return cert, key
