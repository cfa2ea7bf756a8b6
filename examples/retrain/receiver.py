#!/usr/bin/env python3
"""A retraining webhook receiver for modelgate's drift events.

It verifies each delivery's Standard Webhooks signature, answers at once (204), skips
events it has already handled (by webhook-id: deliveries are at least once), and on a
`model.drift` event retrains the model, exports it to ONNX, profiles it with
`modelgate profile` (with its validation accuracy as the reference quality), and
publishes it as the next version of the model by an atomic rename into the registry.
modelgate picks the new version up like any other; with `new_versions = "canary"` in
the model's config.toml it enters as a canary and the automated rollout (judged on
accuracy too, with `max_accuracy_drop`) promotes or rolls it back:
drift -> webhook -> retrain on production data -> canary -> promote.

    examples/retrain/run.sh --secret whsec_... --repository models --model iris \
        --capture-dir models/.capture --port 9000 --modelgate target/release/modelgate

The training data is the production traffic that drifted: with `--capture-dir` (the
gateway's `[capture] dir`) and capture on for the model, the event names the captured
Parquet files of the drifted window and the feedback files (`data.capture`); the
receiver reads them with pyarrow and joins each captured input row with its ground
truth by request id and row. Without captured labelled rows it falls back to `--data`,
a CSV of the model's features and a last `species` column (the label).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

TOLERANCE_S = 300  # reject deliveries whose timestamp is further off (replays)
MIN_ROWS = 40  # fewer captured labelled rows than this: not enough to retrain on
# Captured rows are timed when the request arrived, the window when the detector saw
# them (a little later): the window's range is widened by this much before.
WINDOW_SLACK_MS = 2000


def verify(secret: str, headers, body: bytes) -> str | None:
    """The webhook-id when the signature is valid, else None."""
    msg_id = headers.get("webhook-id")
    ts = headers.get("webhook-timestamp")
    sigs = headers.get("webhook-signature", "")
    if not msg_id or not ts or not ts.isdigit() or abs(time.time() - int(ts)) > TOLERANCE_S:
        return None
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{ts}.".encode() + body
    want = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for sig in sigs.split():
        version, _, value = sig.partition(",")
        if version == "v1" and hmac.compare_digest(value, want):
            return msg_id
    return None


def captured_rows(args, event: dict):
    """The drifted window's captured inputs joined with their labels, as (X, y, files),
    or None when the event names no captured labelled rows."""
    capture = event.get("data", {}).get("capture")
    if not args.capture_dir or not capture:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(args.capture_dir)
    window = event["data"].get("window", {})
    lo = window.get("from_ms", 0) - WINDOW_SLACK_MS
    hi = window.get("to_ms", 2**62)
    inputs = {}
    for f in capture.get("files", []):
        t = pq.read_table(root / f, columns=["id", "time", args.input, f"{args.input}__shape"])
        times = t.column("time").cast(pa.int64()).to_pylist()
        for rid, ms, values, shape in zip(t.column("id").to_pylist(), times,
                                          t.column(args.input).to_pylist(),
                                          t.column(f"{args.input}__shape").to_pylist()):
            if values is not None and lo <= ms <= hi:
                inputs[rid] = np.asarray(values, dtype=np.float32).reshape(shape)
    labelled = {}
    for f in capture.get("feedback_files", []):
        t = pq.read_table(root / f, columns=["id", "row", "label"]).to_pylist()
        for r in t:
            x = inputs.get(r["id"])
            if x is not None and r["label"] is not None and r["row"] < len(x):
                labelled[(r["id"], r["row"])] = (x[r["row"]], r["label"])  # the last wins
    if len(labelled) < MIN_ROWS:
        print(f"only {len(labelled)} captured rows are labelled; not enough", flush=True)
        return None
    rows = [labelled[k] for k in sorted(labelled)]
    X = np.stack([x for x, _ in rows])
    y = np.asarray([label for _, label in rows], dtype=np.int64)
    return X, y, list(capture.get("files", [])) + list(capture.get("feedback_files", []))


def csv_rows(path: Path):
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64), [str(path.resolve())]


def train_and_export(X, y, out: Path):
    """Fits a logistic regression on three quarters of the rows, writes the ONNX model
    to `out`; returns (training accuracy, validation accuracy on the other quarter)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    order = np.random.default_rng(0).permutation(len(y))
    cut = (len(y) * 3) // 4
    train, val = order[:cut], order[cut:]
    est = LogisticRegression(max_iter=1000, random_state=0).fit(X[train], y[train])
    onx = to_onnx(
        est,
        initial_types=[("X", FloatTensorType([None, X.shape[1]]))],
        target_opset={"": 17, "ai.onnx.ml": 3},
        options={id(est): {"zipmap": False}},
    )
    out.write_bytes(onx.SerializeToString())
    return float(est.score(X[train], y[train])), float(est.score(X[val], y[val])), train, val


def write_csv(path: Path, names, X, y) -> None:
    with open(path, "w") as f:
        f.write(",".join(list(names) + ["species"]) + "\n")
        for row, label in zip(X, y):
            f.write(",".join(f"{v:.6g}" for v in row) + f",{int(label)}\n")


def publish(args, reason: str, event: dict) -> int:
    """Retrains and publishes the next version; returns its number."""
    model_dir = Path(args.repository) / args.model
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    version = max(versions, default=0) + 1
    data = captured_rows(args, event)
    if data is None:
        if not args.data:
            raise RuntimeError("the event names no captured labelled rows and there is no --data")
        data = csv_rows(Path(args.data))
        print(f"training on {args.data}", flush=True)
    else:
        print(f"training on {len(data[1])} captured rows joined with feedback", flush=True)
    X, y, sources = data
    # Staged on the registry's filesystem (a hidden folder is not a model), so that the
    # final rename is atomic: modelgate never sees half a version.
    staging = Path(args.repository) / ".staging" / args.model
    vdir = staging / str(version)
    shutil.rmtree(vdir, ignore_errors=True)
    vdir.mkdir(parents=True)
    accuracy, validation, train, val = train_and_export(X, y, vdir / "model.onnx")
    # Lineage (model.toml): what modelgate shows in metadata, the index, the audit log
    # and webhook events. JSON strings are valid TOML basic strings.
    window = event.get("data", {}).get("window", {})
    lineage = [
        'source = "examples/retrain"',
        f"training_data = {json.dumps(', '.join(sources))}",
        f"created_at = {json.dumps(time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))}",
    ]
    if versions:
        lineage.append(f"parent_version = {max(versions)}")
    lineage += ["[metrics]", f"training_accuracy = {accuracy!r}",
                f"validation_accuracy = {validation!r}", f"training_rows = {len(train)}",
                f"validation_rows = {len(val)}",
                "[tags]", f"reason = {json.dumps(reason)}",
                f"drift_event = {json.dumps(event.get('id', ''))}"]
    if window.get("from"):
        lineage.append(f"window = {json.dumps(window['from'] + '/' + window.get('to', ''))}")
    (vdir / "model.toml").write_text("\n".join(lineage) + "\n")
    # The new version's drift reference is the data it was trained on; its reference
    # quality (what live accuracy is tested against) the held-out quarter's.
    names = [f"x{i}" for i in range(X.shape[1])]
    parent_profile = model_dir / str(max(versions, default=0)) / "profile.json"
    if parent_profile.is_file():
        names = [f["name"] for f in json.loads(parent_profile.read_text())["features"]] or names
    work = staging / f".{version}.data"
    work.mkdir(parents=True, exist_ok=True)
    write_csv(work / "train.csv", names, X[train], y[train])
    write_csv(work / "validation.csv", names, X[val], y[val])
    subprocess.run(
        [args.modelgate, "profile", "--model-repository", str(staging.parent),
         "--model", args.model, "--version", str(version), "--data", str(work / "train.csv"),
         "--label-column", "species", "--validation-data", str(work / "validation.csv")],
        check=True,
    )
    shutil.rmtree(work, ignore_errors=True)
    os.rename(vdir, model_dir / str(version))
    print(f"published {args.model} version {version} ({reason}; validation accuracy "
          f"{validation:.3f} on {len(val)} rows)", flush=True)
    return version


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--secret", required=True, help="whsec_... (the target's secret)")
    ap.add_argument("--repository", required=True, help="the model registry")
    ap.add_argument("--model", required=True)
    ap.add_argument("--capture-dir", help="the gateway's capture dir: train on the drifted window's captured rows and their feedback")
    ap.add_argument("--input", default="X", help="the model input the captured features are in")
    ap.add_argument("--data", help="fresh labelled data (CSV), when the event names no captured labelled rows")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--modelgate", default="modelgate", help="the modelgate binary")
    args = ap.parse_args()
    seen: set[str] = set()
    lock = threading.Lock()

    def retrain(event: dict) -> None:
        data = event.get("data", {})
        # One feature may be named by several tests: each once, in order.
        names = list(dict.fromkeys(e.get("feature") for e in data.get("evidence", [])))
        try:
            publish(args, f"drift in {', '.join(n for n in names if n)}", event)
        except Exception as e:  # keep serving deliveries
            print(f"retraining failed: {e}", file=sys.stderr, flush=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            msg_id = verify(args.secret, self.headers, body)
            if msg_id is None:
                self.send_response(401)
                self.end_headers()
                return
            self.send_response(204)
            self.end_headers()
            with lock:
                if msg_id in seen:
                    return  # a retry of an event already handled
                seen.add(msg_id)
            event = json.loads(body)
            print(f"verified {event.get('type')} {msg_id} for {event.get('data', {}).get('model')}", flush=True)
            if event.get("type") == "model.drift" and event["data"].get("model") == args.model:
                threading.Thread(target=retrain, args=(event,), daemon=True).start()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
