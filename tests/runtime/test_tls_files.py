"""The listener's TLS files as Envoy would load them (authz/runtime/tls_files.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from authz.runtime.tls_files import EXPIRY_NOTICE_S, tls_problems, tls_warnings
from tests.tls import make_test_ca


def test_each_bad_pair_is_one_line_naming_the_file_at_fault(tmp_path: Path) -> None:
    _, cert, key = make_test_ca(tmp_path)
    assert tls_problems(cert, key) == []
    (tmp_path / "garbage").write_text("garbage\n")
    (tmp_path / "half.key").write_text(key.read_text()[:300])
    [missing] = tls_problems(tmp_path / "none.crt", key)
    assert missing.startswith("tls.cert: cannot read") and "no such file" in missing
    assert tls_problems(tmp_path / "garbage", key) == [
        f"tls.cert: {tmp_path / 'garbage'} holds no PEM certificate"]
    assert tls_problems(key, cert) == [f"tls.cert: {key} holds no PEM certificate"]
    assert tls_problems(cert, tmp_path / "ca.key") == [
        f"tls.key: {tmp_path / 'ca.key'} is not the private key of {cert}"]
    [half] = tls_problems(cert, tmp_path / "half.key")
    assert half.startswith(f"tls.key: {tmp_path / 'half.key'} is not a PEM private key")
    assert "BEGIN" not in half  # never key material


def test_an_encrypted_key_is_said_at_once_never_prompted_for(tmp_path: Path) -> None:
    """TLS tester: check-config asked for a PEM pass phrase on the terminal and waited
    (typed in, it said "ok" for a key Envoy cannot load); with no terminal it printed the
    prompt twice and "Invalid argument"."""
    _, cert, key = make_test_ca(tmp_path)
    subprocess.run(["openssl", "rsa", "-in", str(key), "-aes256", "-passout", "pass:s3cret",
                    "-out", str(tmp_path / "enc.key")], check=True, capture_output=True,
                   timeout=60)
    t0 = time.monotonic()
    [line] = tls_problems(cert, tmp_path / "enc.key")
    assert time.monotonic() - t0 < 10
    assert line.startswith(f"tls.key: {tmp_path / 'enc.key'} is encrypted")


def test_a_certificate_clients_will_refuse_is_named(tmp_path: Path) -> None:
    """TLS tester: an expired listener certificate was served without a word; Envoy
    loads it, and every client then fails its handshake."""
    _, cert, _ = make_test_ca(tmp_path, days=30)
    now = time.time()
    assert tls_warnings(cert, lambda: now) == []
    [soon] = tls_warnings(cert, lambda: now + 30 * 86_400 - EXPIRY_NOTICE_S + 3_600)
    assert soon.startswith(f"tls.cert: {cert} expires on ") and "renew it" in soon
    [expired] = tls_warnings(cert, lambda: now + 31 * 86_400)
    assert expired.startswith(f"tls.cert: {cert} expired on ")
    [early] = tls_warnings(cert, lambda: now - 86_400)
    assert early.startswith(f"tls.cert: {cert} is not valid until ")
    # What tls_problems names is no warning here.
    (tmp_path / "garbage").write_text("garbage\n")
    assert tls_warnings(tmp_path / "garbage") == tls_warnings(tmp_path / "none") == []
