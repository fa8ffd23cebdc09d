"""A throwaway CA and a localhost server certificate it signed (openssl CLI), for tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_test_ca(d: Path, days: int = 30,
                 san: str = "DNS:localhost,IP:127.0.0.1") -> tuple[Path, Path, Path]:
    """(ca.crt, tls.crt, tls.key) in `d`; the certificate covers `san` (localhost and
    127.0.0.1) and is valid for `days` from now."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj",
            "/CN=tokenbooth test CA", "-keyout", "ca.key", "-out", "ca.crt")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "tls.key", "-out", "tls.csr")
    (d / "san.ext").write_text(f"subjectAltName={san}\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", str(days), "-extfile", "san.ext", "-out", "tls.crt")
    return d / "ca.crt", d / "tls.crt", d / "tls.key"
