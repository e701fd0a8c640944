"""A throw-away PKI made with the openssl command for TLS tests: a CA, certificates it signs
(for 127.0.0.1/localhost, usable as server and client), and a self-signed one it does not."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(folder: Path, names: tuple[str, ...]) -> tuple[Path, dict[str, Identity]]:
    """(the CA's certificate, {name: identity signed by it, "rogue": self-signed})."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = folder / "ca.crt", folder / "ca.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=spinenode test CA", "-keyout", str(ca_key), "-out", str(ca_cert))
    extensions = folder / "leaf.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                          "extendedKeyUsage=serverAuth,clientAuth\n")
    made = {}
    for name in names:
        key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(key), "-out", str(csr))
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert))
        made[name] = Identity(cert, key)
    rogue = Identity(folder / "rogue.crt", folder / "rogue.key")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=rogue",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(rogue.key),
             "-out", str(rogue.cert))
    made["rogue"] = rogue
    return ca_cert, made
