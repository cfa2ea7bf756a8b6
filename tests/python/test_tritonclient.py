"""Compatibility tests: NVIDIA's standard `tritonclient` against modelgate.

Every test runs over both tritonclient.grpc and tritonclient.http. Inference
outputs are compared with the onnxruntime Python package run on the same model
files the server loads.
"""

from __future__ import annotations

import asyncio
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from tritonclient.utils import InferenceServerException

# model -> (inputs {name: (datatype, feature dim)}, outputs {name: datatype})
MODELS = {
    "iris": ({"X": ("FP32", 4)}, {"label": "INT64", "probabilities": "FP32"}),
    "mlp": ({"input": ("FP32", 16)}, {"output": "FP32"}),
}
MODEL_VERSIONS = [("iris", "1"), ("iris", "2"), ("mlp", "1")]
PROTOCOLS = ["grpc", "http"]

RTOL = 1e-5
ATOL = 1e-6


# ---------------------------------------------------------------- helpers


@pytest.fixture(params=PROTOCOLS)
def proto(request):
    return request.param


@pytest.fixture
def client(proto, request):
    return request.getfixturevalue(f"{proto}_client")


def module_for(proto):
    return grpcclient if proto == "grpc" else httpclient


def random_inputs(model: str, rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs, _ = MODELS[model]
    feeds = {}
    for name, (_, dim) in inputs.items():
        if model == "iris":
            # roughly the range of the iris features (cm)
            data = rng.uniform(0.1, 8.0, size=(rows, dim))
        else:
            data = rng.standard_normal(size=(rows, dim))
        feeds[name] = data.astype(np.float32)
    return feeds


def make_infer_inputs(mod, feeds, binary_data=None, datatype=None):
    result = []
    for name, arr in feeds.items():
        dt = datatype or "FP32"
        inp = mod.InferInput(name, list(arr.shape), dt)
        if binary_data is None:
            inp.set_data_from_numpy(arr)
        else:
            inp.set_data_from_numpy(arr, binary_data=binary_data)
        result.append(inp)
    return result


def make_requested_outputs(mod, names, binary_data=None):
    if names is None:
        return None
    if binary_data is None:
        return [mod.InferRequestedOutput(n) for n in names]
    return [mod.InferRequestedOutput(n, binary_data=binary_data) for n in names]


def response_dict(proto, result) -> dict:
    """The infer response as a dict with `id`, `model_name`, `model_version`, output names."""
    if proto == "grpc":
        resp = result.get_response()  # protobuf ModelInferResponse
        return {
            "id": resp.id,
            "model_name": resp.model_name,
            "model_version": resp.model_version,
            "outputs": [o.name for o in resp.outputs],
        }
    resp = result.get_response()  # dict
    return {
        "id": resp.get("id"),
        "model_name": resp.get("model_name"),
        "model_version": resp.get("model_version"),
        "outputs": [o["name"] for o in resp.get("outputs", [])],
    }


def assert_outputs_match(model, got: dict[str, np.ndarray], expected: dict[str, np.ndarray], names=None):
    _, outputs = MODELS[model]
    for name in names or outputs:
        g = got.get(name)
        e = expected[name]
        assert g is not None, f"output {name!r} missing from the response"
        assert tuple(g.shape) == tuple(e.shape), f"{name}: shape {g.shape} != reference {e.shape}"
        if outputs[name] == "INT64":
            assert g.dtype == np.int64, f"{name}: dtype {g.dtype}, expected int64"
            np.testing.assert_array_equal(g, e, err_msg=f"{name} differs from onnxruntime")
        else:
            assert g.dtype == np.float32, f"{name}: dtype {g.dtype}, expected float32"
            assert np.allclose(g, e, rtol=RTOL, atol=ATOL), (
                f"{name} differs from onnxruntime:\nserver={g}\nreference={e}"
            )


def collect(result, model, names=None):
    _, outputs = MODELS[model]
    return {n: result.as_numpy(n) for n in (names or outputs)}


# ---------------------------------------------------------------- health & metadata


def test_server_live(client):
    assert client.is_server_live() is True


def test_server_ready(client):
    assert client.is_server_ready() is True


@pytest.mark.parametrize("version", ["", "1", "2"])
def test_model_ready(client, version):
    assert client.is_model_ready("iris", version) is True
    assert client.is_model_ready("mlp") is True


def test_server_metadata(client, proto):
    md = client.get_server_metadata()
    if proto == "grpc":
        name, version, extensions = md.name, md.version, list(md.extensions)
    else:
        name, version, extensions = md["name"], md["version"], md.get("extensions", [])
    assert name, f"server metadata has no name: {md}"
    assert version, f"server metadata has no version: {md}"
    assert isinstance(extensions, list)


def _tensor_md(proto, tensors):
    if proto == "grpc":
        return {t.name: (t.datatype, list(t.shape)) for t in tensors}
    return {t["name"]: (t["datatype"], list(t["shape"])) for t in tensors}


@pytest.mark.parametrize("version", ["", "1", "2"])
def test_model_metadata_iris(client, proto, version):
    md = client.get_model_metadata("iris", version)
    if proto == "grpc":
        name, versions, inputs, outputs = md.name, list(md.versions), md.inputs, md.outputs
    else:
        name, versions, inputs, outputs = md["name"], md.get("versions", []), md["inputs"], md["outputs"]
    assert name == "iris"
    assert "1" in versions and "2" in versions, f"versions={versions}"
    assert _tensor_md(proto, inputs) == {"X": ("FP32", [-1, 4])}
    assert _tensor_md(proto, outputs) == {
        "label": ("INT64", [-1]),
        "probabilities": ("FP32", [-1, 3]),
    }


def test_model_metadata_mlp(client, proto):
    md = client.get_model_metadata("mlp")
    if proto == "grpc":
        name, versions, inputs, outputs = md.name, list(md.versions), md.inputs, md.outputs
    else:
        name, versions, inputs, outputs = md["name"], md.get("versions", []), md["inputs"], md["outputs"]
    assert name == "mlp"
    assert "1" in versions
    assert _tensor_md(proto, inputs) == {"input": ("FP32", [-1, 16])}
    assert _tensor_md(proto, outputs) == {"output": ("FP32", [-1, 4])}


def test_model_config(client, proto):
    cfg = client.get_model_config("iris")
    name = cfg.config.name if proto == "grpc" else cfg["name"]
    assert name == "iris"


def test_lineage_parameters(client, proto):
    """iris/2 has a model.toml: its lineage is in the metadata's `parameters` (a
    modelgate extension, field 6 over gRPC as MLServer has it) and in Triton's config
    `parameters`; the stock clients parse both."""
    md = client.get_model_metadata("iris", "2")
    cfg = client.get_model_config("iris", "2")
    if proto == "grpc":
        # The upstream proto has no such field: the client skips it and keeps the rest.
        assert md.name == "iris" and [t.name for t in md.inputs] == ["X"]
        assert b"lineage.parent_version" in md.SerializeToString()
        params = cfg.config.parameters
        assert params["lineage.parent_version"].string_value == "1"
        assert params["lineage.metrics.training_accuracy"].string_value == "0.987"
    else:
        assert md["name"] == "iris"
        assert md["parameters"]["lineage.parent_version"] == "1"
        assert md["parameters"]["lineage.source"] == "models/generate.py"
        assert cfg["parameters"]["lineage.parent_version"] == {"string_value": "1"}
    # A version without model.toml has no lineage parameters.
    md1 = client.get_model_metadata("iris", "1")
    if proto == "grpc":
        assert b"lineage." not in md1.SerializeToString()
    else:
        assert "parameters" not in md1


def _stats_entries(proto, stats):
    """[(name, version, success_count)] from a statistics response."""
    if proto == "grpc":
        return [(s.name, s.version, int(s.inference_stats.success.count)) for s in stats.model_stats]
    return [
        (
            s["name"],
            s.get("version", ""),
            int(s.get("inference_stats", {}).get("success", {}).get("count", 0)),
        )
        for s in stats["model_stats"]
    ]


def test_inference_statistics(client, proto):
    stats = client.get_inference_statistics("iris")
    entries = _stats_entries(proto, stats)
    assert entries, f"no model_stats returned: {stats}"
    assert all(name == "iris" for name, _, _ in entries), entries


def test_inference_statistics_count_success(client, proto):
    mod = module_for(proto)
    feeds = random_inputs("iris", 2, seed=7)

    def success_v1():
        stats = client.get_inference_statistics("iris", "1")
        entries = [e for e in _stats_entries(proto, stats) if e[0] == "iris" and e[1] in ("1", "")]
        assert entries, f"no statistics for iris version 1: {stats}"
        return entries[0][2]

    before = success_v1()
    client.infer("iris", make_infer_inputs(mod, feeds), model_version="1")
    after = success_v1()
    assert after >= before + 1, f"success count did not increase: before={before} after={after}"


def _executions(proto, stats):
    """(inference_count, execution_count, {batch_size: count}) of the one version in a
    statistics response, checking that every batch_stats entry counts each phase once
    per execution."""
    if proto == "grpc":
        (s,) = stats.model_stats
        batches = [
            (b.batch_size, b.compute_input.count, b.compute_infer.count, b.compute_output.count, b.compute_infer.ns)
            for b in s.batch_stats
        ]
        counts = (int(s.inference_count), int(s.execution_count))
    else:
        (s,) = stats["model_stats"]
        batches = [
            (
                b["batch_size"],
                b["compute_input"]["count"],
                b["compute_infer"]["count"],
                b["compute_output"]["count"],
                b["compute_infer"]["ns"],
            )
            for b in s["batch_stats"]
        ]
        counts = (int(s["inference_count"]), int(s["execution_count"]))
    sizes = {}
    for size, n_input, n_infer, n_output, ns in batches:
        assert n_input == n_infer == n_output, batches
        assert ns > 0, batches
        assert size not in sizes, f"batch size {size} listed twice: {batches}"
        sizes[int(size)] = int(n_infer)
    return counts[0], counts[1], sizes


def test_inference_statistics_batch_stats(client, proto):
    """inference_count counts rows, execution_count model executions, and batch_stats
    one entry per executed batch size that adds up to both."""
    mod = module_for(proto)
    rows = 4
    inferences0, executions0, sizes0 = _executions(proto, client.get_inference_statistics("mlp", "1"))
    client.infer("mlp", make_infer_inputs(mod, random_inputs("mlp", rows, seed=11)), model_version="1")
    inferences, executions, sizes = _executions(proto, client.get_inference_statistics("mlp", "1"))
    # One request of 4 rows, alone in the queue: one execution of batch size 4.
    assert inferences - inferences0 == rows
    assert executions - executions0 == 1
    assert sizes.get(rows, 0) - sizes0.get(rows, 0) == 1, (sizes0, sizes)
    assert sum(size * n for size, n in sizes.items()) == inferences, sizes
    assert sum(sizes.values()) == executions, sizes
    assert executions < inferences


def test_metrics_endpoint(metrics_url):
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body = resp.read().decode("utf-8", errors="replace")
    assert body.strip(), "empty metrics body"


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("model,version", MODEL_VERSIONS)
def test_infer_grpc(grpc_client, reference, model, version, rows):
    feeds = random_inputs(model, rows, seed=rows * 100 + int(version))
    expected = reference.run(model, version, feeds)

    # default: no outputs requested -> all outputs returned (raw_output_contents)
    result = grpc_client.infer(model, make_infer_inputs(grpcclient, feeds), model_version=version)
    assert_outputs_match(model, collect(result, model), expected)

    # all outputs explicitly requested
    _, outputs = MODELS[model]
    result = grpc_client.infer(
        model,
        make_infer_inputs(grpcclient, feeds),
        model_version=version,
        outputs=make_requested_outputs(grpcclient, list(outputs)),
    )
    assert_outputs_match(model, collect(result, model), expected)


@pytest.mark.parametrize("binary_out", [True, False], ids=["out-binary", "out-json"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["in-binary", "in-json"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("model,version", MODEL_VERSIONS)
def test_infer_http(http_client, reference, model, version, rows, binary_in, binary_out):
    feeds = random_inputs(model, rows, seed=rows * 100 + int(version))
    expected = reference.run(model, version, feeds)
    _, outputs = MODELS[model]
    result = http_client.infer(
        model,
        make_infer_inputs(httpclient, feeds, binary_data=binary_in),
        model_version=version,
        outputs=make_requested_outputs(httpclient, list(outputs), binary_data=binary_out),
    )
    assert_outputs_match(model, collect(result, model), expected)
    # binary outputs must carry the binary_data_size parameter, JSON outputs must carry data
    for out in result.get_response()["outputs"]:
        params = out.get("parameters", {})
        if binary_out:
            assert "binary_data_size" in params, f"output {out['name']} not binary: {out}"
        else:
            assert "data" in out, f"output {out['name']} has no JSON data: {out}"


COMPRESSION = [None, "gzip", "deflate"]


@pytest.mark.parametrize("response_alg", COMPRESSION, ids=lambda a: f"resp-{a}")
@pytest.mark.parametrize("request_alg", COMPRESSION, ids=lambda a: f"req-{a}")
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_http_compression(http_client, reference, binary, request_alg, response_alg):
    """request_compression_algorithm / response_compression_algorithm, as Triton serves
    them: the binary extension's header length counts the decompressed body."""
    feeds = random_inputs("mlp", 200, seed=77)
    expected = reference.run("mlp", "1", feeds)
    result = http_client.infer(
        "mlp",
        make_infer_inputs(httpclient, feeds, binary_data=binary),
        model_version="1",
        outputs=make_requested_outputs(httpclient, ["output"], binary_data=binary),
        request_compression_algorithm=request_alg,
        response_compression_algorithm=response_alg,
    )
    assert_outputs_match("mlp", collect(result, "mlp"), expected)


@pytest.mark.parametrize("alg", ["gzip", "deflate"])
def test_infer_http_aio_compression(http_url, reference, alg):
    feeds = random_inputs("mlp", 200, seed=78)
    expected = reference.run("mlp", "1", feeds)

    async def main():
        client = httpclient_aio.InferenceServerClient(url=http_url)
        try:
            return await client.infer(
                "mlp",
                make_infer_inputs(httpclient_aio, feeds, binary_data=True),
                model_version="1",
                request_compression_algorithm=alg,
                response_compression_algorithm=alg,
            )
        finally:
            await client.close()

    result = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert_outputs_match("mlp", collect(result, "mlp"), expected)


@pytest.mark.parametrize("alg", ["gzip", "deflate"])
def test_http_response_compression_is_applied(http_url, alg):
    """What tritonclient asks for is what the server sends (not just tolerated)."""
    import gzip
    import json
    import zlib

    feeds = random_inputs("mlp", 200, seed=79)["input"]
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [200, 16], "datatype": "FP32", "data": feeds.ravel().tolist()}]}
    ).encode()
    req = urllib.request.Request(
        f"http://{http_url}/v2/models/mlp/infer",
        data=gzip.compress(body),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip", "Accept-Encoding": alg},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Encoding"] == alg
        raw = resp.read()
    plain = gzip.decompress(raw) if alg == "gzip" else zlib.decompress(raw)
    assert len(raw) < len(plain)
    out = json.loads(plain)["outputs"][0]
    assert out["name"] == "output" and out["shape"] == [200, 4]


@pytest.mark.parametrize("binary_in", [True, False], ids=["in-binary", "in-json"])
def test_infer_http_no_requested_outputs(http_client, reference, binary_in):
    """Without `outputs` the server returns every output (as JSON by default)."""
    feeds = random_inputs("iris", 3, seed=11)
    expected = reference.run("iris", "1", feeds)
    result = http_client.infer(
        "iris", make_infer_inputs(httpclient, feeds, binary_data=binary_in), model_version="1"
    )
    assert_outputs_match("iris", collect(result, "iris"), expected)


def test_infer_default_version(client, proto, reference):
    """No version given: the server picks one; the response says which."""
    mod = module_for(proto)
    feeds = random_inputs("iris", 4, seed=5)
    result = client.infer("iris", make_infer_inputs(mod, feeds))
    resp = response_dict(proto, result)
    assert resp["model_version"] in ("1", "2"), resp
    expected = reference.run("iris", resp["model_version"], feeds)
    assert_outputs_match("iris", collect(result, "iris"), expected)


def test_requested_output_subset(client, proto, reference):
    mod = module_for(proto)
    feeds = random_inputs("iris", 5, seed=3)
    expected = reference.run("iris", "1", feeds)
    result = client.infer(
        "iris",
        make_infer_inputs(mod, feeds),
        model_version="1",
        outputs=[mod.InferRequestedOutput("probabilities")],
    )
    resp = response_dict(proto, result)
    assert resp["outputs"] == ["probabilities"], f"expected only probabilities, got {resp['outputs']}"
    assert result.as_numpy("label") is None
    assert_outputs_match("iris", collect(result, "iris", ["probabilities"]), expected, ["probabilities"])


def test_request_id_echoed(client, proto):
    mod = module_for(proto)
    feeds = random_inputs("iris", 1, seed=1)
    result = client.infer("iris", make_infer_inputs(mod, feeds), request_id="abc-123")
    if proto == "grpc":
        assert result.get_response().id == "abc-123"
    else:
        assert result.get_response()["id"] == "abc-123"


def test_reference_versions_differ(reference):
    """Self-check: iris v1 and v2 disagree, so the per-version comparisons can tell them apart."""
    feeds = random_inputs("iris", 5, seed=1)
    a = reference.run("iris", "1", feeds)["probabilities"]
    b = reference.run("iris", "2", feeds)["probabilities"]
    assert not np.allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("model,version", MODEL_VERSIONS)
def test_model_name_and_version_in_response(client, proto, model, version):
    mod = module_for(proto)
    feeds = random_inputs(model, 2, seed=2)
    result = client.infer(model, make_infer_inputs(mod, feeds), model_version=version)
    resp = response_dict(proto, result)
    assert resp["model_name"] == model, resp
    assert resp["model_version"] == version, resp


# ---------------------------------------------------------------- errors


def _expect_error(client, proto, model, inputs, version="", outputs=None) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(model, inputs, model_version=version, outputs=outputs)
    exc = excinfo.value
    msg = exc.message() or ""
    assert len(msg.strip()) >= 5, f"error message is not informative: {exc!s}"
    return exc


def _assert_mentions(exc, *words):
    msg = (exc.message() or "").lower()
    assert any(w.lower() in msg for w in words), f"message {exc.message()!r} mentions none of {words}"


def _grpc_code(exc) -> str:
    # tritonclient reports gRPC status as str(grpc.StatusCode.X) == "StatusCode.X"
    return (exc.status() or "").replace("StatusCode.", "")


def test_error_unknown_model(client, proto):
    mod = module_for(proto)
    feeds = random_inputs("iris", 1, seed=0)
    exc = _expect_error(client, proto, "nope", make_infer_inputs(mod, feeds))
    _assert_mentions(exc, "nope")
    if proto == "http":
        assert exc.status() == "404", f"status {exc.status()} for unknown model: {exc}"
    else:
        assert _grpc_code(exc) in ("NOT_FOUND", "UNAVAILABLE"), f"gRPC status {exc.status()}: {exc}"


def test_error_unknown_version(client, proto):
    mod = module_for(proto)
    feeds = random_inputs("iris", 1, seed=0)
    exc = _expect_error(client, proto, "iris", make_infer_inputs(mod, feeds), version="99")
    _assert_mentions(exc, "99")
    if proto == "http":
        assert exc.status() in ("404", "400"), f"status {exc.status()} for unknown version: {exc}"
    else:
        assert _grpc_code(exc) in ("NOT_FOUND", "UNAVAILABLE", "INVALID_ARGUMENT"), (
            f"gRPC status {exc.status()}: {exc}"
        )


def _assert_bad_input_status(exc, proto):
    if proto == "http":
        assert exc.status() == "400", f"status {exc.status()} for a bad input: {exc}"
    else:
        assert _grpc_code(exc) == "INVALID_ARGUMENT", f"gRPC status {exc.status()}: {exc}"


def test_error_wrong_input_name(client, proto):
    mod = module_for(proto)
    x = random_inputs("iris", 2, seed=0)["X"]
    exc = _expect_error(client, proto, "iris", make_infer_inputs(mod, {"Y": x}), version="1")
    _assert_mentions(exc, "'Y'", '"Y"', " Y", "X")
    _assert_bad_input_status(exc, proto)


def test_error_wrong_datatype(client, proto):
    mod = module_for(proto)
    x = random_inputs("iris", 2, seed=0)["X"].astype(np.float64)
    exc = _expect_error(
        client, proto, "iris", make_infer_inputs(mod, {"X": x}, datatype="FP64"), version="1"
    )
    _assert_mentions(exc, "FP64", "FP32", "datatype", "data-type", "data type", "dtype")
    _assert_bad_input_status(exc, proto)


def test_error_wrong_shape(client, proto):
    mod = module_for(proto)
    x = np.zeros((2, 5), dtype=np.float32)
    exc = _expect_error(client, proto, "iris", make_infer_inputs(mod, {"X": x}), version="1")
    _assert_mentions(exc, "shape", "[2,5]", "[2, 5]", "dims", "dimension")
    _assert_bad_input_status(exc, proto)


@pytest.mark.parametrize("binary_in", [True, False], ids=["in-binary", "in-json"])
def test_error_http_bad_inputs_both_encodings(http_client, binary_in):
    """The bad-input errors also hold for both HTTP input encodings."""
    x = random_inputs("iris", 2, seed=0)["X"]
    cases = [
        make_infer_inputs(httpclient, {"Y": x}, binary_data=binary_in),
        make_infer_inputs(httpclient, {"X": x.astype(np.float64)}, binary_data=binary_in, datatype="FP64"),
        make_infer_inputs(httpclient, {"X": np.zeros((2, 5), np.float32)}, binary_data=binary_in),
    ]
    for inputs in cases:
        exc = _expect_error(http_client, "http", "iris", inputs, version="1")
        _assert_bad_input_status(exc, "http")


def test_server_still_healthy_after_errors(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris")


# ---------------------------------------------------------------- concurrency

N_CONCURRENT = 200


def _concurrent_cases(reference):
    cases = []
    for i in range(N_CONCURRENT):
        model, version = MODEL_VERSIONS[i % len(MODEL_VERSIONS)]
        rows = 1 + (i % 5)
        feeds = random_inputs(model, rows, seed=10_000 + i)
        cases.append((model, version, feeds, reference.run(model, version, feeds)))
    return cases


def _check_concurrent_results(results, cases):
    failures = []
    for i, (res, (model, version, _feeds, expected)) in enumerate(zip(results, cases)):
        if isinstance(res, BaseException):
            failures.append(f"request {i} ({model} v{version}) raised {res!r}")
            continue
        try:
            assert_outputs_match(model, res, expected)
        except AssertionError as e:
            failures.append(f"request {i} ({model} v{version}): {e}")
    assert not failures, f"{len(failures)}/{len(cases)} concurrent requests failed:\n" + "\n".join(
        failures[:10]
    )


def test_concurrent_grpc_aio(grpc_url, reference):
    cases = _concurrent_cases(reference)

    async def main():
        client = grpcclient_aio.InferenceServerClient(url=grpc_url)
        try:

            async def one(i, model, version, feeds):
                result = await client.infer(
                    model,
                    make_infer_inputs(grpcclient_aio, feeds),
                    model_version=version,
                    request_id=f"grpc-{i}",
                )
                assert result.get_response().id == f"grpc-{i}"
                return collect(result, model)

            return await asyncio.gather(
                *(one(i, m, v, f) for i, (m, v, f, _) in enumerate(cases)), return_exceptions=True
            )
        finally:
            await client.close()

    results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    _check_concurrent_results(results, cases)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_concurrent_http_aio(http_url, reference, binary):
    cases = _concurrent_cases(reference)

    async def main():
        client = httpclient_aio.InferenceServerClient(url=http_url, conn_limit=N_CONCURRENT)
        try:

            async def one(i, model, version, feeds):
                _, outputs = MODELS[model]
                result = await client.infer(
                    model,
                    make_infer_inputs(httpclient_aio, feeds, binary_data=binary),
                    model_version=version,
                    outputs=make_requested_outputs(httpclient_aio, list(outputs), binary_data=binary),
                    request_id=f"http-{i}",
                )
                assert result.get_response()["id"] == f"http-{i}"
                return collect(result, model)

            return await asyncio.gather(
                *(one(i, m, v, f) for i, (m, v, f, _) in enumerate(cases)), return_exceptions=True
            )
        finally:
            await client.close()

    results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    _check_concurrent_results(results, cases)
