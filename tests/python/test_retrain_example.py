"""End to end: drift -> signed webhook -> retrain -> new version -> served.

A real modelgate (the built binary) serves iris version 2 with its drift profile and a
webhook target; the example receiver (examples/retrain, run in its own virtualenv with
scikit-learn and skl2onnx) verifies the signature, retrains on fresh data, profiles the
new model and publishes it as version 3 by atomic rename. Requests whose petal length
is shifted by about one standard deviation (through tritonclient) cause the drift.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from conftest import REPO_ROOT, _free_ports, _server_env, _stop, modelgate_bin

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
EXAMPLE = REPO_ROOT / "examples" / "retrain"
# The receiver's first start installs scikit-learn and skl2onnx into its virtualenv.
RECEIVER_READY_S = 600
SERVED_WITHIN_S = 180


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: process exited\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout}s\n{log.read_text(errors='replace')}")


def test_drift_webhook_retrain_publish_serve(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "iris" / "2").mkdir(parents=True)
    for f in ("model.onnx", "profile.json"):
        shutil.copy(REPO_ROOT / "models" / "iris" / "2" / f, repo / "iris" / "2" / f)
    (repo / "iris" / "config.toml").write_text(
        "[drift]\nwindow = 300\nstep = 150\ndrift_windows = 2\ncooldown_secs = 0\n"
    )
    # Fresh labelled data: the training data with petal length shifted, as drifted.
    fresh = tmp_path / "fresh.csv"
    with fresh.open("w") as f:
        subprocess.run(
            [sys.executable, str(EXAMPLE / "make_data.py"), "--shift", "petal_length=1.76"],
            stdout=f, check=True,
        )
    http_port, grpc_port, metrics_port, hook_port = _free_ports(4)
    receiver_log = tmp_path / "receiver.log"
    receiver = subprocess.Popen(
        [str(EXAMPLE / "run.sh"), "--secret", SECRET, "--repository", str(repo),
         "--model", "iris", "--data", str(fresh), "--port", str(hook_port),
         "--modelgate", str(modelgate_bin())],
        stdout=receiver_log.open("wb"), stderr=subprocess.STDOUT, env=_server_env(),
    )
    config = tmp_path / "modelgate.toml"
    config.write_text(
        f'model_repository = "{repo}"\nhost = "127.0.0.1"\n'
        f"http_port = {http_port}\ngrpc_port = {grpc_port}\nmetrics_port = {metrics_port}\n"
        "repository_poll_secs = 1\nsettle_ms = 200\n"
        "[drift]\nwebhook_initial_backoff_ms = 200\nwebhook_max_backoff_ms = 2000\n"
        "allow_private_webhooks = true\n"
        f'[[drift.webhooks]]\nname = "retrain"\nurl = "http://127.0.0.1:{hook_port}/hook"\n'
        f'secret = "{SECRET}"\n'
    )
    gateway_log = tmp_path / "modelgate.log"
    gateway = subprocess.Popen(
        [str(modelgate_bin()), "serve", "--config", str(config)],
        stdout=gateway_log.open("wb"), stderr=subprocess.STDOUT, env=_server_env(),
    )
    try:
        _wait_http(f"http://127.0.0.1:{hook_port}/health", RECEIVER_READY_S, receiver, receiver_log)
        _wait_http(f"http://127.0.0.1:{http_port}/v2/health/ready", 60, gateway, gateway_log)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        reference = np.loadtxt(REPO_ROOT / "models" / "iris" / "reference.csv",
                               delimiter=",", skiprows=1, dtype=np.float32)
        rng = np.random.default_rng(0)
        deadline = time.monotonic() + SERVED_WITHIN_S
        version = "2"
        while version != "3":
            assert time.monotonic() < deadline, (
                f"version 3 never served\n--- receiver ---\n{receiver_log.read_text()}"
                f"\n--- modelgate ---\n{gateway_log.read_text()[-4000:]}"
            )
            for _ in range(50):
                row = reference[rng.integers(len(reference))].copy()
                row[2] += 1.76  # petal length, about one standard deviation
                x = httpclient.InferInput("X", [1, 4], "FP32")
                x.set_data_from_numpy(row.reshape(1, 4))
                result = client.infer("iris", [x])
                version = result.get_response()["model_version"]
                if version == "3":
                    break
        # The new version came with its own profile, and the receiver verified the event.
        assert (repo / "iris" / "3" / "profile.json").is_file()
        log = receiver_log.read_text()
        assert "verified model.drift" in log and "published iris version 3" in log, log
        meta = client.get_model_metadata("iris")
        assert "3" in meta["versions"]
        # ... and its lineage: the version it replaced, the data, the metric.
        lineage = client.get_model_metadata("iris", "3")["parameters"]
        assert lineage["lineage.parent_version"] == "2", lineage
        assert lineage["lineage.source"] == "examples/retrain", lineage
        assert float(lineage["lineage.metrics.training_accuracy"]) > 0.5, lineage
        drift = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/admin/drift/iris"))
        assert any(w["version"] == 2 and w["events"] >= 1 for w in drift["windows"]), drift
    finally:
        _stop(gateway)
        _stop(receiver)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_drift_retrain_on_captured_data_canary_promote(tmp_path: Path) -> None:
    """The whole loop on production data: shifted traffic is captured and labelled
    (feedback by request id) -> drift -> signed webhook naming the captured files ->
    the receiver trains on exactly those rows joined with their labels (pyarrow),
    profiles the new version with its validation accuracy and publishes it -> it enters
    as a canary (`new_versions = "canary"`) -> the rollout, judged on accuracy on the
    labelled traffic too, promotes it."""
    repo = tmp_path / "repo"
    (repo / "iris" / "2").mkdir(parents=True)
    for f in ("model.onnx", "profile.json", "model.toml"):
        shutil.copy(REPO_ROOT / "models" / "iris" / "2" / f, repo / "iris" / "2" / f)
    (repo / "iris" / "config.toml").write_text(
        "[drift]\nwindow = 300\nstep = 150\ndrift_windows = 2\ncooldown_secs = 0\n"
        "[capture]\nenabled = true\nsample_rate = 1.0\n"
        '[traffic]\nnew_versions = "canary"\ncompare_canary = false\n'
        "[traffic.rollout]\nsteps = [50.0, 100.0]\ninterval_secs = 2.0\nmin_requests = 50\n"
        "max_accuracy_drop = 0.05\nmin_labelled = 100\n"
    )
    capture_dir = tmp_path / "capture"
    # The traffic: iris with petal length shifted, and its true species.
    fresh = subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), "--shift", "petal_length=1.76"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()[1:]
    rows = [([float(v) for v in line.split(",")[:4]], int(line.split(",")[4])) for line in fresh]
    http_port, grpc_port, metrics_port, hook_port = _free_ports(4)
    receiver_log = tmp_path / "receiver.log"
    receiver = subprocess.Popen(
        [str(EXAMPLE / "run.sh"), "--secret", SECRET, "--repository", str(repo),
         "--model", "iris", "--capture-dir", str(capture_dir), "--port", str(hook_port),
         "--modelgate", str(modelgate_bin())],
        stdout=receiver_log.open("wb"), stderr=subprocess.STDOUT, env=_server_env(),
    )
    config = tmp_path / "modelgate.toml"
    config.write_text(
        f'model_repository = "{repo}"\nhost = "127.0.0.1"\n'
        f"http_port = {http_port}\ngrpc_port = {grpc_port}\nmetrics_port = {metrics_port}\n"
        "repository_poll_secs = 1\nsettle_ms = 200\n"
        f'[capture]\ndir = "{capture_dir}"\n'
        "[traffic]\ncontroller_tick_ms = 200\n"
        "[drift]\nwebhook_initial_backoff_ms = 200\nwebhook_max_backoff_ms = 2000\n"
        "allow_private_webhooks = true\n"
        f'[[drift.webhooks]]\nname = "retrain"\nurl = "http://127.0.0.1:{hook_port}/hook"\n'
        f'secret = "{SECRET}"\n'
    )
    gateway_log = tmp_path / "modelgate.log"
    gateway = subprocess.Popen(
        [str(modelgate_bin()), "serve", "--config", str(config)],
        stdout=gateway_log.open("wb"), stderr=subprocess.STDOUT, env=_server_env(),
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        _wait_http(f"http://127.0.0.1:{hook_port}/health", RECEIVER_READY_S, receiver, receiver_log)
        _wait_http(f"{base}/v2/health/ready", 60, gateway, gateway_log)
        rng = np.random.default_rng(1)
        deadline = time.monotonic() + SERVED_WITHIN_S
        sent = 0
        while True:
            routing = _get(f"{base}/admin/models/iris/traffic")["routing"]
            if routing.get("stable") == 3:
                break
            assert routing.get("rejected") in (None, []), routing
            assert time.monotonic() < deadline, (
                f"version 3 never promoted: {routing}\n--- receiver ---\n{receiver_log.read_text()}"
                f"\n--- modelgate ---\n{gateway_log.read_text()[-4000:]}"
            )
            for _ in range(50):
                features, species = rows[rng.integers(len(rows))]
                rid = f"r{sent}"
                sent += 1
                answer = _post(f"{base}/v2/models/iris/infer", {
                    "id": rid,
                    "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": features}],
                })
                assert answer["id"] == rid
                fb = _post(f"{base}/v2/models/iris/feedback",
                           {"feedback": [{"id": rid, "label": species}]})
                assert fb["results"][0]["status"] == "joined", fb
        log = receiver_log.read_text()
        assert "verified model.drift" in log, log
        # It trained on the captured, labelled rows of the drifted window.
        assert "captured rows joined with feedback" in log, log
        assert "published iris version 3" in log, log
        # Serving as validated raises no quality alarm (its reference, a validation
        # accuracy on few rows, is compared as the sample it is).
        assert "verified model.quality" not in log, log
        lineage = _get(f"{base}/v2/models/iris/versions/3")["parameters"]
        assert ".parquet" in lineage["lineage.training_data"], lineage
        assert lineage["lineage.parent_version"] == "2", lineage
        validation = float(lineage["lineage.metrics.validation_accuracy"])
        assert validation > 0.8, lineage
        assert lineage["lineage.tags.drift_event"].startswith("evt_"), lineage
        # The profile carries the validation accuracy as the version's reference.
        profile = json.loads((repo / "iris" / "3" / "profile.json").read_text())
        assert abs(profile["quality"]["accuracy"] - validation) < 1e-9, profile["quality"]
        # Entered as canary by itself, advanced and promoted with accuracy judged.
        audit = _get(f"{base}/admin/audit?model=iris")
        actions = [e["action"] for e in audit]
        assert actions[-3:] == ["enter", "advance", "promote"], actions
        for entry in audit[-2:]:
            acc = next(c for c in entry["analysis"]["checks"] if c["criterion"] == "accuracy")
            assert acc["status"] == "pass" and acc["of"] >= 100, acc
    finally:
        _stop(gateway)
        _stop(receiver)
