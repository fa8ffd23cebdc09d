"""The public key type of a PEM certificate, read from its DER (no crypto library here):
Envoy's TLS (BoringSSL) loads RSA keys of 2048 bits or more, ECDSA keys on P-256, P-384
or P-521, and Ed25519; it refused others (secp256k1, brainpool, DSA, Ed448, small RSA)
only once it started, after `check-config --here` had passed them (TLS tester)."""

from __future__ import annotations

import base64
import binascii
import re

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)

# Algorithm and curve object identifiers, as DER content bytes.
_RSA = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1
_EC = bytes.fromhex("2a8648ce3d0201")  # 1.2.840.10045.2.1
_ED25519 = bytes.fromhex("2b6570")  # 1.3.101.112
_CURVES = {bytes.fromhex("2a8648ce3d030107"): "P-256",  # prime256v1
           bytes.fromhex("2b81040022"): "P-384",  # secp384r1
           bytes.fromhex("2b81040023"): "P-521"}  # secp521r1
MIN_RSA_BITS = 2048


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at `at`."""
    tag, n = der[at], der[at + 1]
    at += 2
    if n & 0x80:
        size = n & 0x7F
        n = int.from_bytes(der[at:at + size], "big")
        at += size
    if at + n > len(der):
        raise ValueError("truncated")
    return tag, at, at + n


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out, at = [], start
    while at < end:
        tag, s, e = _tlv(der, at)
        out.append((tag, s, e))
        at = e
    return out


def key_problem(pem: bytes) -> str | None:
    """Why Envoy would refuse the key of the file's first certificate (None: it takes
    it, or the file cannot be read this way: the other checks say that)."""
    m = _PEM_CERT.search(pem)
    if m is None:
        return None
    try:
        der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
        _, s, e = _tlv(der, 0)  # Certificate
        _, s, e = _tlv(der, s)  # tbsCertificate
        fields = _children(der, s, e)
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        _, s, e = fields[5]  # serial, signature, issuer, validity, subject, SPKI
        (_, a_s, a_e), (_, k_s, _) = _children(der, s, e)[:2]
        algorithm = _children(der, a_s, a_e)
        oid = der[algorithm[0][1]:algorithm[0][2]]
        if oid == _RSA:
            _, r_s, r_e = _tlv(der, k_s + 1)  # BIT STRING: its unused-bits byte first
            _, n_s, n_e = _children(der, r_s, r_e)[0]  # the modulus
            bits = int.from_bytes(der[n_s:n_e], "big").bit_length()
            return None if bits >= MIN_RSA_BITS else (
                f"holds an RSA key of {bits} bits: Envoy loads {MIN_RSA_BITS} or more")
        if oid == _EC:
            curve = der[algorithm[1][1]:algorithm[1][2]] if len(algorithm) > 1 else b""
            return None if curve in _CURVES else (
                "holds an ECDSA key on a curve Envoy does not load: use P-256, P-384 or "
                "P-521")
        if oid == _ED25519:
            return None
        return ("holds a key of a type Envoy does not load: use RSA (2048 bits or more), "
                "ECDSA (P-256, P-384, P-521) or Ed25519")
    except (ValueError, IndexError, binascii.Error):
        return None
