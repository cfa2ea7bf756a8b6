#!/usr/bin/env python3
"""A retraining webhook receiver for modelgate's drift events.

It verifies each delivery's Standard Webhooks signature, answers at once (204), skips
events it has already handled (by webhook-id: deliveries are at least once), and on a
`model.drift` event retrains the model on fresh labelled data, exports it to ONNX,
profiles it with `modelgate profile`, and publishes it as the next version of the model
by an atomic rename into the registry. modelgate picks the new version up like any
other: drift -> webhook -> retrain -> new version -> served.

    examples/retrain/run.sh --secret whsec_... --repository models --model iris \
        --data fresh.csv --port 9000 --modelgate target/release/modelgate

The data CSV has the model's features and a last `species` column (the label).
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


def train_and_export(data: Path, out: Path) -> None:
    """Fits a logistic regression on the CSV and writes the ONNX model to `out`."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    table = np.loadtxt(data, delimiter=",", skiprows=1, dtype=np.float64)
    X, y = table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)
    est = LogisticRegression(max_iter=1000, random_state=0).fit(X, y)
    onx = to_onnx(
        est,
        initial_types=[("X", FloatTensorType([None, X.shape[1]]))],
        target_opset={"": 17, "ai.onnx.ml": 3},
        options={id(est): {"zipmap": False}},
    )
    out.write_bytes(onx.SerializeToString())
    return float(est.score(X, y))


def publish(args, reason: str) -> int:
    """Retrains and publishes the next version; returns its number."""
    model_dir = Path(args.repository) / args.model
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    version = max(versions, default=0) + 1
    # Staged on the registry's filesystem (a hidden folder is not a model), so that the
    # final rename is atomic: modelgate never sees half a version.
    staging = Path(args.repository) / ".staging" / args.model
    vdir = staging / str(version)
    shutil.rmtree(vdir, ignore_errors=True)
    vdir.mkdir(parents=True)
    accuracy = train_and_export(Path(args.data), vdir / "model.onnx")
    # Lineage (model.toml): what modelgate shows in metadata, the index, the audit log
    # and webhook events. JSON strings are valid TOML basic strings.
    lineage = [
        'source = "examples/retrain"',
        f"training_data = {json.dumps(str(Path(args.data).resolve()))}",
        f"created_at = {json.dumps(time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))}",
    ]
    if versions:
        lineage.append(f"parent_version = {max(versions)}")
    lineage += ["[metrics]", f"training_accuracy = {accuracy!r}",
                "[tags]", f"reason = {json.dumps(reason)}"]
    (vdir / "model.toml").write_text("\n".join(lineage) + "\n")
    # The profile of the fresh training data: the new version's drift reference.
    features = Path(args.data).with_suffix(".features.csv")
    with open(args.data) as src, open(features, "w") as dst:
        for line in src:
            dst.write(",".join(line.rstrip("\n").split(",")[:-1]) + "\n")
    subprocess.run(
        [args.modelgate, "profile", "--model-repository", str(staging.parent),
         "--model", args.model, "--version", str(version), "--data", str(features)],
        check=True,
    )
    os.rename(vdir, model_dir / str(version))
    print(f"published {args.model} version {version} ({reason})", flush=True)
    return version


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--secret", required=True, help="whsec_... (the target's secret)")
    ap.add_argument("--repository", required=True, help="the model registry")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="fresh labelled data (CSV)")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--modelgate", default="modelgate", help="the modelgate binary")
    args = ap.parse_args()
    seen: set[str] = set()
    lock = threading.Lock()

    def retrain(event: dict) -> None:
        data = event.get("data", {})
        names = [e.get("feature") for e in data.get("evidence", [])]
        try:
            publish(args, f"drift in {', '.join(n for n in names if n)}")
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
