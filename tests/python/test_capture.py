"""Inference capture read back with pyarrow: the dataset equals what was sent and
answered, row for row, for every datatype the gateway serves, over gRPC and HTTP.

The server runs on a repository of its own (the `types` fixture: one identity per
datatype) with `[capture] enabled = true`; `POST /admin/capture/flush` closes the
files, and pyarrow reads `<capture dir>/types/1` as a dataset, as a retrainer would.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import REPO_ROOT, _free_ports, _server_env, _stop, modelgate_bin

TYPES = {
    "bool": ("BOOL", np.bool_),
    "int8": ("INT8", np.int8),
    "int16": ("INT16", np.int16),
    "int32": ("INT32", np.int32),
    "int64": ("INT64", np.int64),
    "uint8": ("UINT8", np.uint8),
    "uint16": ("UINT16", np.uint16),
    "uint32": ("UINT32", np.uint32),
    "uint64": ("UINT64", np.uint64),
    "fp16": ("FP16", np.float16),
    "fp32": ("FP32", np.float32),
    "fp64": ("FP64", np.float64),
}


def _data(kind, rows: int, rng) -> np.ndarray:
    if kind is np.bool_:
        return rng.integers(0, 2, size=(rows, 3)).astype(np.bool_)
    if np.issubdtype(kind, np.integer):
        info = np.iinfo(kind)
        return rng.integers(info.min, info.max, size=(rows, 3), dtype=kind, endpoint=True)
    return rng.standard_normal(size=(rows, 3)).astype(kind)


@pytest.fixture(scope="module")
def capture_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("capture")
    repo = root / "repo"
    (repo / "types").mkdir(parents=True)
    os.symlink(REPO_ROOT / "tests/fixtures/repo/types/1", repo / "types" / "1")
    (repo / "types" / "config.toml").write_text("[capture]\nenabled = true\nsample_rate = 1.0\n")
    capture_dir = root / "capture"
    http_port, grpc_port, metrics_port = _free_ports(3)
    config = root / "modelgate.toml"
    config.write_text(
        f'model_repository = "{repo}"\nhost = "127.0.0.1"\n'
        f"http_port = {http_port}\ngrpc_port = {grpc_port}\nmetrics_port = {metrics_port}\n"
        f'[capture]\ndir = "{capture_dir}"\n'
    )
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [str(modelgate_bin()), "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_server_env(),
    )
    log.close()
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (root / "server.log").read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "modelgate did not become ready"
        time.sleep(0.2)
    try:
        yield http_port, grpc_port, capture_dir
    finally:
        _stop(proc)


def test_captured_dataset_equals_what_was_sent_and_answered(capture_server):
    http_port, grpc_port, capture_dir = capture_server
    rng = np.random.default_rng(17)
    sent = {}  # id -> (inputs, outputs, protocol)
    clients = {
        "grpc": (grpcclient, grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")),
        "http": (httpclient, httpclient.InferenceServerClient(url=f"127.0.0.1:{http_port}")),
    }
    for i in range(40):
        proto = "grpc" if i % 2 == 0 else "http"
        mod, client = clients[proto]
        rows = 1 + i % 3
        feeds = {f"in_{n}": _data(kind, rows, rng) for n, (_, kind) in TYPES.items()}
        inputs = []
        for n, (dt, _) in TYPES.items():
            inp = mod.InferInput(f"in_{n}", [rows, 3], dt)
            inp.set_data_from_numpy(feeds[f"in_{n}"])
            inputs.append(inp)
        rid = f"{proto}-{i}"
        result = client.infer("types", inputs, request_id=rid)
        outputs = {f"out_{n}": result.as_numpy(f"out_{n}") for n in TYPES}
        resp = result.get_response()
        assert (resp["id"] if proto == "http" else resp.id) == rid
        sent[rid] = (feeds, outputs)
    # A request without an id gets one, returned in the body and x-request-id.
    body = json.dumps(
        {
            "inputs": [
                {"name": f"in_{n}", "shape": [1, 3], "datatype": dt,
                 "data": [True, False, True] if dt == "BOOL" else [1, 2, 3]}
                for n, (dt, _) in TYPES.items()
            ]
        }
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v2/models/types/infer", data=body,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        generated = r.headers["x-request-id"]
        assert json.loads(r.read())["id"] == generated
    assert generated.startswith("gen-")

    flush = urllib.request.Request(f"http://127.0.0.1:{http_port}/admin/capture/flush", data=b"{}", method="POST")
    with urllib.request.urlopen(flush) as r:
        assert r.status == 200

    dataset = ds.dataset(capture_dir / "types" / "1", format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == len(sent) + 1
    assert "date" in table.column_names  # the hive partition
    rows = {r["id"]: r for r in table.to_pylist()}
    assert generated in rows
    for rid, (feeds, outputs) in sent.items():
        row = rows[rid]
        assert row["model"] == "types"
        assert row["version"] == 1
        assert row["variant"] == "stable"
        assert row["error"] is None
        for name, want in list(feeds.items()) + list(outputs.items()):
            # FP16 is stored as float32: every FP16 value is exactly a float32 value.
            as_type = np.float32 if want.dtype == np.float16 else want.dtype
            got = np.array(row[name], dtype=as_type).reshape(row[f"{name}__shape"])
            assert list(got.shape) == list(want.shape), (rid, name)
            np.testing.assert_array_equal(got, want.astype(as_type), err_msg=f"{rid} {name}")
    # The element types are the tensors' own (FP16 as float32).
    schema = dataset.schema
    assert str(schema.field("in_int8").type) == "list<item: int8>"
    assert str(schema.field("in_uint64").type) == "list<item: uint64>"
    assert str(schema.field("in_fp16").type) == "list<item: float>"
    assert str(schema.field("in_bool").type) == "list<item: bool>"
    assert str(schema.field("time").type) == "timestamp[ms, tz=UTC]"
    # pandas reads it as it is.
    df = table.to_pandas()
    assert len(df) == len(sent) + 1
    for _, client in clients.values():
        client.close()
