"""`tokenbooth up`: starts everything, prints a working key and curl line, stops it all."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from authz.runtime import supervisor
from authz.runtime.defaults import (
    DEFAULT_CONFIG,
    RunOverrides,
    migrate_default_config,
    read_demo_key,
    write_default_config,
)
from authz.runtime.procs import http_json, http_ok, spawn, stop, wait_until
from policy.config import Config, load_config
from policy.keys import fingerprint
from tests.helpers import SECRET, free_port
from tests.tls import make_test_ca

pytestmark = pytest.mark.e2e


def test_default_config_is_valid_and_holds_only_the_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / DEFAULT_CONFIG
    secret = write_default_config(path)
    cfg = load_config(path)
    assert [k.sha256 for k in cfg.keys] == [fingerprint(secret)]
    # No backend: `up` serves it from its simulator.
    assert cfg.models["demo"].backends == []
    assert secret not in path.read_text()
    assert read_demo_key(path) == secret
    assert (path.parent / "demo.key").stat().st_mode & 0o777 == 0o600


OLD_DEFAULT = """\
# Written by `tokenbooth up` on first run. Edit freely: changes to models and
# keys take effect without a restart. The reference is in the README.
listen: 127.0.0.1:8080
models:
  demo:                          # the alias clients send as "model"
    upstream_model: tiny-llama
    backends:
      - url: http://127.0.0.1:8000
        weight: 1
"""


def test_a_default_config_from_an_earlier_version_moves_to_the_simulator(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(OLD_DEFAULT)
    assert migrate_default_config(path)
    assert load_config(path).models["demo"].backends == []
    assert not migrate_default_config(path)
    # A file whose backends were edited is left alone.
    path.write_text(OLD_DEFAULT.replace("8000", "8001"))
    assert not migrate_default_config(path)
    assert path.read_text() == OLD_DEFAULT.replace("8000", "8001")


def port_open(hostport: str) -> bool:
    host, port = hostport.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


def first_run_on_free_ports(
        tmp_path: Path) -> tuple[Path, str, dict[str, Any], dict[str, str]]:
    """A first-run config in the default place, moved onto free ports: its path, the demo
    key's secret, the config as written, and an environment without TOKENBOOTH_CONFIG."""
    path = tmp_path / DEFAULT_CONFIG
    secret = write_default_config(path)
    data = yaml.safe_load(path.read_text())
    listen = f"127.0.0.1:{free_port()}"
    data["listen"] = listen
    data["services"] = {"grpc_listen": f"127.0.0.1:{free_port()}",
                        "http_listen": f"127.0.0.1:{free_port()}"}
    data["envoy"] = {"admin_listen": f"127.0.0.1:{free_port()}"}
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "TOKENBOOTH_CONFIG"}
    return path, secret, data, env


@pytest.mark.skipif(shutil.which("curl") is None, reason="the printed line needs curl")
def test_up_runs_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    # A first-run config in the default place, moved onto free ports.
    _, _, data, env = first_run_on_free_ports(tmp_path)
    listen = data["listen"]
    up = subprocess.Popen([sys.executable, "-m", "authz.cli", "up"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        out = "".join(lines)
        assert "Ctrl-C stops everything" in out, out
        curl = next(ln.strip() for ln in lines if ln.strip().startswith("curl "))
        # Wait for the simulator backend's first health check, then run the printed line.
        for _ in range(100):
            done = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=30)
            body = json.loads(done.stdout or "{}")
            if "choices" in body:
                break
            time.sleep(0.2)
        assert body["choices"][0]["message"]["content"], body
        assert body["usage"]["total_tokens"] > 0
        assert re.search(r"demo API key: sk-tb-\S+", out)
    finally:
        up.send_signal(signal.SIGINT)
        rc = up.wait(30)
        assert up.stdout is not None
        rest = up.stdout.read()
        up.stdout.close()
    assert rc == 0, rest
    for hostport in (listen, data["services"]["grpc_listen"], data["services"]["http_listen"],
                     data["envoy"]["admin_listen"]):
        assert not port_open(hostport), f"{hostport} still open after Ctrl-C"


# A model `up` serves from its simulator, free by an explicit zero price (a price left
# out is a warning on `up`'s stderr).
NO_BACKEND = {"upstream_model": "tiny-llama", "backends": [],
              "price_per_1k_tokens": {"input": 0, "output": 0}}


def free_ports_config(**models: dict[str, Any]) -> dict[str, Any]:
    """A policy on free ports with `models` and one key (SECRET)."""
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "services": {"grpc_listen": f"127.0.0.1:{free_port()}",
                     "http_listen": f"127.0.0.1:{free_port()}"},
        "envoy": {"admin_listen": f"127.0.0.1:{free_port()}"},
        "data_dir": "data",
        "models": models,
        "keys": [{"id": "k", "org": "o", "sha256": fingerprint(SECRET)}],
    }


def read_banner(up: subprocess.Popen[str], timeout: float = 90) -> list[str]:
    """`up`'s output until the banner's last line (or until it exits)."""
    assert up.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if "Ctrl-C stops everything" in line:
            return lines
    raise AssertionError("no banner:\n" + "\n".join(lines))


def start_up(tmp_path: Path, data: dict[str, Any]
             ) -> tuple[Path, subprocess.Popen[str], openai.OpenAI]:
    """`up` of the config `data` (written to tmp_path), its output piped, and a client
    of its listener with SECRET."""
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    up = subprocess.Popen([sys.executable, "-m", "authz.cli", "up", "--config", str(path)],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    client = openai.OpenAI(base_url=f"http://{data['listen']}/v1", api_key=SECRET,
                           max_retries=0)
    return path, up, client


def chat_until_served(client: openai.OpenAI, model: str) -> Any:
    """The first answer once the backend's first health check has passed."""
    for _ in range(150):
        try:
            return client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        except openai.APIStatusError as e:
            if e.status_code != 503:
                raise
            time.sleep(0.2)
    raise AssertionError(f"{model}: still 503")


@contextmanager
def users_vllm(model: str) -> Iterator[str]:
    """`tokenbooth sim` with a distinctive model name, playing the user's own vLLM."""
    url = f"http://127.0.0.1:{free_port()}"
    procs = [spawn([sys.executable, "-m", "authz.cli", "sim", "--listen", url[7:],
                    "--model", model], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_until(lambda: http_ok(f"{url}/health"), "the user's vLLM", alive=procs)
        yield url
    finally:
        stop(procs)


def chats(sim_url: str) -> list[dict[str, Any]]:
    return [r for r in http_json(f"{sim_url}/_sim/requests")
            if r["path"] == "/v1/chat/completions"]


def add_a_simulated_model_and_chat(tmp_path: Path, path: Path, data: dict[str, Any],
                                   client: openai.OpenAI) -> None:
    """Reload the config with a `later` model that has no backend; it must be served (by
    `up`'s simulator) within seconds."""
    data["models"]["later"] = {"upstream_model": "later-7b", "backends": []}
    (tmp_path / "next.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "next.yaml").replace(path)
    for _ in range(100):
        with suppress(openai.NotFoundError):  # until the reload
            assert chat_until_served(client, "later").model == "later-7b"
            return
        time.sleep(0.1)
    raise AssertionError("the model the reload added was never served")


def stop_up(up: subprocess.Popen[str], client: openai.OpenAI) -> int:
    """Close the client, Ctrl-C `up`; its exit status."""
    client.close()
    up.send_signal(signal.SIGINT)
    rc = up.wait(30)
    assert up.stdout is not None
    up.stdout.close()
    return rc


def test_up_sends_models_to_the_configs_backends(tmp_path: Path) -> None:
    with users_vllm("users-vllm-7b") as vllm:
        data = free_ports_config(
            mine={"upstream_model": "users-vllm-7b", "backends": [{"url": vllm}]},
            toy={"upstream_model": "tiny-llama", "backends": []})
        path, up, client = start_up(tmp_path, data)
        try:
            banner = read_banner(up)
            assert f"    mine -> {vllm}  (model users-vllm-7b)" in banner, banner
            assert any(re.fullmatch(r"    toy  -> simulator at http://127\.0\.0\.1:\d+  "
                                    r"\(model tiny-llama\)", ln) for ln in banner), banner
            assert chat_until_served(client, "mine").model == "users-vllm-7b"
            [seen] = chats(vllm)
            assert json.loads(seen["body"])["model"] == "users-vllm-7b"
            # A model without a backend goes to `up`'s simulator, not to the user's vLLM.
            assert chat_until_served(client, "toy").model == "tiny-llama"
            assert len(chats(vllm)) == 1
            # One a reload adds is served by it too (it answered 404 "The model
            # `later-7b` does not exist": the simulator knew the models of `up`'s start).
            add_a_simulated_model_and_chat(tmp_path, path, data, client)
        finally:
            rc = stop_up(up, client)
        assert rc == 0


def test_up_without_a_simulated_model_serves_one_a_reload_adds(tmp_path: Path) -> None:
    """Ops tester: started with a backend for every model, `up` ran no simulator, and a
    model a reload added with `backends: []` answered 503 until `up` restarted. Its
    simulator runs anyway (the banner says what for) and serves such a model at once."""
    with users_vllm("users-vllm-7b") as vllm:
        data = free_ports_config(
            mine={"upstream_model": "users-vllm-7b", "backends": [{"url": vllm}]})
        path, up, client = start_up(tmp_path, data)
        try:
            banner = read_banner(up)
            assert any(re.fullmatch(r"  simulator at http://127\.0\.0\.1:\d+: for models a "
                                    r"reload adds with `backends: \[\]`", ln)
                       for ln in banner), banner
            assert chat_until_served(client, "mine").model == "users-vllm-7b"
            add_a_simulated_model_and_chat(tmp_path, path, data, client)
            assert len(chats(vllm)) == 1
        finally:
            rc = stop_up(up, client)
        assert rc == 0


def test_up_refuses_a_bad_pair_before_it_starts_anything(tmp_path: Path) -> None:
    """TLS tester: `up` started the services and the simulator, then Envoy refused the
    pair and `up` said "envoy: a process exited with status 1"."""
    _, cert, _ = make_test_ca(tmp_path)
    data = free_ports_config(demo=NO_BACKEND)
    data["tls"] = {"cert": cert.name, "key": "ca.key"}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "authz.cli", "up", "--config", str(path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr == (f"tokenbooth: error: {path}: tls.key: {tmp_path / 'ca.key'} is not "
                        f"the private key of {cert}\n")


def test_up_checks_the_admin_apis_port_before_it_starts_anything(tmp_path: Path) -> None:
    """Newcomer tester: with an admin token and `admin.listen` taken, `up` started every
    process, then said the services exited. Now one line, as for its other ports."""
    port = free_port()
    data = free_ports_config(demo=NO_BACKEND)
    data["admin"] = {"listen": f"127.0.0.1:{port}"}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBOOTH_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        r = subprocess.run([sys.executable, "-m", "authz.cli", "up", "--config", str(path)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           env={**env, "TOKENBOOTH_ADMIN_TOKEN": "t0ken-for-the-test"})
    assert (r.returncode, r.stdout) == (1, ""), r.stderr
    assert r.stderr == f"tokenbooth: error: 127.0.0.1:{port} (admin.listen) is already in use\n"


def test_up_says_when_its_certificate_is_near_its_end(tmp_path: Path) -> None:
    """TLS tester: an expired certificate was served without a word (Envoy loads it;
    clients refuse it). `up` says so first; here it then stops on a port in use."""
    _, cert, key = make_test_ca(tmp_path, days=1)
    port = free_port()
    data = free_ports_config(demo=NO_BACKEND)
    data["tls"] = {"cert": cert.name, "key": key.name}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        r = subprocess.run([sys.executable, "-m", "authz.cli", "up", "--config", str(path),
                            "--listen", f"127.0.0.1:{port}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    warning, error = r.stderr.splitlines()
    assert warning.startswith(f"tokenbooth: warning: {path}: tls.cert: {cert} expires on ")
    assert error == (f"tokenbooth: error: 127.0.0.1:{port} (listen, --listen, "
                     "TOKENBOOTH_LISTEN) is already in use")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_up_with_its_listen_port_taken_exits_with_one_line(tmp_path: Path, how: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(free_ports_config(
        demo=NO_BACKEND)))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBOOTH_")}
    args = [sys.executable, "-m", "authz.cli", "up", "--config", str(path)]
    if how == "flag":
        args += ["--listen", f"127.0.0.1:{port}"]
    else:
        env["TOKENBOOTH_LISTEN"] = f"127.0.0.1:{port}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 1
    assert "is up" not in r.stdout
    assert r.stderr == (f"tokenbooth: error: 127.0.0.1:{port} (listen, --listen, "
                        "TOKENBOOTH_LISTEN) is already in use\n")


class _OtherInstance(BaseHTTPRequestHandler):
    """Answers every readiness probe, as another running gateway would."""

    def do_GET(self) -> None:
        body = (json.dumps({"node": {"metadata": {supervisor.RUN_METADATA_KEY: "not-ours"}}})
                if self.path == "/server_info" else "ready\n").encode()
        self.send_response(200)
        self.send_header("x-tokenbooth-pid", "1")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("child", ["services", "envoy"])
def test_readiness_answered_by_another_process_is_a_busy_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, child: str,
) -> None:
    """The race the pre-check cannot see: the port was free, then another instance
    answers the probe before `up`'s own child has bound it."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _OtherInstance)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    other = f"127.0.0.1:{server.server_port}"
    cfg = Config.model_validate(free_ports_config(
        demo={"upstream_model": "m", "backends": [{"url": "http://127.0.0.1:9"}]}))
    ports = RunOverrides(http_listen=other) if child == "services" else RunOverrides(
        admin_listen=other)
    cfg = ports.apply(cfg)
    # The child never answers: a process that only sleeps.
    monkeypatch.setattr(supervisor, "spawn",
                        lambda argv, **_: spawn([sys.executable, "-c",
                                                 "import time; time.sleep(60)"]))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with pytest.raises(OSError) as e:
            if child == "services":
                supervisor._start_services(cfg, tmp_path / "p.yaml", RunOverrides(), procs)
            else:
                supervisor._start_envoy(cfg, tmp_path / "envoy.yaml", procs)
    finally:
        stop(procs)
        server.shutdown()
        server.server_close()
    where = ("services.http_listen, --http-listen, TOKENBOOTH_HTTP_LISTEN" if child == "services"
             else "envoy.admin_listen, --admin-listen, TOKENBOOTH_ADMIN_LISTEN")
    assert str(e.value) == f"{other} ({where}) is already in use"


def test_ctrl_c_with_a_stream_in_flight_records_its_counted_prompt(tmp_path: Path) -> None:
    """Ctrl-C stops Envoy first, then the services, then the simulator: the stream cut by
    the stop is recorded with its prompt as the simulator counts it. Stopped all at once,
    the simulator was gone before the services asked, and the record charged the
    prompt's bound (562 tokens for a one-word prompt)."""
    path, secret, data, env = first_run_on_free_ports(tmp_path)
    listen = data["listen"]
    up = subprocess.Popen([sys.executable, "-m", "authz.cli", "up"], cwd=tmp_path, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://{listen}/v1", api_key=secret, max_retries=0)
    started = threading.Event()

    def stream() -> None:
        with suppress(openai.APIError, ValueError, OSError):
            for _ in client.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": "Hello!"}],
                    max_tokens=200, stream=True, extra_headers={"x-sim-tpot-ms": "100"}):
                started.set()

    try:
        for _ in range(300):  # up, and the simulator's first health check passed
            with suppress(openai.APIError):
                client.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
                break
            time.sleep(0.2)
        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert started.wait(30), "the stream never started"
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        client.close()
    cfg = load_config(path)
    recs = [json.loads(ln) for ln in (cfg.data_dir / "usage.jsonl").read_text().splitlines()]
    cut = [r for r in recs if r["status"] != 200]
    assert len(cut) == 1, recs
    assert cut[0]["prompt_tokens"] < 50, cut[0]  # counted by the simulator, not the bound


# A child that counts the stop signals it gets (SIGTERM or SIGINT, as `serve` takes
# them: asyncio's handlers, one call per signal delivered) and exits at the second.
_SERVE_LIKE = """
import asyncio, pathlib, signal, sys
out = pathlib.Path(sys.argv[1])
async def main():
    got, done = [], asyncio.Event()
    def on(sig):
        got.append(sig.name)
        out.write_text(",".join(got))
        if len(got) == 2:
            done.set()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on, sig)
    out.write_text("ready")
    await done.wait()
asyncio.run(main())
"""
# A child stuck in its stop: it notes SIGTERM and goes on (an Envoy or simulator that
# does not exit).
_STUCK = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: out.write_text("term"))
out.write_text("ready")
while True:
    time.sleep(0.05)
"""


def test_a_second_signal_hurries_ups_stop(tmp_path: Path) -> None:
    """`up`'s stop (Envoy, then the services, then the simulator, each waited for) ignored
    a second Ctrl-C. Now, with the last started child stuck in its stop: `serve` gets its
    stop signal and a second one at once (it hurries its own stop), and the stuck child
    is killed; the children that still have their turn are stopped as ever."""
    files = {name: tmp_path / name for name in ("sim", "serve", "stuck")}
    sim = spawn([sys.executable, "-c", "import time; time.sleep(600)"])
    serve = spawn([sys.executable, "-c", _SERVE_LIKE, str(files["serve"])])
    stuck = spawn([sys.executable, "-c", _STUCK, str(files["stuck"])])
    procs = [sim, serve, stuck]
    for name in ("serve", "stuck"):
        wait_until(lambda f=files[name]: f.exists() and f.read_text() == "ready", name,
                   alive=procs)
    signals = supervisor._Signals()
    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signals.install()
    signals.stopping = True  # as after the first Ctrl-C

    def second_ctrl_c() -> None:  # once the stop is waiting for the stuck child
        wait_until(lambda: files["stuck"].read_text() == "term", "stuck", timeout=20)
        os.kill(os.getpid(), signal.SIGINT)

    helper = threading.Thread(target=second_ctrl_c, daemon=True)
    helper.start()
    try:
        supervisor.stop_children(procs, serve, signals)
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    helper.join(5)
    assert signals.hurried
    assert files["serve"].read_text() == "SIGTERM,SIGINT"  # its stop, then the hurry
    assert (stuck.returncode, serve.returncode, sim.returncode) == (
        -signal.SIGKILL, 0, -signal.SIGTERM)


def test_a_second_ctrl_c_reaches_serve_through_up(tmp_path: Path) -> None:
    """Through `up` itself: a second Ctrl-C while it stops says it hurries, and `serve`
    gets it (its own line: the stop hurried); `up` still exits 0 with every port closed."""
    _, _, data, env = first_run_on_free_ports(tmp_path)
    up = subprocess.Popen([sys.executable, "-m", "authz.cli", "up"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        read_banner(up)
        up.send_signal(signal.SIGINT)
        assert up.stdout is not None
        while "stopping" not in (line := up.stdout.readline()):
            assert line, "up ended without stopping"
        up.send_signal(signal.SIGINT)
        rc = up.wait(60)
        rest = up.stdout.read()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        assert up.stdout is not None
        up.stdout.close()
    assert rc == 0, rest
    assert "hurrying" in rest, rest
    assert "stop hurried by a second signal" in rest, rest
    for hostport in (data["listen"], data["services"]["grpc_listen"],
                     data["services"]["http_listen"], data["envoy"]["admin_listen"]):
        assert not port_open(hostport), f"{hostport} still open after Ctrl-C"
