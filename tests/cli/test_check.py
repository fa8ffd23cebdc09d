"""`tokenbooth check-config`: every problem, one line each, naming file and path."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.cli.main import main
from tests.cli.test_cli import tb
from tests.tls import make_test_ca

KEY = "a" * 64


def check(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    r = tb("check-config", "policy.yaml", cwd=tmp_path)
    assert "Traceback" not in r.stderr
    return r.returncode, r.stderr.splitlines()


def test_every_field_error_is_listed(tmp_path: Path) -> None:
    rc, lines = check(tmp_path, (
        "listen: nowhere\n"
        "models:\n"
        "  demo: {upstream_model: x, backends: [{url: 'ftp://h'}], max_tokens: 0}\n"
        "  other: {backends: []}\n"))
    assert rc == 2
    assert lines == [
        "policy.yaml: listen: expected HOST:PORT, got 'nowhere'",
        "policy.yaml: models.demo.backends[0].url: expected http(s)://host[:port], "
        "got 'ftp://h'",
        "policy.yaml: models.demo.max_tokens: Input should be greater than or equal to 1",
        "policy.yaml: models.other.upstream_model: Field required",
    ]


def test_every_cross_check_is_listed(tmp_path: Path) -> None:
    rc, lines = check(tmp_path, (
        "models:\n"
        "  demo: {upstream_model: x, backends: [{url: 'http://h:1'}]}\n"
        "keys:\n"
        f"  - {{id: a, org: o, sha256: '{KEY}', models: [zz]}}\n"
        f"  - {{id: a, org: o, sha256: '{'b' * 64}'}}\n"))
    assert rc == 2
    assert lines == [
        "policy.yaml: keys[0].models: key 'a' allows unknown model(s) ['zz']",
        "policy.yaml: keys[1].id: duplicate key id 'a'",
    ]


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        # One port on one host.
        ("listen: 127.0.0.1:9001\n",
         ["services.grpc_listen: 127.0.0.1:9001 clashes with listen (127.0.0.1:9001)"]),
        # A wildcard overlaps every host, IPv4 or IPv6; localhost is loopback.
        ("listen: 0.0.0.0:9090\nenvoy: {admin_listen: '[::]:9001'}\n",
         ["services.http_listen: 127.0.0.1:9090 clashes with listen (0.0.0.0:9090)",
          "envoy.admin_listen: [::]:9001 clashes with services.grpc_listen (127.0.0.1:9001)"]),
        ("services: {grpc_listen: 'localhost:7000', http_listen: '[::1]:7000'}\n",
         ["services.http_listen: [::1]:7000 clashes with services.grpc_listen "
          "(localhost:7000)"]),
    ],
)
def test_port_clashes(tmp_path: Path, ports: str, expected: list[str]) -> None:
    rc, lines = check(tmp_path, ports + "models:\n  demo: {upstream_model: x, backends: []}\n")
    assert rc == 2
    assert lines == [f"policy.yaml: {e}" for e in expected]


def test_port_clashes_are_listed_with_the_other_errors(tmp_path: Path) -> None:
    """Newcomer tester: a field error hid the port clashes until it was fixed ("lists
    every error"). A listener that is itself an error is not compared."""
    rc, lines = check(tmp_path, (
        "listen: 127.0.0.1:23201\n"
        "services: {grpc_listen: 127.0.0.1:23201, http_listen: 127.0.0.1:23203}\n"
        "envoy: {admin_listen: nonsense}\n"
        "admin: {listen: 127.0.0.1:23203}\n"
        "models:\n  demo: {upstream_model: x, backends: [], max_tokens: 0}\n"))
    assert rc == 2
    assert lines[0].startswith("policy.yaml: envoy.admin_listen: ")
    assert lines[1].startswith("policy.yaml: models.demo.max_tokens: ")
    assert lines[2:] == [
        "policy.yaml: services.grpc_listen: 127.0.0.1:23201 clashes with listen "
        "(127.0.0.1:23201)",
        "policy.yaml: admin.listen: 127.0.0.1:23203 clashes with services.http_listen "
        "(127.0.0.1:23203)"]


def test_duplicate_keys_are_listed_with_the_other_errors(tmp_path: Path) -> None:
    """Operators tester: duplicate key ids and secrets went unsaid while a field had an
    error elsewhere; said only after it was fixed."""
    rc, lines = check(tmp_path, (
        "models:\n  demo: {upstream_model: x, backends: [], max_tokens: 0}\n"
        "keys:\n"
        f"  - {{id: k1, org: o, sha256: '{KEY}'}}\n"
        f"  - {{id: k1, org: o, sha256: '{'b' * 64}'}}\n"
        f"  - {{id: k2, org: o, sha256: '{KEY}', rpm: lots}}\n"))
    assert rc == 2
    assert [line.split(": ")[1] for line in lines] == [
        "models.demo.max_tokens", "keys[2].rpm", "keys[1].id", "keys[2].sha256"]
    assert lines[2:] == ["policy.yaml: keys[1].id: duplicate key id 'k1'",
                         "policy.yaml: keys[2].sha256: the same secret as key 'k1'"]


def test_distinct_hosts_and_port_zero_do_not_clash_and_no_backend_is_valid(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "listen: 127.0.0.2:9001\n"
        "services: {grpc_listen: 127.0.0.1:9001, http_listen: 127.0.0.1:0}\n"
        "envoy: {admin_listen: 127.0.0.1:0}\n"
        "models:\n  demo: {upstream_model: x, backends: [], price_per_1k_tokens: "
        "{input: 0, output: 0}}\n")
    r = tb("check-config", "policy.yaml", cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (
        0, "policy.yaml: ok (1 model(s), 0 key(s))\n", "")


def test_a_price_left_out_is_a_warning(tmp_path: Path) -> None:
    """A model's tokens were free without a word when its price was left out (tester);
    an explicit 0 is a free model, said on purpose."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        "models:\n"
        "  free: {upstream_model: x, backends: [], price_per_1k_tokens: {input: 0, output: 0}}\n"
        "  half: {upstream_model: x, backends: [], price_per_1k_tokens: {input: 0.5}}\n"
        "  none: {upstream_model: x, backends: []}\n")
    r = tb("check-config", "policy.yaml", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "policy.yaml: ok (3 model(s), 0 key(s))\n")
    assert r.stderr.splitlines() == [
        "warning: policy.yaml: models.half.price_per_1k_tokens.output: not set, so its "
        "output tokens cost $0 (write 0 for a free model)",
        "warning: policy.yaml: models.none.price_per_1k_tokens: not set, so its input and "
        "output tokens cost $0 (write 0 for a free model)"]


def test_what_this_machine_lacks_to_start_it_is_a_warning_or_with_here_an_error(
    tmp_path: Path,
) -> None:
    """`up` failed on a config check-config had passed: TLS files that are not there, or
    not a certificate and its key, and a data_dir that cannot be created. Warnings (the
    config may be checked where it is written, its Secret mounted where it runs); errors
    with --here."""
    _, cert, key = make_test_ca(tmp_path)
    (tmp_path / "afile").write_text("")
    models = ("models:\n  demo: {upstream_model: x, backends: [], "
              "price_per_1k_tokens: {input: 0, output: 0}}\n")
    text = ("tls: {cert: none.crt, key: tls.key}\ndata_dir: afile/data\n" + models)
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    r = tb("check-config", "policy.yaml", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("policy.yaml: ok"), r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: policy.yaml: ") for line in lines)
    assert "tls.cert: cannot read" in lines[0] and "no such file" in lines[0]
    assert "data_dir:" in lines[1] and "afile is not a directory" in lines[1]
    r = tb("check-config", "--here", "policy.yaml", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (2, "")
    assert [line.split(": ")[1] for line in r.stderr.splitlines()] == ["tls.cert", "data_dir"]
    # A key that is not the certificate's (the CA's key): Envoy would refuse the pair.
    path.write_text(f"tls: {{cert: {cert.name}, key: ca.key}}\n" + models)
    r = tb("check-config", "--here", "policy.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "tls.key:" in r.stderr and "is not the private key of" \
        in r.stderr
    assert r.stderr.count("\n") == 1
    path.write_text(f"tls: {{cert: {cert.name}, key: {key.name}}}\n" + models)
    r = tb("check-config", "--here", "policy.yaml", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    # A certificate a day from its end: Envoy serves it, so a warning even with --here.
    short = tmp_path / "short"
    short.mkdir()
    _, cert, key = make_test_ca(short, days=1)
    path.write_text(f"tls: {{cert: {cert}, key: {key}}}\n" + models)
    r = tb("check-config", "--here", "policy.yaml", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("policy.yaml: ok"), r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"warning: policy.yaml: tls.cert: {cert} expires on ")


def test_a_backend_ca_file(tmp_path: Path) -> None:
    """An https backend signed by a private CA needs `backend_ca_file` (real-configs
    tester: none could be named). Absolute, for https backends only; one Envoy cannot
    read, or that holds no certificate, is what this machine lacks (an error with
    --here: Envoy would refuse the model's cluster)."""
    ca, _, _ = make_test_ca(tmp_path)
    (tmp_path / "notpem").write_text("hello\n")

    def model(url: str, ca_file: str) -> str:
        return ("models:\n  m: {upstream_model: x, backends: [{url: '" + url + "'}], "
                "backend_ca_file: '" + ca_file + "', "
                "price_per_1k_tokens: {input: 0, output: 0}}\n")

    rc, lines = check(tmp_path, model("http://h:1", str(ca)))
    assert (rc, lines) == (2, ["policy.yaml: models.m: backend_ca_file is for https:// "
                               "backends; this model has none"])
    rc, lines = check(tmp_path, model("https://h", "ca.crt"))
    assert rc == 2 and "backend_ca_file must be an absolute path" in lines[0]
    assert check(tmp_path, model("https://h", str(ca))) == (0, [])
    for bad, why in ((tmp_path / "none.crt", "cannot read"),
                     (tmp_path / "notpem", "holds no PEM certificate")):
        rc, lines = check(tmp_path, model("https://h", str(bad)))
        assert rc == 0 and len(lines) == 1 and lines[0].startswith(
            "warning: policy.yaml: models.m.backend_ca_file: ") and why in lines[0]
        r = tb("check-config", "--here", "policy.yaml", cwd=tmp_path)
        assert r.returncode == 2 and "models.m.backend_ca_file" in r.stderr


def test_a_backend_key_envoy_cannot_load_here_is_said(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """New-user tester: a backend's `api_key_env` unset where `up` ran passed
    `check-config --here` and `up`; each request then got 503. Said, as what this
    machine lacks (an error with --here), for a key file that cannot be read too."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        "models:\n"
        "  a: {upstream_model: x, price_per_1k_tokens: {input: 0, output: 0}, backends: "
        "[{url: 'http://127.0.0.1:8000', api_key_env: VLLM_KEY_A}]}\n"
        "  b: {upstream_model: y, price_per_1k_tokens: {input: 0, output: 0}, backends: "
        "[{url: 'http://127.0.0.1:8001', api_key_file: /nonexistent/key}]}\n")
    assert main(["check-config", str(path)], env={}) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: ") for line in err)
    assert "models.a: its backend API key variable VLLM_KEY_A is not set" in err[0]
    assert "models.b: cannot read its backend API key file /nonexistent/key" in err[1]
    assert main(["check-config", "--here", str(path)], env={}) == 2
    capsys.readouterr()
    key = tmp_path / "key"
    key.write_text("k")
    path.write_text(path.read_text().replace("/nonexistent/key", str(key)))
    assert main(["check-config", "--here", str(path)], env={"VLLM_KEY_A": "k"}) == 0
    assert capsys.readouterr().err == ""


def test_a_secret_pasted_as_a_name_in_the_config_is_warned_of(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Retest: a config with an org, a key's org, name or id reading as a key's secret
    passed without a word (the admin API and CLI refuse such names; a config written
    before that rule keeps loading, so a warning)."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        "models:\n  demo: {upstream_model: x, backends: [], "
        "price_per_1k_tokens: {input: 0, output: 0}}\n"
        "orgs: {sk-tb-AAAAAAAAAAAAAAAAAAAA: {rpm: 2}}\n"
        "keys:\n  - {id: sk-tb-DDDDDDDDDDDDDDDDDDDD, org: sk-tb-BBBBBBBBBBBBBBBBBBBB, "
        f"name: sk-tb-CCCCCCCCCCCCCCCCCCCC, sha256: '{'a' * 64}'}}\n")
    assert main(["check-config", str(path)], env={}) == 0
    err = capsys.readouterr().err
    assert err.count("reads as a key's secret") == 4, err
    for letter in "ABCD":
        assert letter * 20 not in err
