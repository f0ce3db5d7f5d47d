"""ModelOpt FP8 on a CUDA GPU (SM89+): native methods, and both offload modes of the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import diffgen
from diffgen.cli import main as cli_main
from diffgen.tiny.pipelines import build_tiny_pipeline
from diffgen.tiny.transformers import tiny_transformer_inputs
from modelopt_fixtures import cosine, export_dir, run, write_base_transformer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                       reason="needs a CUDA GPU with FP8 tensor cores (SM89+)"),
]


def _cuda(inputs):
    return {k: (v.cuda().bfloat16() if v.is_floating_point() else v.cuda()) if torch.is_tensor(v) else v
            for k, v in inputs.items()}


@pytest.mark.parametrize("family", ["flux1", "qwen_image", "hunyuan_video"])
def test_native_matches_reference_and_16bit(family, tmp_path):
    ckpt = export_dir(f"{family}-fp8")
    native = diffgen.load_transformer(ckpt, device="cuda", dtype=torch.bfloat16)
    assert {d.method.kind for d in native.diffgen_plan.decisions if d.method} == {"native"}
    reference = diffgen.load_transformer(ckpt, device="cuda", dtype=torch.bfloat16, quant_backend="fp8-reference")
    base = diffgen.load_transformer(write_base_transformer(f"{family}-fp8", tmp_path / "base"), device="cuda",
                                    dtype=torch.bfloat16)
    inputs = _cuda(tiny_transformer_inputs(family, base, seed=9))
    out = run(native, inputs)
    assert cosine(out, run(reference, inputs)) >= 0.999  # same operands; bf16 output rounding only
    assert cosine(out, run(base, inputs)) >= 0.99


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    # The fixture's FLUX.1 transformer has the tiny pipeline's input, text and pooled widths.
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("gpu") / "flux", seed=0)


@pytest.mark.parametrize("flags", [[], ["--dit-cpu-offload"], ["--dit-layerwise-offload"]])
def test_cli_generate_with_offload(pipeline_dir, tmp_path, flags):
    perf = tmp_path / "perf.json"
    argv = ["generate", "--model-path", str(pipeline_dir), "--transformer-path", str(export_dir("flux1-fp8")),
            "--prompt", "a fox", "--height", "32", "--width", "32", "--num-inference-steps", "2", "--device", "cuda",
            "--output-path", str(tmp_path), "--output-file-name", "out", "--perf-json", str(perf), "--quiet", *flags]
    assert cli_main(argv) == 0
    assert (tmp_path / "out.png").is_file()
    methods = set(json.loads(perf.read_text())["methods"]["transformer"].values())
    assert methods & {"fp8-scaled-mm", "fp8-triton-scaled-mm"}, methods
