"""Whether the listener's TLS files are what Envoy can load: a PEM certificate (chain)
and its private key, unencrypted. `check-config` says so (a warning, or with `--here` an
error), and `up` before it starts anything: Envoy refused such a pair only after the
services and the simulator had started, and `up` said "envoy: a process exited"."""

from __future__ import annotations

import ssl
from pathlib import Path


class _Encrypted(Exception):
    """The key asked for a passphrase: OpenSSL would prompt on the terminal for one."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def unreadable(path: Path) -> str | None:
    """Why `path` cannot be read as a file (None: it can)."""
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        return str(e.strerror or e).lower()
    return "a directory, not a file" if path.is_dir() else None


def tls_problems(cert: Path, key: Path) -> list[str]:
    """What stops Envoy from loading `cert` and `key`, one line each naming its setting
    (`tls.cert`, `tls.key`); [] when it can. Never prompts for a passphrase, and never
    prints key material."""
    out = [f"tls.{name}: cannot read {path}: {why}"
           for name, path in (("cert", cert), ("key", key)) if (why := unreadable(path))]
    if out:
        return out
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(cert))
    except ssl.SSLError:
        return [f"tls.cert: {cert} holds no PEM certificate"]
    except OSError as e:  # (changed between the looks)
        return [f"tls.cert: cannot read {cert}: {str(e.strerror or e).lower()}"]
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            cert, key, password=_no_passphrase)
    except _Encrypted:
        return [f"tls.key: {key} is encrypted: Envoy loads a key without a passphrase "
                "(keep it decrypted, readable only by the gateway, as a Secret's file)"]
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            return [f"tls.key: {key} is not the private key of {cert}"]
        return [f"tls.key: {key} is not a PEM private key ({e.reason or 'unreadable'})"]
    except OSError as e:
        return [f"tls.key: cannot read {key}: {str(e.strerror or e).lower()}"]
    return []
