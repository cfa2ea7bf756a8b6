#!/usr/bin/env python3
"""Write a compute-heavy MLP for benchmarking (NOT committed to the repo).

    512 -> 2048 -> 2048 -> 10   (Gemm+Relu, Gemm+Relu, Gemm), ~21 MB of fp32 weights
    input  `input`  FP32 [batch, 512]
    output `output` FP32 [batch, 10]

Usage:
    python loadtest/generate_heavy.py /tmp/heavy-repo
        -> writes /tmp/heavy-repo/heavy/1/model.onnx

The output is deterministic (fixed seed). Refuses to write inside models/ so
the ~21 MB file never ends up in git.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent / "models"
sys.path.insert(0, str(MODELS))
sys.dont_write_bytecode = True  # keep models/ free of __pycache__

from generate import build_mlp  # noqa: E402  (numpy + onnx only)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo_dir", nargs="?", default="/tmp/heavy-repo",
                    help="model repository root (default: /tmp/heavy-repo)")
    ap.add_argument("--name", default="heavy", help="model name (default: heavy)")
    ap.add_argument("--version", default="1", help="model version (default: 1)")
    args = ap.parse_args(argv)

    out = Path(args.repo_dir).resolve() / args.name / args.version / "model.onnx"
    if out.is_relative_to(MODELS):
        ap.error(f"refusing to write under {MODELS} (heavy model must not be committed)")

    # He-init (std = sqrt(2/fan_in)) keeps activations O(1) through 2048-wide layers.
    model = build_mlp(
        [512, 2048, 2048, 10],
        name="heavy_mlp",
        seed=1,
        scale=None,
        doc="benchmark MLP 512->2048->2048->10 (Gemm+Relu); "
        "input f32[batch,512]; output f32[batch,10]",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString(deterministic=True)
    out.write_bytes(data)
    print(f"wrote {out} ({len(data) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
