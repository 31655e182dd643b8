"""A throwaway Ray head on 127.0.0.1 for `ray job submit` tests, with Ray 2.60's token auth on.

    address = start_head(tmp)                  # http://127.0.0.1:<port>, the job server
    rc, logs = submit(address, "python -m pipelines.train --config ...", working_dir=REPO)
    stop()

What this relies on (checked against the installed Ray 2.60):
- `ray start --head --block` keeps one parent process that owns every Ray process it starts and
  kills them on SIGTERM, so `stop()` signals that one pid (and the process group we gave it), never
  `ray stop`, which would kill every Ray on the machine, the test session's own included.
- Token auth: the head and every client need `RAY_AUTH_MODE=token` in their environment and the
  same token, from `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`. A client with
  no `RAY_AUTH_MODE` sends no token even when the file exists, and gets HTTP 401. We pass a fresh
  token file by path so `~/.ray` is left alone.
- `--node-ip-address 127.0.0.1` is rewritten by Ray to the machine's routable address for GCS;
  only the dashboard (the job server) is really bound to 127.0.0.1, via `--dashboard-host`.
- `ray job submit` waits for the job and exits 1 when it fails; the job's own output is read back
  with `ray job logs`.
- The working dir is zipped with `.gitignore` (and `.rayignore`) honoured, so .venv/, runs/ and
  wandb/ stay out, and Ray 2.60 also leaves out `.git`, `.venv`, `venv` and `__pycache__` by default
  (`RAY_RUNTIME_ENV_DEFAULT_EXCLUDES`); a runtime env's `excludes` adds to that list.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


class RayStartError(RuntimeError):
    """`ray start` could not bring a head up here (the message carries its log tail)."""


_head: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env() -> dict[str, str]:
    """Environment for `ray` CLI calls against the running head (token auth on)."""
    if not _head:
        raise RuntimeError("no head: call start_head() first")
    return dict(_head["env"])


def start_head(tmp: Path, num_cpus: int = 2, timeout_s: float = 90.0) -> str:
    """Start a head with the job server on 127.0.0.1; return its http address."""
    if _head:
        raise RuntimeError("a head is already running; stop() it first")
    if not Path(RAY).exists():
        raise RayStartError(f"no `ray` CLI beside {sys.executable}")
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # Ray's socket paths have a length limit: a short temp dir of our own, not pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="vprj-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    port = _free_port()
    cmd = [RAY, "start", "--head", "--block", "--port", "0", "--node-ip-address", "127.0.0.1",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(port),
           # Fixed defaults (10001, 52365) would collide with any other Ray on the machine.
           "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
           "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    log = open(tmp / "ray_start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _head.update(proc=proc, env=env, log=tmp / "ray_start.log", temp_dir=temp_dir, logfile=log)
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(tmp / "ray_start.log")
            stop()
            raise RayStartError(f"`ray start` exited with {proc.returncode}:\n{tail}")
        # The job server can answer before the head's raylet has registered; `ray start` prints
        # this line only once the whole node is up (it exits instead if the node never comes up).
        if "Ray runtime started." in _tail(tmp / "ray_start.log", 100_000) and \
                http_status(f"{address}/api/jobs/", token.read_text()) == 200:
            _head["address"] = address
            return address
        time.sleep(0.5)
    tail = _tail(tmp / "ray_start.log")
    stop()
    load = os.getloadavg()[0]
    raise RayStartError(f"job server at {address} not up after {timeout_s:.0f} s "
                        f"(load average {load:.1f} on {os.cpu_count()} cores):\n{tail}")


def submit(address: str, entrypoint: str, working_dir: str | Path,
           runtime_env: dict | None = None, timeout_s: float = 120.0) -> tuple[int, str]:
    """`ray job submit --working-dir DIR -- ENTRYPOINT`, waited on; returns (exit code, job logs)."""
    env = client_env()
    sid = f"vipoly-test-{uuid.uuid4().hex[:8]}"
    cmd = [RAY, "job", "submit", "--address", address, "--submission-id", sid, "--working-dir", str(working_dir)]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    cmd += ["--", *shlex.split(entrypoint)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    logs = subprocess.run([RAY, "job", "logs", "--address", address, sid], env=env,
                          capture_output=True, text=True, timeout=60)
    text = logs.stdout if logs.returncode == 0 else done.stdout + done.stderr
    return done.returncode, text


def serve_cli(address: str, *args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess:
    """`serve ARGS... --address ADDRESS` (Ray Serve's CLI, beside `ray`) against the running head."""
    cmd = [str(Path(RAY).with_name("serve")), *args, "--address", address]
    return subprocess.run(cmd, env=client_env(), capture_output=True, text=True, timeout=timeout_s)


def free_port() -> int:
    return _free_port()


def stop(grace_s: float = 5.0) -> None:
    """Stop the head started here: SIGTERM to its `ray start --block`, then SIGKILL its group.
    (--block's own clean-up took the whole 20 s it was once given here, on every run: the group
    kill is what ends the head's processes either way.)"""
    if not _head:
        return
    proc: subprocess.Popen = _head["proc"]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # --block's handler kills the Ray processes it started
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of that session is left (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)
    _head["logfile"].close()
    shutil.rmtree(_head["temp_dir"], ignore_errors=True)
    _head.clear()


def http_status(url: str, token: str | None) -> int | None:
    """HTTP status of a GET, sending `token` as a bearer token if given; None if nothing answers."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""
