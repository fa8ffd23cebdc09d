"""The listener's TLS files as Envoy would load them (authz/runtime/tls_files.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from authz.envoy_config.binary import envoy_path
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


# A listener with the pair, for `envoy --mode validate` (it loads the files).
_VALIDATE = """\
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.\\
            DownstreamTlsContext"
          common_tls_context:
            tls_certificates:
            - certificate_chain: {filename: %s}
              private_key: {filename: %s}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c
  clusters:
  - name: c
    load_assignment: {cluster_name: c, endpoints: []}
"""


@pytest.mark.parametrize(("newkey", "loads"), [
    (["rsa:2048"], True), (["rsa:1024"], False),
    (["ec", "-pkeyopt", "ec_paramgen_curve:P-256"], True),
    (["ec", "-pkeyopt", "ec_paramgen_curve:P-521"], True),
    (["ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"], False),
    (["ec", "-pkeyopt", "ec_paramgen_curve:brainpoolP256r1"], False),
    (["ed25519"], True), (["ed448"], False)])
def test_a_key_type_envoy_refuses_is_said_as_envoy_would(
        tmp_path: Path, newkey: list[str], loads: bool) -> None:
    """TLS tester: secp256k1, brainpool, DSA, Ed448 (and small RSA) keys passed
    `check-config --here` and `up`'s check; Envoy then refused them at start. The check
    says what real Envoy does with each."""
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", *newkey, "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "20", "-subj", "/CN=localhost"],
                   check=True, capture_output=True, timeout=60)
    conf = tmp_path / "v.yaml"
    conf.write_text(_VALIDATE % (cert, key))
    envoy = subprocess.run([str(envoy_path()), "--mode", "validate", "-c", str(conf)],
                           capture_output=True, timeout=60)
    assert (envoy.returncode == 0) is loads, envoy.stdout[-2000:]
    said = tls_problems(cert, key)
    assert (said == []) is loads, said
    if not loads:
        [line] = said
        assert line.startswith(f"tls.cert: {cert} holds ") and "Envoy" in line
