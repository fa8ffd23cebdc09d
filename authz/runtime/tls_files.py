"""Whether the listener's TLS files are what Envoy can load: a PEM certificate (chain)
and its private key, unencrypted. `check-config` says so (a warning, or with `--here` an
error), and `up` before it starts anything: Envoy refused such a pair only after the
services and the simulator had started, and `up` said "envoy: a process exited"."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from authz.runtime.cert_key import key_problem
from policy.config import Model

# A certificate this close to its end is named, so that it is renewed before clients
# start refusing it.
EXPIRY_NOTICE_S = 14 * 86_400


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


def backend_key_problems(models: Mapping[str, Model], env: Mapping[str, str]) -> list[str]:
    """A backend API key Envoy could not load where `up` runs (new-user tester: `up`
    started, and each request got 503 "cannot load this model's backend API key"): a
    variable `api_key_env` names that is unset or empty in `env`, or an `api_key_file`
    that cannot be read. One line per model."""
    out = []
    for alias, m in models.items():
        where = next((b.credential for b in m.backends if b.credential), None)
        if where is None:
            continue
        kind, name = where
        if kind == "env" and not env.get(name):
            out.append(f"models.{alias}: its backend API key variable {name} is not set: "
                       "its requests would get 503")
        elif kind == "file" and (why := unreadable(Path(name))):
            out.append(f"models.{alias}: cannot read its backend API key file {name}: {why}")
    return out


def ca_problems(setting: str, path: Path) -> list[str]:
    """What stops Envoy from checking certificates against the PEM CAs in `path` (a
    cluster that names it is refused, and its model answers nothing): one line naming
    `setting`; [] when it can."""
    if why := unreadable(path):
        return [f"{setting}: cannot read {path}: {why}"]
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        return [f"{setting}: {path} holds no PEM certificate"]
    except OSError as e:  # (changed between the looks)
        return [f"{setting}: cannot read {path}: {str(e.strerror or e).lower()}"]
    return []


def backend_ca_problems(models: Mapping[str, Model]) -> list[str]:
    """`ca_problems` of every model's `backend_ca_file`."""
    return [line for alias, m in models.items() if m.backend_ca_file is not None
            for line in ca_problems(f"models.{alias}.backend_ca_file", m.backend_ca_file)]


def tls_problems(cert: Path, key: Path) -> list[str]:
    """What stops Envoy from loading `cert` and `key`, one line each naming its setting
    (`tls.cert`, `tls.key`); [] when it can. Never prompts for a passphrase, and never
    prints key material."""
    out = [f"tls.{name}: cannot read {path}: {why}"
           for name, path in (("cert", cert), ("key", key)) if (why := unreadable(path))]
    if out:
        return out
    if out := ca_problems("tls.cert", cert):  # a PEM certificate at all
        return out
    try:
        why = key_problem(cert.read_bytes())
    except OSError as e:  # (changed between the looks)
        return [f"tls.cert: cannot read {cert}: {str(e.strerror or e).lower()}"]
    if why is not None:
        return [f"tls.cert: {cert} {why}"]
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            cert, key, password=_no_passphrase)
    except _Encrypted:
        return [f"tls.key: {key} is encrypted: Envoy loads a key without a passphrase "
                "(keep it decrypted, readable only by the gateway, as a Secret's file)"]
    except ssl.SSLError as e:
        # (A key of another type than the certificate's: NO_CERTIFICATE_ASSIGNED.)
        if e.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            return [f"tls.key: {key} is not the private key of {cert}"]
        return [f"tls.key: {key} is not a PEM private key ({e.reason or 'unreadable'})"]
    except OSError as e:
        return [f"tls.key: cannot read {key}: {str(e.strerror or e).lower()}"]
    return []


def tls_warnings(cert: Path, clock: Callable[[], float] = time.time) -> list[str]:
    """What Envoy loads but clients will refuse, one line: the leaf certificate (the
    file's first) expired, not valid yet, or ending within `EXPIRY_NOTICE_S`. [] when
    the file cannot be decoded (`tls_problems` names that)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # CPython's decoder of a PEM file; absent elsewhere
        return []
    try:
        info = decode(str(cert))
        start = ssl.cert_time_to_seconds(info["notBefore"])
        end = ssl.cert_time_to_seconds(info["notAfter"])
    except (ssl.SSLError, OSError, ValueError, KeyError, TypeError):
        return []
    now = clock()
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(end))
    if now >= end:
        return [f"tls.cert: {cert} expired on {until}: clients will refuse it "
                "(Envoy serves it all the same)"]
    if now < start:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start))
        return [f"tls.cert: {cert} is not valid until {since}: clients will refuse it "
                "until then (check this machine's clock)"]
    if end - now < EXPIRY_NOTICE_S:
        days = (end - now) / 86_400
        return [f"tls.cert: {cert} expires on {until} (in {days:.1f} days): renew it"]
    return []
