"""Config errors name the file, the path inside it and what is wrong."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest
from pydantic import ValidationError

from policy.config import (
    Config,
    ConfigError,
    load_config,
    parse_config,
    parse_hostport,
    price_warnings,
    redacted,
)
from policy.keys import fingerprint
from policy.stream_pace import ABORT_STEPS
from tests.helpers import SECRET, policy_dict, write_policy


def test_valid_file_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write_policy(tmp_path, "http://127.0.0.1:8000"))
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.models["demo"].price_per_1k_tokens.input == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models: {}", "models: "),
        ("models:\n  m:\n    upstream_model: x\n    backends: [{url: 'ftp://h'}]\n",
         "models.m.backends[0].url: expected http(s)"),
        ("models:\n  m:\n    upstream_model: x\n    backends: [{url: 'http://h:1'}]\n"
         "    max_tokens: 0\n", "models.m.max_tokens"),
        ("listen: nowhere\nmodels: {}\n", "listen: expected HOST:PORT"),
        ("state: mysql://x\nmodels: {}\n", "state: expected 'memory'"),
        ("bogus: 1\nmodels:\n  m:\n    upstream_model: x\n    backends: [{url: 'http://h:1'}]\n",
         "bogus: Extra inputs"),
        ("models: [\n", "line"),
        ("- a\n", "expected a mapping"),
        ("models:\n  m:\n    upstream_model: x\n    backends: [{url: 'http://h:1'}]\n"
         "keys:\n  - {id: a, org: o, sha256: " + "a" * 64 + ", models: [zz]}\n",
         "unknown model(s) ['zz']"),
        ("models:\n  m:\n    upstream_model: x\n    backends: [{url: 'http://h:1'}]\n"
         "keys:\n  - {id: a, org: o, sha256: " + "a" * 64 + ", scopes: [admin]}\n",
         "keys[0].scopes: unknown scope"),
        # A model given twice: YAML would keep the second without a word.
        ("models:\n  m:\n    upstream_model: x\n    backends: [{url: 'http://h:1'}]\n"
         "  m:\n    upstream_model: y\n    backends: [{url: 'http://h:2'}]\n",
         "line 5: 'm' is given twice"),
        # One secret, two identities.
        ("models:\n  m:\n    upstream_model: x\n    backends: [{url: 'http://h:1'}]\n"
         "keys:\n  - {id: a, org: o, sha256: " + "a" * 64 + "}\n"
         "  - {id: b, org: p, sha256: " + "a" * 64 + "}\n",
         "keys[1].sha256: the same secret as key 'a'"),
        # An org name no request header can carry.
        ("models:\n  m:\n    upstream_model: x\n    backends: [{url: 'http://h:1'}]\n"
         "keys:\n  - {id: a, org: \"a\\nb\", sha256: " + "a" * 64 + "}\n",
         "keys[0].org: String should match pattern"),
        # A price past which no request's worst case could be held (every one was a 500).
        ("models:\n  m:\n    upstream_model: x\n    backends: [{url: 'http://h:1'}]\n"
         "    price_per_1k_tokens: {input: 20000000}\n",
         "models.m.price_per_1k_tokens.input: Input should be less than or equal to 1000"),
        # One admin secret, two tokens (two names, maybe two roles).
        ("models:\n  m:\n    upstream_model: x\n    backends: [{url: 'http://h:1'}]\n"
         "admin:\n  tokens:\n    - {name: ops, sha256: " + "b" * 64 + ", role: admin}\n"
         "    - {name: dash, sha256: " + "b" * 64 + "}\n",
         "admin token 'dash' has the same secret as 'ops'"),
        ("models:\n  m:\n    upstream_model: x\n    backends: [{url: 'http://h:1'}]\n"
         "admin:\n  tokens:\n    - {name: ops, sha256: " + "b" * 64 + "}\n"
         "    - {name: ops, sha256: " + "c" * 64 + "}\n",
         "duplicate admin token name 'ops'"),
        ("state: redis://r:6379/zz\nmodels:\n  m:\n    upstream_model: x\n"
         "    backends: [{url: 'http://h:1'}]\n", "with a database number"),
        ("state: redis://:pw@r:99999/0\nmodels:\n  m:\n    upstream_model: x\n"
         "    backends: [{url: 'http://h:1'}]\n", "bad port in 'redis://:***@r:99999/0'"),
        # A query string only redis-py reads: ledgers in db 0, records in db 3 (audit:
        # drift); a password there kept the limits' client out. Refused, not shown.
        ("state: redis://r:6379/0?db=3\nmodels:\n  m:\n    upstream_model: x\n"
         "    backends: [{url: 'http://h:1'}]\n",
         "the Redis URL takes no query string ('redis://r:6379/0?***')"),
        ("state: redis://r:6379/0?password=adminpw\nmodels:\n  m:\n    upstream_model: x\n"
         "    backends: [{url: 'http://h:1'}]\n", "takes no query string"),
    ],
)
def test_errors_name_file_and_path(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(str(path))
    assert expected in str(e.value)
    assert "adminpw" not in str(e.value)


def test_a_backend_url_with_a_password_is_refused_without_showing_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  m:\n    upstream_model: x\n"
                    "    backends: [{url: 'http://vllm:s3cret-pw@h:1'}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "carries no user or password" in str(e.value) and "s3cret-pw" not in str(e.value)
    path.write_text(path.read_text().replace("h:1", "h:99999"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "s3cret-pw" not in str(e.value)


@pytest.mark.parametrize(("section", "secret"), [
    ("key_store: {validation_url: 'ftp://svc:S3CRETpw9@auth:1/v'}", "S3CRETpw9"),
    ("alerts: {webhook_url: 'htps://hooks.example/services/T0/B0/S3CRETtok'}", "S3CRETtok"),
    # A port that is no number passed check-config, then stopped `serve` (admin review).
    ("alerts: {webhook_url: 'http://u:pw@127.0.0.1:abc/S3CRETpath'}", "S3CRETpath"),
    ("alerts: {webhook_url: 'https://hooks.example:99999/S3CRETpath'}", "S3CRETpath"),
    ("models:\n  n:\n    upstream_model: x\n    backends: [{url: 'http://h:2', "
     "api_key_env: 'sk-S3CRETkey-pasted'}]", "S3CRETkey"),
])
def test_no_config_message_shows_a_credential(tmp_path: Path, section: str,
                                               secret: str) -> None:
    """A validation service's user:password, a webhook's path (Slack's carries its
    token), a key pasted where its variable's name goes: never echoed."""
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  m:\n    upstream_model: x\n"
                    "    backends: [{url: 'http://h:1'}]\n" + section.replace(
                        "models:\n", "", 1 if section.startswith("models") else 0) + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert secret not in str(e.value), e.value


@pytest.mark.parametrize("name", ["TOKENBOOTH_ADMIN_TOKEN", "tokenbooth_webhook_secret"])
def test_a_backend_key_is_never_one_of_tokenbooths_own_settings(name: str) -> None:
    """`api_key_env: TOKENBOOTH_ADMIN_TOKEN` sent the admin token to every backend."""
    with pytest.raises(ConfigError, match="tokenbooth's own settings"):
        parse_config({"models": {"m": {"upstream_model": "x", "backends": [
            {"url": "http://h:1", "api_key_env": name}]}}})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_hostport() -> None:
    assert parse_hostport("[::1]:80") == ("::1", 80)
    for bad in ("x", "x:99999", ":80", "a b:1"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


@pytest.mark.parametrize(
    ("state", "password", "expected"),
    [
        ("redis://redis:6379/0", "s3cret", "redis://:s3cret@redis:6379/0"),
        ("rediss://tb@redis.example:6380/2", "p@ss:w/rd",
         "rediss://tb:p%40ss%3Aw%2Frd@redis.example:6380/2"),
        ("redis://tb:old@redis:6379/0", "new", "redis://tb:new@redis:6379/0"),
    ],
)
def test_redis_password_from_env(tmp_path: Path, state: str, password: str,
                                 expected: str) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000", state=state)
    cfg = load_config(path, env={"TOKENBOOTH_REDIS_PASSWORD": password})
    assert cfg.state == expected
    assert load_config(path, env={}).state == state  # the file itself never holds it


def test_redis_password_leaves_memory_state_alone(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    assert load_config(path, env={"TOKENBOOTH_REDIS_PASSWORD": "x"}).state == "memory"


def test_the_process_environment_is_never_read(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI reads it into Settings and passes the password on; load_config does not look.
    monkeypatch.setenv("TOKENBOOTH_REDIS_PASSWORD", "from-the-environment")
    path = write_policy(tmp_path, "http://127.0.0.1:8000", state="redis://redis:6379/0")
    assert load_config(path).state == "redis://redis:6379/0"


@pytest.mark.parametrize(("state", "is_redis"), [
    ("memory", False), ("redis://r:6379/0", True), ("rediss://r:6380", True),
])
def test_state_is_redis(state: str, is_redis: bool) -> None:
    cfg = parse_config(policy_dict("http://127.0.0.1:8000", state=state))
    assert cfg.state_is_redis is is_redis


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://app:p%40ss@[::1]:6380", "rediss://app:***@[::1]:6380"),
    ("redis://redis:6379", "redis://redis:6379"),
    ("redis://app@redis", "redis://app@redis"),
    ("redis://r:6379/0?password=pw&db=2", "redis://r:6379/0?***"),
    ("redis://:a@r/0?x=1", "redis://:***@r/0?***"),
    ("redis://r:6379/0#pw", "redis://r:6379/0#***"),
])
def test_redacted_urls_never_show_a_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_envoy_stream_metering_needs_one_services_replica() -> None:
    """Each stream's report (Envoy's access log) must reach the replica waiting for it."""
    from policy.config import EnvoySettings

    assert EnvoySettings(stream_metering="envoy").stream_metering == "envoy"
    assert EnvoySettings(stream_metering="envoy", services_addresses=("10.0.0.1:9001",))
    for several in ({"services_address": "tokenbooth:9001"},
                    {"services_addresses": ("10.0.0.1:9001", "10.0.0.2:9001")}):
        with pytest.raises(ValueError, match="one services"):
            EnvoySettings(stream_metering="envoy", **several)


def test_auto_stream_metering_is_envoy_for_one_replica_only() -> None:
    from policy.config import EnvoySettings

    assert not EnvoySettings().meters_streams  # the default: ext_proc
    assert EnvoySettings(stream_metering="auto").meters_streams
    assert EnvoySettings(stream_metering="auto",
                         services_addresses=("10.0.0.1:9001",)).meters_streams
    assert not EnvoySettings(stream_metering="auto",
                             services_address="tokenbooth:9001").meters_streams
    assert not EnvoySettings(stream_metering="auto", on_metering_loss="cut").meters_streams
    with pytest.raises(ValueError, match="cut needs"):
        EnvoySettings(stream_metering="envoy", on_metering_loss="cut")


@pytest.mark.parametrize("origins", [("*",), ("https://app.example.com",),
                                     ("http://localhost:3000", "http://[::1]:5173")])
def test_cors_origins_are_origins(origins: tuple[str, ...]) -> None:
    from policy.config import EnvoySettings

    assert EnvoySettings(cors_allow_origins=origins).cors_allow_origins == origins


@pytest.mark.parametrize("bad", ["https://app.example.com/", "app.example.com",
                                 "https://app.example.com/chat", "ftp://x", "https://*.x.com"])
def test_cors_origins_with_a_path_or_no_scheme_are_refused(bad: str) -> None:
    from policy.config import EnvoySettings

    with pytest.raises(ValueError, match="is not an origin"):
        EnvoySettings(cors_allow_origins=(bad,))


def test_envoy_max_heap_bytes_is_unset_or_at_least_64_mib() -> None:
    from policy.config import MIN_ENVOY_HEAP_BYTES, EnvoySettings

    assert EnvoySettings().max_heap_bytes is None
    assert EnvoySettings(max_heap_bytes=MIN_ENVOY_HEAP_BYTES).max_heap_bytes == 64 << 20
    with pytest.raises(ValueError, match="below 67108864 bytes"):
        EnvoySettings(max_heap_bytes=MIN_ENVOY_HEAP_BYTES - 1)


def test_a_models_max_tokens_past_exact_counting_is_refused() -> None:
    """A cap written into every upstream body that had none: one past what the gateway
    counts exactly was accepted, then every such request was a confusing 400 (its JSON
    could not be encoded)."""
    data = policy_dict("http://127.0.0.1:8000")
    data["models"]["demo"]["max_tokens"] = 10**26
    with pytest.raises(ConfigError, match="max_tokens"):
        parse_config(data)


@pytest.mark.parametrize(("alias", "why"), [
    ("", "expected a name"), (" ", "not only whitespace"), ("a\nb", "U+000A"),
    ("tab\there", "U+0009"), ("a\u2028b", "U+2028"), ("a\x85b", "U+0085"),
    # Look-alikes (tester): each was a second model that reads as another.
    ("cafe\u0301", "composed (NFC) form"), ("llama ", "no whitespace at its start or end"),
    ("lla\u200bma", "U+200B (ZERO WIDTH SPACE)"), ("\u202ellama", "U+202E"),
])
def test_an_alias_clients_cannot_name_is_refused(alias: str, why: str) -> None:
    data = policy_dict("http://127.0.0.1:8000")
    data["models"][alias] = data["models"]["demo"]
    with pytest.raises(ConfigError, match="model alias") as e:
        parse_config(data)
    assert why in str(e.value) and ascii(alias) in str(e.value)


@pytest.mark.parametrize("alias", [
    "meta-llama/Llama-3.1-8B-Instruct", "qwen2.5:7b", "GPT-4o", "通义千问", "caf\u00e9",
    "\u0645\u06cc\u200c\u0634\u0648\u062f", "a b"])
def test_aliases_people_write_pass(alias: str) -> None:
    data = policy_dict("http://127.0.0.1:8000")
    data["models"][alias] = data["models"]["demo"]
    assert alias in parse_config(data).models


@pytest.mark.parametrize(("key", "expected"), [
    ("yes", "models: the alias 'yes' (line 2) reads in YAML as the boolean true, not as a "
            "name: quote it ('yes':)"),
    ("no", "the alias 'no' (line 2) reads in YAML as the boolean false"),
    ("null", "the alias 'null' (line 2) reads in YAML as null"),
    ("2024-01-01", "the alias '2024-01-01' (line 2) reads in YAML as the date 2024-01-01"),
    ("3", "the alias '3' (line 2) reads in YAML as the number 3"),
])
def test_an_alias_yaml_reads_as_no_string_is_said_as_written(
        tmp_path: Path, key: str, expected: str) -> None:
    """Tester: `yes:` was `models[1].[key]: Input should be a valid string`, `null:`
    was `models.None`, `2024-01-01:` was `models.datetime.date(2024, 1, 1)`."""
    path = tmp_path / "p.yaml"
    path.write_text(f"models:\n  {key}: {{upstream_model: x, backends: []}}\n"
                    "  ok: {upstream_model: y, backends: []}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"{path}: models: ")
    assert expected in e.value.problems[0]
    # Quoted, it is the alias it was meant to be.
    path.write_text(path.read_text().replace(f"{key}:", f"'{key}':"))
    assert key in load_config(path).models
    # Without the file (parse_config alone) the message still names what YAML read.
    with pytest.raises(ConfigError, match="an org name reads in YAML as the boolean true"):
        parse_config({"models": {"m": {"upstream_model": "x", "backends": []}},
                      "orgs": {True: {"rpm": 1}}})


@pytest.mark.parametrize(("url", "why"), [
    ("http://[fe80::1%25lo]:32511", "has a zone id ('%25lo'), which Envoy cannot use"),
    ("http://${VLLM_HOST}:8000", "the config does not expand them"),
    ("http://$VLLM_HOST2:8000", "the host '$VLLM_HOST2' names an environment variable"),
    ("http://a b:8000", "expected an IP address or a DNS name"),
    ("http://a%20b:8000", "got the host 'a%20b'"),
    ("http://" + "a" * 70 + ".example:8000", "a label of over 63 characters"),
    ("http://" + "a" * 60 + ("." + "a" * 60) * 4 + ":8000", "a DNS name has at most 253"),
    ("http://\u00e4.example:8000", "IDNA (punycode) form, here 'xn--4ca.example'"),
    ("http://a..b:8000", "got the host 'a..b'"),
    ("http://:8000", "no host"),
    ("http://999.1.1.1:8000", "expected an IPv4 address"),
    ("http://[127.0.0.1]:8000", "expected an IPv6 address in brackets"),
    ("http://[v1.x]:8000", "expected an IPv6 address in brackets"),
    # An empty query or fragment passed urlsplit, and `127.0.0.1:32511?` became the Host.
    ("http://127.0.0.1:32511?", "no path, query or fragment"),
    ("http://127.0.0.1:32511#", "no path, query or fragment"),
    ("http://127.0.0.1:32511/?", "no path, query or fragment"),
    ("http://127.0.0.1:0", "port 0 in 'http://127.0.0.1:0'"),  # was silently port 80
    ("http://h:abc", "bad port in 'http://h:abc'"),
])
def test_a_backend_host_envoy_cannot_use_is_refused(url: str, why: str) -> None:
    """Each passed check-config, then its alias answered 404/503 for good (tester)."""
    with pytest.raises(ConfigError) as e:
        parse_config(policy_dict(url))
    assert why in str(e.value), e.value


@pytest.mark.parametrize("url", [
    "http://vllm-0.vllm.ns.svc.cluster.local:8000", "http://vllm_backend:8000",
    "http://localhost:8000", "http://LocalHost.:8000", "http://10.0.0.1",
    "https://[2001:db8::1]:443", "http://[::1]:8000/", "http://xn--4ca.example:8000"])
def test_backend_hosts_envoy_resolves_pass(url: str) -> None:
    assert parse_config(policy_dict(url)).models["demo"].backends[0].url == url.rstrip("/")


@pytest.mark.parametrize("urls", [
    ("http://h:1", "http://h:1/"), ("http://h", "http://H:80"), ("https://h", "https://h:443"),
    ("http://[::1]:1", "http://[0::1]:1"),
    # Retest tester: a DNS name's final dot; an IPv4-mapped IPv6 address.
    ("http://h:80", "http://h."), ("http://127.0.0.1", "http://[::ffff:127.0.0.1]"),
])
def test_one_backend_written_two_ways_is_listed_twice(urls: tuple[str, str]) -> None:
    data = policy_dict("http://x:1")
    data["models"]["demo"]["backends"] = [{"url": u} for u in urls]
    with pytest.raises(ConfigError, match=r"listed twice|are one backend"):
        parse_config(data)


@pytest.mark.parametrize(("url", "shown"), [
    ("http://127.0.0.1:32511/#access_token=FRAGSECRET", "'http://127.0.0.1:32511' (path"),
    ("https://gw.example.com/k/PATHSECRET123/v1", "'https://gw.example.com' (path"),
    ("https://gw.example.com/v1?key=QUERYSECRET", "'https://gw.example.com' (path"),
    ("ftp://gw.example.com/k/PATHSECRET", "got 'ftp://gw.example.com' (path"),
    ("gw.example.com/k/PATHSECRET", "got 'gw.example.com' (path"),
    ("http://USERSECRET@h:1", "'http://h:1' (user not shown)"),
    # a password holding '/', '?' or '#' unescaped: its start is no host (review)
    ("http://user:SECRET/x@h:1", "'http://h:1' (user not shown)"),
    ("http://user:12SECRET?x@h:1", "'http://h:1' (user not shown)"),
    ("https://u:SECRET#x@h", "'https://h' (user not shown)"),
    ("http://[fe80::1%25lo]:1/PATHSECRET", "'http://[fe80::1%25lo]:1' (path"),
    ("http://h:1:2/PATHSECRET", "'http://h:1:2' (path"),
])
def test_a_backend_url_is_shown_as_its_origin_only(tmp_path: Path, url: str,
                                                   shown: str) -> None:
    """check-config echoed a fragment's or a path's token (tester): messages about a
    backend URL show scheme://host:port, and say that the rest was left out."""
    path = tmp_path / "bad.yaml"
    path.write_text(f"models:\n  m:\n    upstream_model: x\n    backends: [{{url: '{url}'}}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert shown in str(e.value) and "SECRET" not in str(e.value), e.value


def test_a_missing_price_is_a_warning_and_an_explicit_zero_is_not() -> None:
    """A price left out made a model's tokens free without a word (tester)."""
    def warnings(price: dict[str, object] | None) -> list[str]:
        model = {"upstream_model": "x", "backends": []}
        if price is not None:
            model["price_per_1k_tokens"] = price
        return price_warnings(parse_config({"models": {"m": model}}))

    assert warnings(None) == ["models.m.price_per_1k_tokens: not set, so its input and "
                              "output tokens cost $0 (write 0 for a free model)"]
    assert warnings({"input": 0.5}) == ["models.m.price_per_1k_tokens.output: not set, so "
                                        "its output tokens cost $0 (write 0 for a free model)"]
    assert warnings({"output": 1}) == ["models.m.price_per_1k_tokens.input: not set, so "
                                       "its input tokens cost $0 (write 0 for a free model)"]
    assert warnings({"input": 0, "output": 0}) == []
    assert warnings({}) == [warnings(None)[0]]


@pytest.mark.parametrize(("field", "value"), [("max_tokens", True), ("max_tokens", "5"),
                                              ("max_n", 2.0), ("stream_interval", True)])
def test_a_models_counts_are_integers_as_written(field: str, value: object) -> None:
    """`max_tokens: yes` was taken as 1, `1000.0` as 1000: counts are YAML integers."""
    data = policy_dict("http://127.0.0.1:8000")
    data["models"]["demo"][field] = value
    with pytest.raises(ConfigError, match=field):
        parse_config(data)


def test_a_context_under_the_default_cap_sets_the_cap_when_none_is_given() -> None:
    """An embedding model's `max_model_len: 512` failed ("max_tokens must be below
    max_model_len") until a meaningless max_tokens was set. Unset, the cap is what the
    context leaves; set, it is checked as ever."""
    def model(**fields: object) -> dict[str, object]:
        return {"models": {"e": {"upstream_model": "e", "backends": [], **fields}}}

    assert parse_config(model(max_model_len=512)).models["e"].max_tokens == 511
    assert parse_config(model(max_model_len=4096)).models["e"].max_tokens == 1024
    assert parse_config(model()).models["e"].max_tokens == 1024
    for fields in ({"max_model_len": 512, "max_tokens": 512}, {"max_model_len": 1}):
        with pytest.raises(ConfigError, match="max_tokens must be below max_model_len"):
            parse_config(model(**fields))


def test_a_file_past_the_size_limit_is_one_error_not_all_memory(tmp_path: Path) -> None:
    """`check-config /dev/zero` (or a log file given by mistake) read without bound: the
    machine's memory, then an internal error. Past 16 MiB: one line naming the file."""
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (16 << 20) + b"\nmodels: {}\n")
    for path in (big, Path("/dev/zero")):
        with pytest.raises(ConfigError, match="larger than 16 MiB") as e:
            load_config(path)
        assert str(path) in str(e.value)


def test_a_named_pipe_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    """Ops tester: a FIFO at the config's path blocked the read for good (check-config
    hung; under `up`, every later reload with it, and nothing was logged)."""
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file") as e:
        load_config(fifo)
    assert str(fifo) in str(e.value)


def test_the_fingerprint_of_an_empty_secret_is_refused() -> None:
    """`sha256sum` of an unset variable: a key or admin token no request can use,
    which check-config passed silently."""
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    for section in ({"keys": [{"id": "k", "org": "o", "sha256": empty}]},
                    {"admin": {"tokens": [{"name": "ops", "sha256": empty}]}}):
        with pytest.raises(ConfigError, match="empty secret"):
            parse_config({"models": {"m": {"upstream_model": "m", "backends": []}},
                          **section})


def test_the_abort_lag_is_a_limits_setting() -> None:
    assert parse_config(policy_dict("http://127.0.0.1:8000")).limits.abort_lag_steps == (
        ABORT_STEPS)
    cfg = parse_config(policy_dict("http://127.0.0.1:8000", limits={"abort_lag_steps": 40}))
    assert cfg.limits.abort_lag_steps == 40
    with pytest.raises(ConfigError, match=r"limits\.abort_lag_steps"):
        parse_config(policy_dict("http://127.0.0.1:8000", limits={"abort_lag_steps": -1}))


def test_a_backend_url_with_spaces_around_it_is_refused() -> None:
    """Retest tester: `' http://h:80'` was taken, and kept with its space."""
    for url in (" http://h:80", "http://h:80 ", "http://h:80\n"):
        with pytest.raises(ConfigError, match="spaces around it"):
            parse_config(policy_dict(url))


@pytest.mark.parametrize("twin", ["\uff4c\uff4c\uff41\uff4d\uff41", "\ufb01ne", "l\uff4cama"])
def test_an_alias_in_another_unicode_form_of_another_is_refused(twin: str) -> None:
    """Full-width letters or a ligature print as the plain alias beside it: two models
    that read as one (an earlier leftover: only the NFC form was checked)."""
    plain = unicodedata.normalize("NFKC", twin)
    data = policy_dict("http://x:1")
    demo = data["models"]["demo"]
    data["models"] = {"demo": demo, plain: dict(demo), twin: dict(demo)}
    with pytest.raises(ConfigError, match="reads as the alias"):
        parse_config(data)
    data["models"] = {"demo": demo, twin: dict(demo)}  # alone, it is a name of its own
    assert list(parse_config(data).models) == ["demo", twin]


@pytest.mark.parametrize("price", ["1_0", "\u0661", " 0.5", "0.5 ", "-0"])
def test_a_price_written_as_decimal_reads_only_plain_digits(price: str) -> None:
    """Decimal reads "1_0" as 10 and other scripts' digits: a price, like a budget, is
    ASCII digits and one point (admin tester)."""
    data = policy_dict("http://x:1")
    data["models"]["demo"]["price_per_1k_tokens"] = {"input": price, "output": "1"}
    with pytest.raises(ConfigError, match="ASCII digits"):
        parse_config(data)


def test_an_api_keys_secret_is_no_admin_token() -> None:
    """An admin token with a key's fingerprint made that key an admin (admin review)."""
    d = policy_dict("http://127.0.0.1:1")
    d["admin"] = {"tokens": [{"name": "billing", "sha256": fingerprint(SECRET),
                              "role": "admin"}]}
    with pytest.raises(ValidationError, match=r"admin\.tokens\[0\]\.sha256: the secret of"):
        Config.model_validate(d)


def test_every_error_is_said_beside_an_alias_yaml_reads_as_no_string(tmp_path: Path) -> None:
    """New-user tester: with `yes:` unquoted, the model's own errors (a backend URL with a
    path, a price written `1_000`, `max_tokens: 0`, an unknown field) came only once it
    was quoted; and `sha256: 1234` said pydantic's bare "Input should be a valid string"."""
    path = tmp_path / "p.yaml"
    path.write_text(
        "models:\n  yes:\n    upstream_model: x\n"
        "    backends: [{url: 'http://127.0.0.1:8000/v1'}]\n"
        "    price_per_1k_tokens: {input: 1_000, output: 1}\n    max_tokens: 0\n"
        "    bogus: 1\n"
        "keys:\n  - {id: k1, org: acme, sha256: 1234}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    where = [p.removeprefix(f"{path}: ").split(":")[0] for p in e.value.problems]
    assert where == ["models", "keys[0].sha256", "models.yes.backends[0].url",
                     "models.yes.price_per_1k_tokens.input", "models.yes.max_tokens",
                     "models.yes.bogus"], e.value.problems
    assert "got the number 1234 (YAML reads unquoted digits so: quote it)" in (
        e.value.problems[1])
