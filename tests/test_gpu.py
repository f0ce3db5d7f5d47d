"""Runs only on a CUDA GPU with FP8 support (SM89+); skipped elsewhere with the reason.

These exercise the native path end to end: online quantization through _scaled_mm, and the
CLI's offload and compile flags with FP8 layers.
"""

from __future__ import annotations

import json

import pytest
import torch

import diffgen
from diffgen.cli import main
from diffgen.linear import QuantLinear
from diffgen.tiny.pipelines import build_tiny_pipeline
from tests.conftest import cosine, run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                       reason="needs a CUDA GPU with FP8 tensor cores (SM89+)"),
]


def _cuda_inputs(inputs, dtype):
    return {k: (v.cuda().to(dtype) if v.is_floating_point() else v.cuda()) if torch.is_tensor(v) else v
            for k, v in inputs.items()}


def test_online_fp8_native_on_gpu(flux_dir, flux_inputs):
    inputs = _cuda_inputs(flux_inputs, torch.bfloat16)
    reference = run(diffgen.load_transformer(flux_dir, device="cuda", dtype=torch.bfloat16), inputs)
    model = diffgen.load_transformer(flux_dir, device="cuda", dtype=torch.bfloat16, quantization="fp8")
    kinds = {d.method.kind for d in model.diffgen_plan.decisions if d.method}
    assert kinds == {"native"}
    assert all(m.weight.is_cuda for m in model.modules() if isinstance(m, QuantLinear))
    assert cosine(run(model, inputs), reference) >= 0.99


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("gpu") / "flux", seed=0)


@pytest.mark.parametrize("flags", [[], ["--dit-cpu-offload"], ["--pipeline-cpu-offload"], ["--dit-layerwise-offload"],
                                   ["--compile"]])
def test_cli_fp8_with_offload_and_compile(pipeline_dir, tmp_path, flags):
    perf = tmp_path / "perf.json"
    argv = ["generate", "--model-path", str(pipeline_dir), "--quantization", "fp8", "--prompt", "a fox",
            "--height", "32", "--width", "32", "--num-inference-steps", "2", "--device", "cuda",
            "--output-path", str(tmp_path), "--output-file-name", "out", "--perf-json", str(perf), "--quiet", *flags]
    assert main(argv) == 0
    assert (tmp_path / "out.png").is_file()
    report = json.loads(perf.read_text())
    assert "fp8-scaled-mm" in report["methods"]["transformer"].values()


def test_dit_cpu_offload_keeps_only_the_transformer_off_the_gpu_and_changes_no_pixel(pipeline_dir):
    from diffgen.offload import apply_offload
    from diffgen.platform import resolve

    def sample(pipe):
        with torch.inference_mode():
            return pipe(prompt="a fox", height=32, width=32, num_inference_steps=2, output_type="pt",
                        generator=torch.Generator("cpu").manual_seed(0)).images

    pipe = diffgen.load_pipeline(pipeline_dir, quantization="fp8", device="cuda")
    expected = sample(pipe)
    apply_offload(pipe, resolve("cuda")[0], dit_cpu_offload=True)
    assert next(pipe.transformer.parameters()).device.type == "cpu"
    assert next(pipe.text_encoder.parameters()).is_cuda and next(pipe.vae.parameters()).is_cuda
    got = sample(pipe)
    assert torch.equal(got, expected)
    assert next(pipe.transformer.parameters()).device.type == "cpu"  # sent back before the VAE decoded
    assert all(m.weight.device.type == "cpu" for m in pipe.transformer.modules() if isinstance(m, QuantLinear))
