#!/usr/bin/env python3
"""Regenerate the modelgate test model registry deterministically.

Writes (relative to this file's directory):
    iris/1/model.onnx   sklearn LogisticRegression on iris (skl2onnx, zipmap off)
    iris/2/model.onnx   sklearn RandomForestClassifier on iris (small)
    mlp/1/model.onnx    hand-built 16 -> 32 -> 32 -> 4 MLP (onnx.helper)
    iris/reference.csv  the iris training data (header + 150 rows): the data the drift
                        profiles iris/*/profile.json are made from (regenerate.sh runs
                        `modelgate profile` on it)

Interfaces:
    iris/*: input  X             FP32  [-1, 4]
            output label         INT64 [-1]
            output probabilities FP32  [-1, 3]
    mlp/1:  input  input         FP32  [-1, 16]
            output output        FP32  [-1, 4]

Everything uses fixed seeds, fixed opsets and fixed metadata, so running
this twice (with the pinned requirements.txt) yields byte-identical files.

Usage: python generate.py [--check]
    --check  after writing, load each model with onnxruntime (if installed),
             run a batch and print the interface / sanity checks.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent

# ONNX Runtime 1.31 supports far newer opsets; we pin conservative ones so
# any reasonably recent runtime loads these files.
OPSET = 17  # default ("ai.onnx") domain
ML_OPSET = 3  # cap for "ai.onnx.ml" (skl2onnx picks the lowest it needs)
IR_VERSION = 8  # IR version matching opset 17 (onnx 1.12)
PRODUCER = "modelgate/models/generate.py"
SEED = 0


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _finalize(model: onnx.ModelProto, *, name: str, doc: str) -> onnx.ModelProto:
    """Pin all metadata that could otherwise vary between tool versions/runs."""
    model.ir_version = IR_VERSION
    model.producer_name = PRODUCER
    model.producer_version = "1"
    model.domain = "modelgate.test"
    model.model_version = 1
    model.doc_string = doc
    model.graph.name = name
    del model.metadata_props[:]
    # skl2onnx may list the same opset import twice; keep one per domain,
    # sorted by domain so the order is stable.
    opsets: dict[str, int] = {}
    for op in model.opset_import:
        opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    del model.opset_import[:]
    for domain in sorted(opsets):
        model.opset_import.append(helper.make_opsetid(domain, opsets[domain]))
    onnx.checker.check_model(model, full_check=True)
    return model


def _save(model: onnx.ModelProto, rel: str) -> Path:
    path = ROOT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    # SerializeToString(deterministic=True) keeps map ordering stable.
    data = model.SerializeToString(deterministic=True)
    tmp = path.with_suffix(".onnx.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    print(f"wrote {rel} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")
    return path


def _rename_io(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """Rename graph inputs/outputs (and every reference to them)."""
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name in mapping:
            vi.name = mapping[vi.name]
    for node in g.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]


# --------------------------------------------------------------------------
# iris (sklearn -> skl2onnx)
# --------------------------------------------------------------------------

def _iris_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_iris  # bundled with sklearn, no download

    iris = load_iris()
    return iris.data.astype(np.float32), iris.target.astype(np.int64)


def iris_estimator(version: int):
    """Fitted sklearn estimator for iris/<version> (deterministic)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    if version == 1:
        est = LogisticRegression(max_iter=1000, random_state=SEED)
    elif version == 2:
        est = RandomForestClassifier(
            n_estimators=10, max_depth=4, random_state=SEED, n_jobs=1
        )
    else:
        raise ValueError(version)
    X, y = _iris_data()
    return est.fit(X, y)


def _iris_model(estimator, *, name: str, doc: str) -> onnx.ModelProto:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    model = to_onnx(
        estimator,
        initial_types=[("X", FloatTensorType([None, 4]))],
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
        options={id(estimator): {"zipmap": False}},
        naming=name + "_",  # deterministic node-name prefix
    )
    # skl2onnx already names the outputs label/probabilities; enforce it in
    # case a future converter version changes the defaults.
    outs = [o.name for o in model.graph.output]
    if outs != ["label", "probabilities"]:
        _rename_io(model, dict(zip(outs, ["label", "probabilities"])))
    # Make the batch dimension explicitly dynamic with a stable symbolic name.
    for vi in list(model.graph.input) + list(model.graph.output):
        d0 = vi.type.tensor_type.shape.dim[0]
        d0.Clear()
        d0.dim_param = "N"
    return _finalize(model, name=name, doc=doc)


def build_iris_v1() -> onnx.ModelProto:
    return _iris_model(
        iris_estimator(1),
        name="iris_v1",
        doc="iris LogisticRegression(max_iter=1000); input X f32[N,4]; "
        "outputs label i64[N], probabilities f32[N,3]",
    )


def build_iris_v2() -> onnx.ModelProto:
    return _iris_model(
        iris_estimator(2),
        name="iris_v2",
        doc="iris RandomForestClassifier(n_estimators=10, max_depth=4); input X "
        "f32[N,4]; outputs label i64[N], probabilities f32[N,3]",
    )


# --------------------------------------------------------------------------
# MLP (hand-built with onnx.helper)
# --------------------------------------------------------------------------

def build_mlp(
    dims: list[int],
    *,
    name: str,
    seed: int = SEED,
    scale: float | None = 0.3,
    doc: str = "",
) -> onnx.ModelProto:
    """Gemm(+Relu) stack: dims = [in, h1, ..., out]. Last layer has no Relu.

    Weights ~ N(0, scale^2) (or He-init std sqrt(2/fan_in) when scale is None),
    biases ~ N(0, (scale/10)^2), drawn from np.random.default_rng(seed).
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    cur = "input"
    n_layers = len(dims) - 1
    for i in range(n_layers):
        fan_in, fan_out = dims[i], dims[i + 1]
        std = scale if scale is not None else float(np.sqrt(2.0 / fan_in))
        # Gemm with transB=1 -> weight stored as [out, in] (PyTorch layout).
        w = (rng.standard_normal((fan_out, fan_in)) * std).astype(np.float32)
        b = (rng.standard_normal((fan_out,)) * std * 0.1).astype(np.float32)
        wn, bn = f"fc{i + 1}.weight", f"fc{i + 1}.bias"
        inits += [numpy_helper.from_array(w, wn), numpy_helper.from_array(b, bn)]
        last = i == n_layers - 1
        gemm_out = "output" if last else f"fc{i + 1}"
        nodes.append(
            helper.make_node(
                "Gemm", [cur, wn, bn], [gemm_out], name=f"fc{i + 1}", transB=1
            )
        )
        if not last:
            relu_out = f"relu{i + 1}"
            nodes.append(helper.make_node("Relu", [gemm_out], [relu_out], name=relu_out))
            cur = relu_out

    graph = helper.make_graph(
        nodes,
        name,
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", dims[0]])],
        outputs=[helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", dims[-1]])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    return _finalize(model, name=name, doc=doc)


def build_mlp_v1() -> onnx.ModelProto:
    return build_mlp(
        [16, 32, 32, 4],
        name="mlp_v1",
        doc="MLP 16->32->32->4 (Gemm+Relu); input f32[batch,16]; output f32[batch,4]",
    )


# --------------------------------------------------------------------------
# verification (optional; needs onnxruntime)
# --------------------------------------------------------------------------

def _ort_type_str(arg) -> str:
    return f"{arg.name}: {arg.type} {arg.shape}"


def check() -> None:
    import onnxruntime as ort

    print(f"\nonnxruntime {ort.__version__}")
    so = ort.SessionOptions()
    so.log_severity_level = 3

    def session(rel: str):
        sess = ort.InferenceSession(str(ROOT / rel), so, providers=["CPUExecutionProvider"])
        print(f"\n[{rel}]")
        for i in sess.get_inputs():
            print("  input ", _ort_type_str(i))
        for o in sess.get_outputs():
            print("  output", _ort_type_str(o))
        return sess

    np.set_printoptions(precision=4, suppress=True)
    X, y = _iris_data()
    for version in (1, 2):
        rel = f"iris/{version}/model.onnx"
        sess = session(rel)
        assert [i.name for i in sess.get_inputs()] == ["X"]
        assert sess.get_inputs()[0].type == "tensor(float)"
        assert [o.name for o in sess.get_outputs()] == ["label", "probabilities"]
        assert sess.get_outputs()[0].type == "tensor(int64)"
        assert sess.get_outputs()[1].type == "tensor(float)"
        batch = X[[0, 60, 120]]
        label, proba = sess.run(None, {"X": batch})
        print(f"  batch of 3 -> label {label.dtype}{list(label.shape)} = {label}")
        print(f"               probabilities {proba.dtype}{list(proba.shape)} =\n{proba}")
        assert label.dtype == np.int64 and label.shape == (3,)
        assert proba.dtype == np.float32 and proba.shape == (3, 3)
        label, proba = sess.run(None, {"X": X})
        assert label.shape == (150,) and proba.shape == (150, 3)
        assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5), proba.sum(axis=1)
        assert (label == proba.argmax(axis=1)).all()
        acc = float((label == y).mean())
        print(f"  accuracy on iris (150 rows): {acc:.4f}; prob rows sum to 1 (max err "
              f"{np.abs(proba.sum(axis=1) - 1).max():.2e})")
        assert acc > 0.9, acc
        ref = iris_estimator(version)
        assert (ref.predict(X) == label).all(), "ONNX labels differ from sklearn"
        err = np.abs(ref.predict_proba(X) - proba).max()
        assert err < 1e-4, err
        print(f"  matches sklearn predict/predict_proba (max prob err {err:.2e})")

    sess = session("mlp/1/model.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["output"]
    x = np.random.default_rng(123).standard_normal((3, 16)).astype(np.float32)
    (out,) = sess.run(None, {"input": x})
    print(f"  batch of 3 -> output {out.dtype}{list(out.shape)} =\n{out}")
    assert out.dtype == np.float32 and out.shape == (3, 4)
    # cross-check against a numpy forward pass
    m = onnx.load(str(ROOT / "mlp/1/model.onnx"))
    p = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    h = x
    for i in (1, 2, 3):
        h = h @ p[f"fc{i}.weight"].T + p[f"fc{i}.bias"]
        if i < 3:
            h = np.maximum(h, 0)
    assert np.allclose(out, h, atol=1e-4), np.abs(out - h).max()
    print("  matches numpy reference forward pass")
    print("\nall checks passed")


def write_reference_csv(rel: str) -> None:
    """The iris training data as CSV (float32 values, as the models see them)."""
    X, _ = _iris_data()
    lines = ["sepal_length,sepal_width,petal_length,petal_width"]
    lines += [",".join(f"{float(v):.1f}" for v in row) for row in X]
    (ROOT / rel).write_text("\n".join(lines) + "\n")
    print("wrote", rel)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify with onnxruntime")
    args = ap.parse_args(argv)

    np.random.seed(SEED)  # belt and braces; every estimator also has random_state
    _save(build_iris_v1(), "iris/1/model.onnx")
    _save(build_iris_v2(), "iris/2/model.onnx")
    _save(build_mlp_v1(), "mlp/1/model.onnx")
    write_reference_csv("iris/reference.csv")

    if args.check:
        check()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
