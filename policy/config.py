"""The policy file (YAML): models, backends, prices, static keys, gateway ports.

`load_config(path)` validates a file and raises `ConfigError` whose message
names the file, the path inside it and what is wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Mapping, Sequence
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from policy.bounds import MAX_EXACT, BudgetUsd, Count, plain_amount
from policy.keyrecord import SCOPES, KeyRecord, OrgName
from policy.names import lookalike_problem, twin_problem
from policy.sse import MAX_EVENT_BYTES
from policy.stream_pace import ABORT_STEPS
from policy.yaml_load import DuplicateKey, key_texts, load_yaml

__all__ = ["REDIS_PASSWORD_ENV", "SCOPES", "Config", "ConfigError", "KeyRecord", "load_config",
           "parse_hostport", "port_clashes", "price_warnings"]

# The Redis password, kept out of the file (a Kubernetes Secret as an env var).
REDIS_PASSWORD_ENV = "TOKENBOOTH_REDIS_PASSWORD"  # noqa: S105 - a variable name
_HOSTPORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")


# The prefix of tokenbooth's own environment variables (authz/runtime/settings.py).
OWN_ENV_PREFIX = "TOKENBOOTH_"


class ConfigError(ValueError):
    """A config file is unreadable or invalid. `problems`: every error found, each one
    line naming the file and the path inside it; the message is the first (one line)."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
        more = len(self.problems) - 1
        super().__init__(self.problems[0] + (f" (and {more} more)" if more else ""))


def parse_hostport(value: str) -> tuple[str, int]:
    """Split `host:port`; raise ValueError on anything else."""
    m = _HOSTPORT.match(value)
    if not m or not 0 <= int(m["port"]) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return m["host"].strip("[]"), int(m["port"])


def _check_hostport(value: str) -> str:
    parse_hostport(value)
    return value


HostPort = Annotated[str, AfterValidator(_check_hostport)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Backend(_Strict):
    """One upstream server (a vLLM pod or Service) that serves a model."""

    url: str
    weight: int = Field(default=1, ge=1, le=10_000)
    # The backend's API key (vLLM's --api-key), sent by Envoy as `Authorization: Bearer`:
    # named here, never written here. Envoy reads it from its own environment or a file.
    api_key_env: str | None = None
    api_key_file: str | None = None

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            # Not echoed: what is here instead of a name may be the key itself.
            raise ValueError("expected an environment variable's name (letters, digits "
                             "and _, not starting with a digit), not its value")
        if v is not None and v.upper().startswith(OWN_ENV_PREFIX):
            # tokenbooth's own settings (the admin token among them): Envoy is not given
            # them, and one named here would go to every backend.
            raise ValueError(f"{v} is one of tokenbooth's own settings ({OWN_ENV_PREFIX}*), "
                             "not a backend's key: name a variable of its own")
        return v

    @field_validator("api_key_file")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("/") and len(v) > 1):
            raise ValueError(f"expected an absolute path, got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError("a backend's key is never written in the config: name it with "
                             "api_key_env (an environment variable) or api_key_file (a path)")
        return data

    @model_validator(mode="after")
    def _one_key_source(self) -> Backend:
        if self.api_key_env is not None and self.api_key_file is not None:
            raise ValueError("set api_key_env or api_key_file, not both")
        return self

    @property
    def credential(self) -> tuple[str, str] | None:
        """Where the key comes from: ("env", NAME) or ("file", PATH); None without one."""
        if self.api_key_env is not None:
            return "env", self.api_key_env
        if self.api_key_file is not None:
            return "file", self.api_key_file
        return None

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str) -> str:
        shown = backend_shown(v)  # messages never carry a user, path, query or fragment
        if v != v.strip():
            raise ValueError(f"a backend URL has spaces around it: {shown}")
        try:
            parts = urlsplit(v)
        except ValueError:  # a bracketed host that is no IP address
            raise ValueError(f"{_host_problem(v) or 'not a URL'}, in {shown}") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"expected http(s)://host[:port], got {shown}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"a backend URL carries no user or password (name its key "
                             f"with api_key_env or api_key_file): {shown}")
        # Any `?` or `#`, even with nothing after it: an empty one passed urlsplit and
        # became part of the Host header Envoy sent.
        if parts.path not in ("", "/") or "?" in v or "#" in v:
            raise ValueError(f"a backend URL has no path, query or fragment: {shown}")
        problem = _host_problem(v)
        if problem:
            raise ValueError(f"{problem}, in {shown}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"bad port in {shown}: expected 1 to 65535") from None
        if port == 0:  # urlsplit reads it as no port at all: Envoy would use 80 or 443
            raise ValueError(f"port 0 in {shown}: expected the backend's port, 1 to 65535")
        return v.rstrip("/")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    @property
    def endpoint(self) -> tuple[str, str, int]:
        """(scheme, host, port) as Envoy reaches it: the host lowercased, without a DNS
        name's final dot (an IPv6 address in its short form, an IPv4-mapped one as that
        IPv4 address), the port said or implied. Two backends alike here are one."""
        host = self.host.rstrip(".")
        if ":" in host:
            v6 = ipaddress.IPv6Address(host)
            host = str(v6.ipv4_mapped or v6)
        return urlsplit(self.url).scheme, host, self.port


# A DNS name as Envoy resolves it for a backend's cluster (STRICT_DNS; `localhost`,
# a Kubernetes Service, a Docker Compose service, whose names may hold `_`): ASCII
# labels of letters, digits, `-` and `_`, each 1 to 63 characters, 253 in all.
_DNS_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")


def _netloc(url: str) -> tuple[str, str, bool, str]:
    """(scheme, host[:port], whether a user part precedes it, what follows it) as
    written in `url`, whatever else it holds."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in rest[len(netloc):]:
        # A user part holding '/', '?' or '#' unescaped (a password): all before the last
        # '@' is taken as it, so that no message shows the password's start as a host.
        after = rest.rpartition("@")[2]
        hostport = re.split(r"[/?#]", after, maxsplit=1)[0]
        return scheme, hostport, True, after[len(hostport):]
    _, at, hostport = netloc.rpartition("@")
    return scheme, hostport, bool(at), rest[len(netloc):]


def backend_shown(url: str) -> str:
    """A backend URL fit for messages: its scheme://host:port as written, quoted, and a
    note of what was left out. Never its user part, path, query or fragment: a
    gateway's path or fragment may carry a token."""
    scheme, hostport, user, tail = _netloc(url)
    left_out = [what for what, there in (("user", user),
                                          ("path, query or fragment", tail not in ("", "/")))
                if there]
    if len(hostport) > 100:
        hostport = hostport[:99] + "…"
    shown = repr(f"{scheme}://{hostport}" if scheme else hostport)
    return shown + (f" ({' and '.join(left_out)} not shown)" if left_out else "")


def _host_problem(url: str) -> str | None:
    """What Envoy cannot use as the host of `url` (as written), or None: an IPv4 or
    IPv6 address (no zone id) or a DNS name of ASCII labels (`_DNS_LABEL`)."""
    hostport = _netloc(url)[1]
    if hostport.startswith("["):
        host = hostport[1:].partition("]")[0]
        if "%" in host:
            return (f"the IPv6 address {host!r} has a zone id ({host[host.index('%'):]!r}), "
                    "which Envoy cannot use: give an address without one, or a DNS name")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"expected an IPv6 address in brackets, got {hostport[:64]!r}"
        return None
    host = hostport.rpartition(":")[0] if ":" in hostport else hostport
    if not host:
        return "no host"
    if "$" in host:
        return (f"the host {host!r} names an environment variable: the config does not "
                "expand them; write the host itself (a template tool such as envsubst "
                "can write it into the file before it is loaded)")
    if not host.isascii():
        try:
            idna = host.encode("idna").decode("ascii")
        except UnicodeError:
            idna = None
        return (f"the host {host!r} is not ASCII: Envoy resolves a name in its IDNA "
                "(punycode) form" + (f", here {idna!r}" if idna else ""))
    name = host.removesuffix(".")  # a fully qualified name may end in a dot
    labels = name.split(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels):
        if all(re.fullmatch(r"[A-Za-z0-9_-]+", label) for label in labels):
            return (f"the host {host[:64]!r} has a label of over 63 characters (a DNS "
                    "name's most)")
        return (f"expected an IP address or a DNS name (ASCII letters, digits, '-', '_', "
                f"between dots; nothing escaped), got the host {host[:64]!r}")
    if len(name) > 253:
        return f"the host is {len(name)} characters long: a DNS name has at most 253"
    if labels[-1].isdigit():  # no top-level domain is all digits: an IPv4 address
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"expected an IPv4 address (four numbers 0 to 255), got {host!r}"
    return None


# The most a price may be, USD per 1,000 tokens (a dollar a token, over a thousand times
# the dearest hosted model's): past it, the worst case of ordinary requests is more
# nano-USD than the ledgers keep exact (2**53), and every request would be refused.
MAX_PRICE_PER_1K = Decimal(1000)
# The most decimal places a price may have (exact, past Decimal's 28 digits). Past a
# bound, a price's exact ratio grows with its digits (`1e-3000000` took 0.8 s a request
# to price: review).
PRICE_DECIMALS = 40


def _trimmed(v: Decimal) -> Decimal:
    """A price without the trailing zeros of its fraction (`1.50…0` priced slowly by
    its digits), as written otherwise (100 stays 100)."""
    sign, digits, exp = v.as_tuple()
    if not isinstance(exp, int) or exp >= 0:
        return v
    text = "".join(map(str, digits))
    drop = min(len(text) - len(text.rstrip("0")), -exp, len(text) - 1)
    # Exactly (not Decimal.normalize, which rounds to 28 digits).
    return Decimal((sign, tuple(digits[:len(digits) - drop]), exp + drop))


PriceUsd = Annotated[Decimal, BeforeValidator(plain_amount), AfterValidator(_trimmed)]


class Price(_Strict):
    """USD per 1,000 tokens. Decimal: money is never a float here."""

    input: PriceUsd = Field(default=Decimal(0), ge=0, le=MAX_PRICE_PER_1K,
                            decimal_places=PRICE_DECIMALS)
    output: PriceUsd = Field(default=Decimal(0), ge=0, le=MAX_PRICE_PER_1K,
                             decimal_places=PRICE_DECIMALS)


# The fingerprint of no secret at all: what `sha256sum` gives for an unset variable.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
UNSET_FINGERPRINT = ("the SHA-256 of an empty secret (was the variable holding it unset?): "
                     "no request can use it")

# Envoy's timeouts: a millisecond at the least (a shorter one rendered as 0s, which is
# no limit at all: review), a year at the most (past it Envoy refuses the duration).
MIN_TIMEOUT_S = 0.001
MAX_TIMEOUT_S = 365 * 86400.0
# The shortest wait for an ext_authz / ext_proc answer (authz/services/stalls.py notes
# stalls as short as it).
MIN_DECISION_TIMEOUT_MS = 10
# The largest request body or streamed event: the services' gRPC message limit is twice
# it and a MiB more, under gRPC's 2 GiB.
MAX_BODY_BYTES = 1023 << 20

# The largest config file read (a config of 50,000 keys is ~8 MiB).
MAX_CONFIG_BYTES = 16 << 20

# A model's cap on completion tokens per sequence when its config sets none.
DEFAULT_MAX_TOKENS = 1024


class Model(_Strict):
    """An alias that clients send as `model`, and where it goes.

    The fields after `max_tokens` shape the budget hold, a true upper bound of what one
    request can use (the formula is in `policy.tokens`); their defaults are safe for the
    chat templates of common open models.
    """

    upstream_model: str = Field(min_length=1, max_length=512)
    # `[]`: no backend. `tokenbooth up` serves such a model from its simulator; anywhere
    # else (no `--default-upstream`) its requests get 503 service_unavailable.
    backends: list[Backend]
    # The PEM file of the CAs that sign its https backends' certificates, as Envoy reads
    # it (default: the system bundle, SYSTEM_CA_BUNDLE): a private CA's, or a self-signed
    # backend's own certificate.
    backend_ca_file: Path | None = None
    price_per_1k_tokens: Price = Price()
    # Completion tokens per sequence: the most a client may ask for, and what is written
    # into the upstream body when the client asks for no limit.
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1, le=MAX_EXACT, strict=True)
    # The most sequences one request may ask for (`n`, `best_of`); more is a 400.
    max_n: int = Field(default=16, ge=1, le=128, strict=True)
    # The backend's context length (vLLM's --max-model-len), when known: vLLM refuses
    # longer prompts, so it caps each prompt's bound. Never set it below the backend's.
    max_model_len: int | None = Field(default=None, ge=1, strict=True)
    # Tokens a chat template adds per message (role header, end of turn) and once per
    # request (BOS, a default system prompt, a tool-use preamble, the generation prompt).
    chat_template_tokens_per_message: int = Field(default=16, ge=0, strict=True)
    chat_template_tokens_per_request: int = Field(default=512, ge=0, strict=True)
    # The widest indent the template renders JSON with (`tools | tojson(indent=4)` in
    # Llama 3.1's); JSON-valued fields are bounded by their rendering at that indent.
    chat_template_json_indent: int = Field(default=4, ge=0, le=16, strict=True)
    # Special tokens the backend adds to each /v1/completions prompt (BOS, EOS, the
    # fill-in-the-middle markers of `suffix`).
    special_tokens_per_prompt: int = Field(default=8, ge=0, strict=True)
    # Prompt tokens a byte of text may become, at most: 1 for the tokenizers of common
    # models (a byte-level BPE, or a character tokenizer with byte fallback, after an NFC
    # or NFKC normalizer or lower case: measured at the widest). 3 for one that
    # decomposes first (NFD / NFKD: a Hangul syllable's 3 bytes become 9); 2 for one
    # whose pre-tokenizer prefixes every split (Digits then Metaspace / ByteLevel).
    prompt_tokens_per_byte: int = Field(default=1, ge=1, le=8, strict=True)
    # Prompt tokens one image / audio clip / video adds, placeholders included. Their
    # bytes do not bound their tokens: a part of a kind with no setting is a 400.
    tokens_per_image: int | None = Field(default=None, ge=1, strict=True)
    tokens_per_audio: int | None = Field(default=None, ge=1, strict=True)
    tokens_per_video: int | None = Field(default=None, ge=1, strict=True)
    # vLLM's `stream_interval` (tokens per streamed chunk after the first): > 1 is written
    # into chat and completions streams, and a client's own value is capped at it. The
    # gateway's CPU per streamed token falls about N-fold; a stream cut short is charged
    # N tokens a chunk. Leave 1 for backends that are not vLLM (they refuse the field).
    stream_interval: int = Field(default=1, ge=1, le=256, strict=True)
    # A request cut before its usage (a stream the client left) has its prompt counted by
    # the backend's /tokenize, which renders chat as vLLM's chat completions do for the
    # common renderers. `false`: charge such a prompt its bound instead, for a backend
    # whose /tokenize counts less than its generation reads (a Kimi K3 served under a
    # name without `kimi-k3`; a server that is not vLLM).
    prompt_recount: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_cap_in_context(cls, data: Any) -> Any:
        """No `max_tokens` and a context under the default cap (an embedding model's 512,
        say): the cap is what the context leaves a one-token prompt, not a 1024 that the
        check below would refuse for a field nobody set."""
        if isinstance(data, dict) and "max_tokens" not in data:
            ctx = data.get("max_model_len")
            if type(ctx) is int and 1 < ctx <= DEFAULT_MAX_TOKENS:
                return {**data, "max_tokens": ctx - 1}
        return data

    @model_validator(mode="after")
    def _cap_fits_context(self) -> Model:
        if self.max_model_len is not None and self.max_tokens >= self.max_model_len:
            raise ValueError("max_tokens must be below max_model_len")
        return self

    @model_validator(mode="after")
    def _ca_for_https(self) -> Model:
        if self.backend_ca_file is None:
            return self
        if not self.backend_ca_file.is_absolute():
            raise ValueError("backend_ca_file must be an absolute path (Envoy reads it "
                             f"from its own working directory): {self.backend_ca_file}")
        if not any(b.tls for b in self.backends):
            raise ValueError("backend_ca_file is for https:// backends; this model has none")
        return self

    @field_validator("backends")
    @classmethod
    def _one_scheme(cls, v: list[Backend]) -> list[Backend]:
        # The backends form one Envoy cluster: TLS or not, for all of them.
        if len({b.tls for b in v}) > 1:
            raise ValueError("all backends of a model use http://, or all use https://")
        seen: dict[tuple[str, str, int], str] = {}
        for b in v:  # `http://h:80` and `http://H` are one endpoint
            if b.endpoint in seen:
                first = seen[b.endpoint]
                twice = (f"{backend_shown(b.url)} is listed twice" if first == b.url else
                         f"{backend_shown(first)} and {backend_shown(b.url)} are one backend")
                raise ValueError(f"{twice}: list it once, with a weight")
            seen[b.endpoint] = b.url
        # Envoy injects the key per cluster (one per model): one key source for all.
        if len({b.credential for b in v}) > 1:
            raise ValueError("all backends of a model use the same api_key_env / "
                             "api_key_file (or none)")
        return v


class Tls(_Strict):
    cert: Path
    key: Path


class Services(_Strict):
    """Where the tokenbooth gRPC services and the HTTP side port listen."""

    grpc_listen: HostPort = "127.0.0.1:9001"
    http_listen: HostPort = "127.0.0.1:9090"


# What a hold's lease adds to the longest its response may last.
HOLD_LEASE_SLACK_S = 30.0
# Envoy's timers fire at or after their time; ext_proc sees the close a little later.
CUT_TOLERANCE_S = 0.05


# The least `envoy.max_heap_bytes` may be: Envoy alone (clusters, listeners, stats)
# takes tens of MiB of heap before its first request.
MIN_ENVOY_HEAP_BYTES = 64 << 20
# A backend's answer that is not a stream, up to this many bytes (known from its
# content-length), reaches ext_proc whole: one gRPC message where it took two. At most
# half of Envoy's default buffer limit for a connection (1 MiB), past which it refuses.
WHOLE_ANSWER_BYTES = 256 << 10
MAX_WHOLE_ANSWER_BYTES = 512 << 10

# A browser origin as it sends it in `Origin`: scheme, host, optional port, nothing else.
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


class EnvoySettings(_Strict):
    admin_listen: HostPort = "127.0.0.1:9901"
    # Where Envoy reaches the services when that is not services.grpc_listen (wildcards
    # through loopback), e.g. a headless Kubernetes Service in front of several replicas.
    services_address: HostPort | None = None
    # Or several replicas by address, one endpoint each (not both forms).
    services_addresses: tuple[HostPort, ...] = ()
    # A non-streaming response: the whole response, from the end of the request.
    route_timeout_s: float = Field(default=120.0, ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S)
    # A stream: cut after this long with no byte either way (default: route_timeout_s)...
    stream_idle_timeout_s: float | None = Field(default=None, ge=MIN_TIMEOUT_S,
                                                le=MAX_TIMEOUT_S)
    # ...or this long in all. Every hold's lease outlasts it, so it is always bounded.
    max_stream_duration_s: float = Field(default=600.0, ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S)
    # How long Envoy waits for one ext_authz / ext_proc answer.
    decision_timeout_ms: int = Field(default=2000, ge=MIN_DECISION_TIMEOUT_MS,
                                     le=int(MAX_TIMEOUT_S * 1000))
    # When ext_proc (the metering) goes away mid-response: `serve` the rest unmetered, or
    # `cut` the stream. Either way the lost-hold sweep writes the request's record.
    on_metering_loss: Literal["serve", "cut"] = "serve"
    # A streamed event larger than this is passed through as it arrives, unread: counted
    # (its bytes estimate the usage if the stream has no usage chunk), never buffered.
    max_event_bytes: int = Field(default=MAX_EVENT_BYTES, ge=4096, le=MAX_BODY_BYTES)
    # Who reads a chat or completions stream: `ext_proc` (every chunk a message to the
    # services, which settle before the client sees the stream end), `envoy` (a Lua meter
    # in Envoy reads the chunks and strips the usage chunk; the services get one report
    # per stream through Envoy's gRPC access log, after the stream ended: see the README,
    # "Streams metered in Envoy"), or `auto`: envoy where Envoy reaches one services
    # replica (the report must reach the replica that waits for it) and on_metering_loss
    # is `serve`, else ext_proc.
    stream_metering: Literal["auto", "envoy", "ext_proc"] = "ext_proc"
    # A backend's answer that is not a stream, of a known length up to this, is held in
    # Envoy until its end and reaches ext_proc in one message (its bytes and their end),
    # not two: a gRPC round trip less per JSON request. 0: every answer as it comes.
    whole_answer_bytes: int = Field(default=WHOLE_ANSWER_BYTES, ge=0,
                                    le=MAX_WHOLE_ANSWER_BYTES, strict=True)
    # Browser origins that may call the API (CORS): exact `scheme://host[:port]` origins,
    # or "*" for any. Empty: no CORS (a preflight needs a key, so browsers cannot call).
    cors_allow_origins: tuple[str, ...] = ()
    # A bound on Envoy's heap, in bytes (about 80 % of its container's memory limit):
    # Envoy's fixed-heap monitor then shrinks the heap at 90 %, resets the streams that
    # hold the most memory from 95 % and answers new requests 503 at 98 %, rather than
    # being OOM-killed with every stream in flight (authz/envoy_config/bootstrap.py).
    # Unset: no memory bound (only connections are capped).
    max_heap_bytes: int | None = None

    @field_validator("max_heap_bytes")
    @classmethod
    def _heap(cls, v: int | None) -> int | None:
        if v is not None and v < MIN_ENVOY_HEAP_BYTES:
            raise ValueError(
                f"{v} is below {MIN_ENVOY_HEAP_BYTES} bytes ({MIN_ENVOY_HEAP_BYTES >> 20} "
                "MiB): Envoy uses tens of MiB before any request, so with less every "
                "request would be refused as overload; give ~80 % of the container's memory "
                "limit")
        return v

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for origin in v:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin: scheme://host[:port], with "
                                 "no path (or \"*\" for any)")
        return v

    @model_validator(mode="after")
    def _one_services_form(self) -> EnvoySettings:
        if self.services_address is not None and self.services_addresses:
            raise ValueError("set services_address or services_addresses, not both")
        if len(set(self.services_addresses)) != len(self.services_addresses):
            raise ValueError("services_addresses lists an address twice")
        if self.stream_metering == "envoy" and self.on_metering_loss == "cut":
            # `cut` ends a stream when the services go away mid-response: only a stream
            # the services read to its end can be cut that way.
            raise ValueError("on_metering_loss: cut needs stream_metering: ext_proc")
        if self.stream_metering == "envoy" and self._several_replicas:
            # A stream's report (Envoy's access log) must reach the replica that waits
            # for it: one services endpoint per Envoy (embedded, sidecar).
            raise ValueError("stream_metering: envoy needs Envoy to reach one services "
                             "replica (services.grpc_listen, or one services_addresses "
                             "entry); with several, keep stream_metering: ext_proc")
        return self

    @property
    def _several_replicas(self) -> bool:
        """Envoy may reach more than one replica (a DNS name may give several)."""
        return self.services_address is not None or len(self.services_addresses) > 1

    @property
    def meters_streams(self) -> bool:
        """Envoy meters chat and completions streams (see `stream_metering`)."""
        return self.stream_metering == "envoy" or (
            self.stream_metering == "auto" and not self._several_replicas
            and self.on_metering_loss == "serve")

    @property
    def stream_idle_s(self) -> float:
        """A stream's idle timeout."""
        return self.stream_idle_timeout_s or self.route_timeout_s

    def idle_s(self, stream: bool) -> float:
        """Envoy's idle timeout for a response. A non-streaming one is silent until it
        is whole: its idle timer (running from the end of the request, before ext_proc's
        answer) must not fire before its route timeout (from that answer), which gives
        the OpenAI-shaped 504; it still bounds a client that stops reading."""
        if stream:
            return self.stream_idle_s
        return self.route_timeout_s + self.decision_timeout_ms / 1000 + 1

    def response_limit_s(self, stream: bool) -> float:
        """The longest a response may last, from the end of its request."""
        return self.max_stream_duration_s if stream else self.route_timeout_s

    def hold_lease_s(self, stream: bool) -> float:
        """A hold's lease: longer than its request can last (the slack covers the
        request phase before Envoy's timers start, and the settlement)."""
        return self.response_limit_s(stream) + HOLD_LEASE_SLACK_S

    def ended_by_gateway(self, stream: bool, idle_s: float, elapsed_s: float) -> bool:
        """Whether a response that ended early was cut by Envoy's timeouts, not by the
        client: silent for its idle timeout, or as old as its limit. ext_proc sees the
        same close either way; only the timings tell them apart."""
        return (idle_s >= self.idle_s(stream) - CUT_TOLERANCE_S
                or elapsed_s >= self.response_limit_s(stream) - CUT_TOLERANCE_S)


class KeyStoreSettings(_Strict):
    """Where keys beyond the static `keys:` list come from, and how they are cached."""

    # Set to use an external validation service (the user-org-service protocol)
    # instead of tokenbooth's own keyring / Redis keys.
    validation_url: str | None = None
    positive_ttl_s: float = Field(default=1.0, gt=0)
    negative_ttl_s: float = Field(default=1.0, gt=0)
    timeout_s: float = Field(default=0.5, gt=0, le=10)
    # How long keys checked before a store outage keep working during it.
    grace_s: float = Field(default=300.0, ge=0)

    @field_validator("validation_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("http", "https"):
            raise ValueError(f"expected an http(s):// URL, got {origin(v)!r}")
        return v.rstrip("/") if v else v


OnError = Literal["fail_closed", "fail_open"]


class OnStoreError(_Strict):
    """What a limit does while its shared store (Redis) is unreachable.

    fail_closed: a fast 503. fail_open: admit under a local per-replica limiter
    with the same numbers. Budgets always fail closed: admitting unmetered spend
    would let the recorded spend pass the budget.
    """

    requests: OnError = "fail_closed"
    tokens: OnError = "fail_closed"
    concurrency: OnError = "fail_closed"


class OrgLimits(_Strict):
    """Limits shared by every key of one org (checked before the key's own)."""

    rpm: Count | None = None
    tpm: Count | None = None
    max_concurrent: Count | None = None
    budget_usd: BudgetUsd | None = None
    budget_period: Literal["day", "month", "total"] = "month"


class AdminToken(_Strict):
    """One admin API token, stored as the SHA-256 fingerprint of its secret."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Literal["read", "admin"] = "read"

    @field_validator("sha256")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if v == EMPTY_SHA256:
            raise ValueError(UNSET_FINGERPRINT)
        return v


class AdminSettings(_Strict):
    """The HTTP admin API (keys, orgs, spend, usage). It is served only when some token
    is configured here or by $TOKENBOOTH_ADMIN_TOKEN; keep it off the public path."""

    listen: HostPort = "127.0.0.1:9092"
    tokens: tuple[AdminToken, ...] = ()

    @field_validator("tokens")
    @classmethod
    def _distinct(cls, v: tuple[AdminToken, ...]) -> tuple[AdminToken, ...]:
        """One secret is one token: two entries with one fingerprint would give it two
        names (the audit log's) and, with two roles, an ambiguous one."""
        names: set[str] = set()
        secrets: dict[str, str] = {}
        for t in v:
            if t.name in names:
                raise ValueError(f"duplicate admin token name {t.name!r}")
            names.add(t.name)
            if t.sha256 in secrets:
                raise ValueError(f"admin token {t.name!r} has the same secret as "
                                 f"{secrets[t.sha256]!r}")
            secrets[t.sha256] = t.name
        return v


class LimitSettings(_Strict):
    on_store_error: OnStoreError = OnStoreError()
    # A cut stream is charged what its backend could generate in each pause of this
    # long or more between its chunks (policy/stream_pace.py): vLLM generates on while
    # its reader lags, so the chunks seen no longer count what it generated.
    stalled_stream_s: float = Field(default=2.0, gt=0, le=3600)
    # And what its backend generates from the cut to its abort, in steps (tokens) for each
    # choice running, plus a chunk's steps past one with a `stream_interval`
    # (policy/stream_pace.py, ABORT_STEPS).
    abort_lag_steps: int = Field(default=ABORT_STEPS, ge=0, le=1_000_000)


class MetricsSettings(_Strict):
    # Spend and tokens by key (tokenbooth_key_cost_usd_total{org,key_id}, …): one series
    # per key, so off by default.
    key_labels: bool = False


class AlertSettings(_Strict):
    """Budget alerts: a webhook called once per threshold and budget period when a key's
    or an org's spend reaches that fraction of its budget. The signing secret comes from
    the environment (TOKENBOOTH_WEBHOOK_SECRET), never from this file."""

    webhook_url: str | None = None  # None: no alerts
    thresholds: tuple[Decimal, ...] = (Decimal("0.5"), Decimal("0.8"), Decimal("1"))
    check_interval_s: float = Field(default=5.0, gt=0, le=3600)  # owners with new records
    rescan_s: float = Field(default=60.0, gt=0, le=86400)  # every owner with a budget
    timeout_s: float = Field(default=5.0, gt=0, le=60)  # one delivery attempt
    max_attempts: int = Field(default=8, ge=1, le=100)  # with backoff 1 s, 2 s, … 60 s
    # Also a budget's first refusal of a request in a period, for what is left
    # (`budget.request_refused`): spend alone seldom reaches the whole budget.
    on_refusal: bool = True

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        parts = urlsplit(v) if v is not None else None
        if parts is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(f"expected an http(s):// URL, got {origin(v or '')!r}")
        if parts is not None:
            try:
                parts.port  # noqa: B018 - read to be checked (`:abc`, `:99999`)
            except ValueError:
                raise ValueError("expected an http(s):// URL whose port is a number from "
                                 "1 to 65535") from None
        return v

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: tuple[Decimal, ...]) -> tuple[Decimal, ...]:
        if not v or any(not Decimal(0) < t <= Decimal(1) for t in v):
            raise ValueError("expected fractions of the budget, each above 0 and at most 1")
        return tuple(sorted(set(v)))


class UsageSettings(_Strict):
    """Where usage records go beyond the request path (README "Usage records at volume").

    With `state: redis://`, the stream `tb:{usage}` is a delivery queue, trimmed by
    `trim`: `acked` drops what every consumer group (the exporter's when `sink` is set,
    and `consumer_groups`) has acknowledged; `retention` drops only by age. Either way
    nothing older than `retention_s` stays (None: no age limit, only with `acked` and
    a group). `sink`: a postgresql:// URL, the ledger of record, filled by
    `tokenbooth usage export` (its password from $PGPASSWORD, not this file).
    `state: memory` keeps the JSON-lines log, rotated at `local_max_bytes`."""

    sink: str | None = None
    trim: Literal["acked", "retention"] = "acked"
    retention_s: float | None = Field(default=7 * 86400.0, gt=0)
    consumer_groups: tuple[str, ...] = ()
    # How long a delivered record's dedup key lives: the spool's redelivery horizon (a
    # crashed replica redelivers its last half second when it restarts). A later
    # duplicate is dropped by every reader (request_id), and by the sink's unique key.
    dedup_ttl_s: float = Field(default=600.0, ge=0)
    trim_every_s: float = Field(default=10.0, gt=0, le=3600)
    local_max_bytes: int = Field(default=256 << 20, ge=1 << 16)

    @field_validator("sink")
    @classmethod
    def _sink(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("postgres", "postgresql"):
            raise ValueError("expected a postgresql://user@host:port/db URL")
        return v

    @field_validator("consumer_groups")
    @classmethod
    def _groups(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", g) for g in v):
            raise ValueError("expected group names of letters, digits and _.:-")
        return tuple(dict.fromkeys(v))

    @model_validator(mode="after")
    def _bounded(self) -> UsageSettings:
        if self.retention_s is None and (self.trim == "retention" or not (
                self.sink or self.consumer_groups)):
            raise ValueError("retention_s: null leaves the Redis stream unbounded; it "
                             "needs trim: acked and a sink or consumer_groups")
        return self


def _yaml_kind(value: object) -> str:
    """What YAML made of a scalar that is not a string, in YAML's words."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, date):
        return f"the date {value.isoformat()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    return f"a {type(value).__name__}"


class Config(_Strict):
    listen: HostPort = "127.0.0.1:8080"
    tls: Tls | None = None
    state: str = "memory"
    data_dir: Path = Path(".tokenbooth")
    max_request_body_bytes: int = Field(default=1 << 20, ge=1024, le=MAX_BODY_BYTES)
    services: Services = Services()
    envoy: EnvoySettings = EnvoySettings()
    models: dict[str, Model] = Field(min_length=1)
    keys: list[KeyRecord] = []
    key_store: KeyStoreSettings = KeyStoreSettings()
    limits: LimitSettings = LimitSettings()
    orgs: dict[OrgName, OrgLimits] = {}
    metrics: MetricsSettings = MetricsSettings()
    alerts: AlertSettings = AlertSettings()
    admin: AdminSettings = AdminSettings()
    usage: UsageSettings = UsageSettings()

    @field_validator("models", "orgs", mode="before")
    @classmethod
    def _names_are_text(cls, v: Any, info: ValidationInfo) -> Any:
        """An unquoted `yes:`, `null:` or `2024-01-01:` is a boolean, None or a date to
        YAML: said as the name it was meant to be, not as pydantic's `models.None`."""
        if not isinstance(v, dict) or all(isinstance(k, str) for k in v):
            return v
        section = info.field_name or ""
        texts = ((info.context or {}).get("key_texts") or {}).get(section) or {}
        what = "alias" if section == "models" else "org name"
        problems = []
        for key in v:
            if isinstance(key, str):
                continue
            text, line = texts.get(key, (None, None))
            written = (f"the {what} {text!r} (line {line})" if text
                       else f"an empty {what}" if text == "" else f"an {what}")
            problems.append(f"{section}: {written} reads in YAML as {_yaml_kind(key)}, not "
                            "as a name: quote it" + (f" ('{text}':)" if text else ""))
        raise PydanticCustomError("key_type", "{summary}",
                                  {"summary": "; ".join(problems), "problems": problems})

    @field_validator("models")
    @classmethod
    def _aliases(cls, v: dict[str, Model]) -> dict[str, Model]:
        # What clients send as "model", printed in records and tables: "" routed a
        # request without a model name, a newline broke `tokenbooth usage`'s table, and
        # "llama " or an NFD "café" were a second model that reads as the first.
        for alias in v:
            # (and full-width or other compatibility forms of another alias: they print
            # as its plain letters, two models alike)
            problem = lookalike_problem(alias) or twin_problem(alias, v, "alias")
            if problem:
                raise ValueError(f"{alias!a} is not a model alias: {problem}")
        return v

    @field_validator("state")
    @classmethod
    def _state(cls, v: str) -> str:
        if v != "memory" and not re.match(r"^rediss?://", v):
            raise ValueError("expected 'memory' or a redis://host:port/db URL")
        if v != "memory":
            parts = urlsplit(v)
            db = parts.path.strip("/")
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ValueError(f"bad port in {redacted(v)!r}") from None
            if not parts.hostname or (db and not (db.isdigit() and int(db) < 2**31)):
                raise ValueError(f"expected redis://host:port/db with a database number, "
                                 f"got {redacted(v)!r}")
            if parts.query or parts.fragment:
                # Two clients read this URL (the limits' own and redis-py): a `?db=` or
                # `?password=` only one of them honours split the state across two
                # databases (ledgers in one, records in the other) or left one unable
                # to log in.
                raise ValueError(
                    f"the Redis URL takes no query string ({redacted(v)!r}): put the "
                    "database in its path (redis://host:port/3) and a user and password "
                    "before the host (redis://user:password@host:port/0, or "
                    "TOKENBOOTH_REDIS_PASSWORD)")
        return v

    @property
    def whole_answer_limit(self) -> int:
        """The largest answer Envoy holds whole (envoy.whole_answer_bytes): below the
        request body limit too, which Envoy also takes as the stream's buffer limit (a
        100 KB answer past a 4 KiB body limit's was a plain-text 500, charged nothing)."""
        return min(self.envoy.whole_answer_bytes, self.max_request_body_bytes)

    @property
    def state_is_redis(self) -> bool:
        """True for `state: redis://…` or `rediss://…`; else memory and local files."""
        return self.state.startswith(("redis://", "rediss://"))

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        """Checks across sections, once every field is valid; all problems at once."""
        problems: list[str] = []
        seen: set[str] = set()
        secrets: dict[str, str] = {}
        for i, key in enumerate(self.keys):
            if key.id in seen:
                problems.append(f"keys[{i}].id: duplicate key id {key.id!r}")
            seen.add(key.id)
            if key.sha256 == EMPTY_SHA256:
                problems.append(f"keys[{i}].sha256: {UNSET_FINGERPRINT}")
            if key.sha256 in secrets:  # one secret, two identities
                problems.append(f"keys[{i}].sha256: the same secret as key "
                                f"{secrets[key.sha256]!r}")
            secrets.setdefault(key.sha256, key.id)
            unknown = sorted(set(key.models) - set(self.models))
            if unknown:
                problems.append(f"keys[{i}].models: key {key.id!r} allows unknown model(s) "
                                f"{unknown}")
        for j, token in enumerate(self.admin.tokens):
            if token.sha256 in secrets:  # a client's key would be an admin's token too
                problems.append(f"admin.tokens[{j}].sha256: the secret of API key "
                                f"{secrets[token.sha256]!r}: an admin token must be a "
                                "secret of its own")
        problems += port_clashes(self)
        if self.usage.sink and not self.state_is_redis:
            problems.append("usage.sink: the exporter reads the Redis usage stream; it needs "
                            "state: redis://… (state: memory keeps usage.jsonl in data_dir)")
        if problems:
            raise PydanticCustomError("cross_check", "{summary}",
                                      {"summary": "; ".join(problems), "problems": problems})
        return self


def price_warnings(cfg: Config) -> list[str]:
    """One line per model whose price leaves input or output tokens unset: they cost $0,
    valid for a free model, but more often a price forgotten. An explicit 0 is said."""
    out = []
    for alias, model in cfg.models.items():
        price = model.price_per_1k_tokens
        unset = [side for side in ("input", "output")
                 if "price_per_1k_tokens" not in model.model_fields_set
                 or side not in price.model_fields_set]
        if unset:
            where = "" if len(unset) == 2 else f".{unset[0]}"
            out.append(f"models.{alias}.price_per_1k_tokens{where}: not set, so its "
                       f"{' and '.join(unset)} tokens cost $0 (write 0 for a free model)")
    return out


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def _hosts_overlap(a: str, b: str) -> bool:
    """Whether listeners on `a` and `b` with one port collide (a wildcard takes them all)."""
    if a == b or a in _WILDCARD_HOSTS or b in _WILDCARD_HOSTS:
        return True
    return "localhost" in (a, b) and {a, b} <= _LOOPBACK_HOSTS


_LISTENERS: Final = ("listen", "services.grpc_listen", "services.http_listen",
                     "envoy.admin_listen", "admin.listen")
_SECTIONS: Final[dict[str, type[BaseModel]]] = {
    "services": Services, "envoy": EnvoySettings, "admin": AdminSettings}


def port_clashes(cfg: Config) -> list[str]:
    """`path: message` for each of the five listeners that takes a port an earlier one
    has on an overlapping host (port 0, any free port, never clashes)."""
    named = [(path, getattr(getattr(cfg, path.split(".")[0]), path.split(".")[1])
              if "." in path else getattr(cfg, path)) for path in _LISTENERS]
    return _clashes(named)


def _raw_port_clashes(data: dict[str, Any]) -> list[str]:
    """`port_clashes` of a config that did not validate, from its raw listeners (each
    valid one, or its default): the clashes are said with the other errors, not after
    they are fixed (newcomer tester). Listeners that are themselves errors are left out."""
    named = []
    for path in _LISTENERS:
        section, _, name = path.rpartition(".")
        model: type[BaseModel] = _SECTIONS[section] if section else Config
        raw = data.get(section) if section else data
        value = raw.get(name) if isinstance(raw, dict) else None
        if value is None:
            value = model.model_fields[name].default
        try:
            parse_hostport(value)
        except (ValueError, TypeError):
            continue
        named.append((path, value))
    return _clashes(named)


def _raw_key_clashes(data: dict[str, Any]) -> list[str]:
    """The cross checks' duplicate key ids and secrets, from the raw `keys:` list."""
    keys = data.get("keys")
    if not isinstance(keys, list):
        return []
    problems: list[str] = []
    ids: set[str] = set()
    secrets: dict[str, str] = {}
    for i, key in enumerate(keys):
        if not isinstance(key, dict):
            continue
        key_id, sha = key.get("id"), key.get("sha256")
        if isinstance(key_id, str):
            if key_id in ids:
                problems.append(f"keys[{i}].id: duplicate key id {key_id!r}")
            ids.add(key_id)
        if isinstance(sha, str) and isinstance(key_id, str):
            if sha in secrets:
                problems.append(f"keys[{i}].sha256: the same secret as key {secrets[sha]!r}")
            secrets.setdefault(sha, key_id)
    return problems


def _clashes(named: list[tuple[str, str]]) -> list[str]:
    problems = []
    for i, (path, value) in enumerate(named):
        host, port = parse_hostport(value)
        for other_path, other in named[:i]:
            other_host, other_port = parse_hostport(other)
            if port and port == other_port and _hosts_overlap(host, other_host):
                problems.append(f"{path}: {value} clashes with {other_path} ({other})")
                break
    return problems


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _problems(e: ValidationError, source: str) -> list[str]:
    """One `source: path: message` line per error (cross checks carry several)."""
    return [line for err in e.errors() for line in _error_lines(err, source)]


def _error_lines(err: Any, source: str) -> list[str]:
    ctx = err.get("ctx") or {}
    if "problems" in ctx:  # the cross checks, the names YAML read as no string
        return [f"{source}: {p}" for p in ctx["problems"]]
    msg = str(err["msg"]).removeprefix("Value error, ")
    given = err.get("input")
    if err["type"] in ("int_type", "float_type", "int_parsing", "float_parsing") \
            and isinstance(given, str):
        # A number as YAML 1.1 also writes it (`1_000`, `0x1A`, `1:30`) is text here.
        msg += f", got {given[:40]!r} (write plain digits)"
    elif err["type"] == "string_type" and isinstance(given, int | float):
        # `sha256: 1234`, `id: 007`: YAML read a number where text belongs.
        msg += f", got the number {given!r} (YAML reads unquoted digits so: quote it)"
    return [f"{source}: {_location(err['loc'])}: {msg}"]


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None,
                 key_texts: Mapping[str, Mapping[Any, tuple[str, int]]] | None = None,
                 ) -> Config:
    """Validate already-parsed YAML; relative paths resolve against `base_dir`.
    `key_texts`: by section, the YAML text and line of keys read as no string
    (`yaml_load.key_texts`), for the messages that refuse them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        cfg = Config.model_validate(data, context={"key_texts": key_texts or {}})
    except ValidationError as e:
        problems = _problems(e, source)
        if any(err["type"] == "key_type" for err in e.errors()):
            # A section refused for a key YAML read as no string: its entries checked too,
            # under the names they were meant to have, so that every error is said at
            # once (new-user tester: five more came once the key was quoted).
            problems += [p for p in _named_section_problems(data, key_texts or {}, source)
                         if p not in problems]
        if not any(err["type"] == "cross_check" for err in e.errors()):
            # The checks across sections run once every field is valid: those that can be
            # read from the raw file are said now (newcomer, operators testers).
            problems += [f"{source}: {line}"
                         for line in _raw_key_clashes(data) + _raw_port_clashes(data)]
        raise ConfigError(problems) from None
    if base_dir is not None:
        cfg = _resolve_paths(cfg, base_dir)
    return cfg


def _named_section_problems(data: dict[str, Any],
                            texts: Mapping[str, Mapping[Any, tuple[str, int]]],
                            source: str) -> list[str]:
    """The errors of `models` and `orgs` with every key read as the text it was written
    as (none of the cross-section checks: those wait until every field is valid)."""
    fixed = dict(data)
    for section in ("models", "orgs"):
        value = data.get(section)
        if isinstance(value, dict):
            named = texts.get(section) or {}
            fixed[section] = {(k if isinstance(k, str) else
                               (named.get(k) or (str(k), 0))[0]): v for k, v in value.items()}
    try:
        Config.model_validate(fixed, context={"key_texts": {}})
    except ValidationError as e:
        return [line for err in e.errors()
                if err["loc"] and err["loc"][0] in ("models", "orgs")
                and err["type"] != "cross_check" for line in _error_lines(err, source)]
    return []


def _resolve_paths(cfg: Config, base: Path) -> Config:
    tls = cfg.tls
    if tls is not None:
        tls = Tls(cert=base / tls.cert, key=base / tls.key)
    return cfg.model_copy(update={"data_dir": base / cfg.data_dir, "tls": tls})


def redacted(url: str) -> str:
    """A URL fit for messages and logs: any password replaced by `***` (its user part's,
    and a query string's or fragment's, which may carry one: the whole of each goes).
    Its path stays (a Redis or PostgreSQL database); a URL whose path may be a secret is
    shown by `origin`, a backend's by `backend_shown`."""
    parts = urlsplit(url)
    if parts.query:
        parts = parts._replace(query="***")
    if parts.fragment:
        parts = parts._replace(fragment="***")
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.partition(":")[0]
        parts = parts._replace(netloc=f"{user}:***@{hostport}")
    return urlunsplit(parts)


def origin(url: str) -> str:
    """A URL fit for messages when its path or user may be a secret (a webhook's path,
    a validation service's user:password): scheme, host and port only."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparseable URL)"
    return f"{parts.scheme}://{parts.hostname or ''}{port}" + ("/…" if parts.path.strip("/")
                                                              or parts.query else "")


def with_redis_password(state: str, password: str) -> str:
    """A Redis `state` URL with its password set; user name, host, port and db kept."""
    parts = urlsplit(state)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    netloc = f"{user}:{quote(password, safe='')}@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))


def _yaml_error(e: yaml.YAMLError, text: str) -> str:
    """Where the file stops being YAML. A tab in a line's indentation is said as such
    (both parsers say only that a character cannot start a token)."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return "not valid YAML"
    lines = text.split("\n")
    line = lines[mark.line] if mark.line < len(lines) else ""
    tab = line.find("\t", 0, len(line) - len(line.lstrip(" \t")))  # in the indentation
    if tab >= 0:
        return (f"line {mark.line + 1}, column {tab + 1}: a tab cannot indent YAML: "
                "indent with spaces")
    # What went wrong and where it began (operators tester: "line 5: not valid YAML" for
    # a quote left open on line 3), in words both parsers give alike (their own differ:
    # libyaml's and PyYAML's must say the same), never the file's text.
    said = f"line {mark.line + 1}: not valid YAML"
    problem = str(getattr(e, "problem", "") or "")
    for phrase, words in _YAML_PROBLEMS:
        if phrase in problem:
            said += f": {words}"
            break
    context, start = str(getattr(e, "context", "") or ""), getattr(e, "context_mark", None)
    if start is not None and context.startswith("while scanning a quoted scalar"):
        said += f" (a quote opened on line {start.line + 1} is not closed)"
        return said
    # A value's quote left open runs on to the next quote of its kind, often lines later
    # (retest: an open `"redis://…` on line 3 was reported on line 11): the first line
    # up to the error whose value opens a quote it does not close.
    opened = _unclosed_quote(lines, mark.line)
    if opened is not None:
        said += f" (a quote opened on line {opened + 1} is not closed)"
    elif start is not None and start.line != mark.line and (
            m := re.fullmatch(r"while parsing an? ([a-z ]+)", context)):
        said += f" (in the {m.group(1)} that began on line {start.line + 1})"
    return said


# A key's (or a list item's) value that begins with a quote, and the rest of its line.
_QUOTED_VALUE = re.compile(r"""( *)(?:- +)?(?:[^\s#'"][^#]*?:\s+|- +)(["'])(.*)""")
# Lines looked at for a quote left open (each costs a parse of the file).
_QUOTE_LOOKS = 20


def _closes(quote: str, text: str) -> int:
    """Where `text` closes a quoted scalar of `quote` (-1: it does not)."""
    if quote == "'":  # '' is a quote inside
        m = re.search(r"'(?!')", text.replace("''", "\0\0"))
    else:
        m = re.search(r'"', re.sub(r"\\.", "\0\0", text))
    return -1 if m is None else m.start()


def _unclosed_quote(lines: list[str], upto: int) -> int | None:
    """The first line before `upto` whose value opens a quote it does not close there,
    and which, closed at the line's end, lets the file parse past `upto`: that quote was
    left open. (A quoted value may go on over lines, and a block scalar's text may hold
    a quote: closing those moves nothing, and they are not blamed: review, retest.)"""
    looks = 0
    for i, line in enumerate(lines[:upto]):
        m = _QUOTED_VALUE.match(line)
        if m is None or _closes(m.group(2), m.group(3)) >= 0:
            continue
        looks += 1
        if looks > _QUOTE_LOOKS:
            return None
        closed = [*lines[:i], line.rstrip() + m.group(2), *lines[i + 1:]]
        reached = _parses_to("\n".join(closed))
        if reached is None or reached > upto:
            return i
    return None


def _parses_to(text: str) -> int | None:
    """The line (0-based) where `text` stops being YAML; None where it is all YAML."""
    try:
        load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        return -1 if mark is None else int(mark.line)
    except (ValueError, TypeError, RecursionError, DuplicateKey):  # its syntax read through
        return None
    return None


# The parsers' problems that have one meaning, in the gateway's words.
_YAML_PROBLEMS = (
    ("mapping values are not allowed", "': ' inside a plain value (quote the value, or "
                                       "check the indentation of the line it continues)"),
    ("undefined alias", "a value that begins with '*' reads as an alias (quote it)"),
)


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML policy file.

    `TOKENBOOTH_REDIS_PASSWORD` in `env`, when set, is the password of a Redis `state`,
    so the file never holds it. `env` is what the process settings pass on (see
    `authz.runtime.settings`); this module never reads the process environment."""
    return config_from_text(read_config_text(path), path, env)


def read_config_text(path: Path) -> str:
    """A policy file's text (ConfigError when it cannot be read as one)."""
    try:
        # Non-blocking: a FIFO (or socket) at the path would block the read for good, and
        # with it every later reload (ops tester); a regular file reads as ever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise ConfigError(f"{path}: not a regular file (a named pipe)")
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # /dev/zero, a log file by mistake: bounded
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a "
                              "tokenbooth config (keep many keys in the key store)")
        text = raw.decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return text


def config_from_text(text: str, path: Path, env: Mapping[str, str] | None = None) -> Config:
    """`text`, read from the file at `path` (relative paths in it are from its folder),
    validated: `load_config`."""
    try:
        data = load_yaml(text)
    except DuplicateKey as e:
        raise ConfigError(f"{path}: line {e.line}: {e.key!r} is given twice (the second "
                          "would silently replace the first)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {_yaml_error(e, text)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None
    except ValueError as e:  # an integer of thousands of digits (Python's own limit)
        what = ("a number is too long (over 4,300 digits)"
                if "integer string conversion" in str(e) else f"a value cannot be read: {e}")
        raise ConfigError(f"{path}: {what[:300]}") from None
    texts = {section: key_texts(text, section) for section in ("models", "orgs")
             if isinstance(data, dict) and isinstance(data.get(section), dict)
             and not all(isinstance(k, str) for k in data[section])}
    try:
        cfg = parse_config(data, str(path), path.parent.resolve(), texts)
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read") from None
    password = (env or {}).get(REDIS_PASSWORD_ENV)
    if password and cfg.state_is_redis:
        cfg = cfg.model_copy(update={"state": with_redis_password(cfg.state, password)})
    return cfg
