"""Fixtures for the tritonclient compatibility suite.

A single modelgate server is started for the whole test session:

    $MODELGATE_BIN serve --model-repository <repo>/models --host 127.0.0.1 \
        --http-port H --grpc-port G --metrics-port M

MODELGATE_BIN defaults to <repo>/target/debug/modelgate. The suite never builds
the binary; the caller does (`cargo build`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "models"
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "modelgate"

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS = 3  # retried only when a picked port was taken meanwhile


def modelgate_bin() -> Path:
    return Path(os.environ.get("MODELGATE_BIN") or DEFAULT_BIN).resolve()


def model_path(model: str, version: str) -> Path:
    return MODEL_REPOSITORY / model / version / "model.onnx"


def _free_ports(n: int) -> list[int]:
    """Pick n distinct free TCP ports on 127.0.0.1 (bind to port 0, read, close)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class ServerInfo:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no server output>"


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    # ort is built with `load-dynamic`; point it at the library fetched by
    # scripts/fetch-onnxruntime.sh unless the caller chose one already.
    lib = REPO_ROOT / ".onnxruntime" / "libonnxruntime.so"
    if "ORT_DYLIB_PATH" not in env and lib.exists():
        env["ORT_DYLIB_PATH"] = str(lib)
    env.setdefault("RUST_BACKTRACE", "1")
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def _start_once(binary: Path, log_path: Path) -> tuple[ServerInfo | None, str]:
    """Start the server and wait for readiness.

    Returns (info, "") on success, (None, reason) when the process exited early.
    Fails the session on a readiness timeout.
    """
    http_port, grpc_port, metrics_port = _free_ports(3)
    cmd = [
        str(binary),
        "serve",
        "--model-repository",
        str(MODEL_REPOSITORY),
        "--host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
    ]
    # Output goes to a file, not a pipe, so a chatty server can never block on
    # a full pipe buffer during a long test session.
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_server_env(),
            cwd=str(REPO_ROOT),
        )
    finally:
        log.close()
    info = ServerInfo(proc, http_port, grpc_port, metrics_port, log_path)

    ready_url = f"http://{info.http_url}/v2/health/ready"
    deadline = time.monotonic() + READY_TIMEOUT_S
    last_error = "no attempt made"
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            return None, (
                f"modelgate exited early with code {rc}\n"
                f"command: {' '.join(cmd)}\n"
                f"--- server output ---\n{info.log()}"
            )
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as resp:
                if resp.status == 200:
                    return info, ""
                last_error = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last_error = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last_error = repr(e)
        time.sleep(0.2)

    _stop(proc)
    pytest.fail(
        f"modelgate did not become ready within {READY_TIMEOUT_S:.0f}s "
        f"(GET {ready_url}: {last_error})\n"
        f"command: {' '.join(cmd)}\n--- server output ---\n{info.log()}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def modelgate_server(tmp_path_factory) -> ServerInfo:
    binary = modelgate_bin()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"modelgate binary not found or not executable: {binary}\n"
            "Build it with `cargo build` in the repository root, or set MODELGATE_BIN.",
            pytrace=False,
        )
    for model, version in (("iris", "1"), ("iris", "2"), ("mlp", "1")):
        if not model_path(model, version).is_file():
            pytest.fail(f"model file missing: {model_path(model, version)}", pytrace=False)

    log_dir = tmp_path_factory.mktemp("modelgate")
    reason = ""
    for attempt in range(1, START_ATTEMPTS + 1):
        log_path = log_dir / f"server-{attempt}.log"
        info, reason = _start_once(binary, log_path)
        if info is not None:
            break
        # Another process may have grabbed one of the ports between our probe
        # and the server's bind; only that case is worth a retry.
        if "in use" not in reason.lower():
            break
    if info is None:
        pytest.fail(reason, pytrace=False)

    try:
        yield info
    finally:
        _stop(info.process)
        rc = info.process.returncode
        # Keep the server output visible for post-mortem when run with -s / -rA.
        print(f"\nmodelgate exited with {rc}; log: {info.log_path}")


@pytest.fixture(scope="session")
def http_url(modelgate_server: ServerInfo) -> str:
    return modelgate_server.http_url


@pytest.fixture(scope="session")
def grpc_url(modelgate_server: ServerInfo) -> str:
    return modelgate_server.grpc_url


@pytest.fixture(scope="session")
def metrics_url(modelgate_server: ServerInfo) -> str:
    return modelgate_server.metrics_url


# ---------------------------------------------------------------- clients


@pytest.fixture(scope="session")
def http_client(http_url):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=http_url, network_timeout=60.0)
    yield client
    client.close()


@pytest.fixture(scope="session")
def grpc_client(grpc_url):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=grpc_url)
    yield client
    client.close()


# ---------------------------------------------------------------- reference


class Reference:
    """Runs the model files with the onnxruntime Python package."""

    def __init__(self) -> None:
        import onnxruntime as ort

        self._ort = ort
        self._sessions: dict[tuple[str, str], object] = {}

    def session(self, model: str, version: str):
        key = (model, version)
        if key not in self._sessions:
            opts = self._ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            self._sessions[key] = self._ort.InferenceSession(
                str(model_path(model, version)),
                sess_options=opts,
                providers=["CPUExecutionProvider"],
            )
        return self._sessions[key]

    def run(self, model: str, version: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.session(model, version)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()
