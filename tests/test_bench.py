"""diffgen bench on the tiny FLUX.1 (fp32 on the CPU, 32x32 px, 2 steps): the JSON, the per-stage
medians, the refusal of differences other than checkpoint or quantization, and the GPU script's
assembly at tiny sizes."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import runpy
import statistics
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import diffgen
from diffgen.cli import main
from diffgen.run import SamplingArgs
from diffgen.tiny.pipelines import build_tiny_pipeline
from diffgen.tools.bench import BenchConfig, ConfigMismatchError, bench
from diffgen.tools.sides import PipelineConfig

SAMPLING = SamplingArgs("a red fox in the snow", height=32, width=32, num_inference_steps=2, seed=0)
STAGES = ("total_s", "text_encoding_s", "denoising_s", "vae_decode_s", "step_median_s")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("bench") / "flux1", seed=0)


def side(model, quantization=None, **changes) -> BenchConfig:
    config = BenchConfig(PipelineConfig(str(model), quantization=quantization), SAMPLING, device="cpu",
                         dtype=torch.float32)
    return dataclasses.replace(config, **changes)


def test_bench_16bit_against_fp8(flux_dir):
    result = bench(side(flux_dir), side(flux_dir, "fp8"), warmup_runs=1, runs=2)
    assert {"tool", "versions", "platform", "sampling", "run_options", "warmup_runs", "runs", "baseline", "candidate",
            "speedup", "notes"} <= set(result)
    assert (result["warmup_runs"], result["runs"]) == (1, 2)
    for name in ("baseline", "candidate"):
        info = result[name]
        assert len(info["measured_runs"]) == 2
        for run in info["measured_runs"]:
            assert len(run["denoising_steps_s"]) == 2
            assert run["denoising_s"] == pytest.approx(sum(run["denoising_steps_s"]))
            # The stages happen inside the call, one after the other.
            assert run["text_encoding_s"] + run["denoising_s"] + run["vae_decode_s"] <= run["total_s"]
            assert min(run["text_encoding_s"], run["vae_decode_s"], *run["denoising_steps_s"]) > 0
        stages = info["stages"]
        for stage in ("total_s", "text_encoding_s", "denoising_s", "vae_decode_s"):
            values = [r[stage] for r in info["measured_runs"]]
            assert stages[stage]["median"] == pytest.approx(statistics.median(values))
            assert (stages[stage]["min"], stages[stage]["max"]) == (min(values), max(values))
        assert len(stages["denoising_steps_s"]) == 2
        for i, step in enumerate(stages["denoising_steps_s"]):
            times = [r["denoising_steps_s"][i] for r in info["measured_runs"]]
            assert step["median"] == pytest.approx(statistics.median(times))
        assert info["memory"]["peak_device_allocated_bytes"] is None  # CPU: no device allocator
        assert info["memory"]["peak_host_memory_bytes"] > 0
    # Weight bytes: the 16-bit side holds exactly the checkpoint's fp32 tensors; fp8 holds far fewer.
    with safe_open(str(flux_dir / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        on_disk = sum(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys())
    assert result["baseline"]["transformer_weight_bytes"] == on_disk
    assert result["candidate"]["transformer_weight_bytes"] < 0.75 * on_disk
    assert result["speedup"]["transformer_weight_bytes_ratio"] == pytest.approx(
        result["candidate"]["transformer_weight_bytes"] / on_disk)
    assert "fp8-reference" in result["candidate"]["methods"]["transformer"].values()
    assert result["candidate"]["rewrites"] == result["baseline"]["rewrites"] == {}  # no plugin here rewrites
    assert set(STAGES) <= set(result["speedup"])
    json.dumps(result, allow_nan=False)  # JSON-ready as it is


def test_refuses_other_differences(flux_dir):
    base = side(flux_dir)
    cases = {"width (32 vs 64)": dict(sampling=dataclasses.replace(SAMPLING, width=64)),
             "num_inference_steps (2 vs 4)": dict(sampling=dataclasses.replace(SAMPLING, num_inference_steps=4)),
             "seed (0 vs 1)": dict(sampling=dataclasses.replace(SAMPLING, seed=1)),
             "compile (False vs True)": dict(compile=True),
             "dtype (torch.float32 vs torch.bfloat16)": dict(dtype=torch.bfloat16),
             "dit_cpu_offload (False vs True)": dict(dit_cpu_offload=True)}
    for difference, changes in cases.items():
        with pytest.raises(ConfigMismatchError, match="differ in: " + re.escape(difference)):
            bench(base, side(flux_dir, "fp8", **changes), runs=1)
    with pytest.raises(ConfigMismatchError, match=re.escape("height (32 vs 64), width (32 vs 64)")):
        bench(base, side(flux_dir, sampling=dataclasses.replace(SAMPLING, height=64, width=64)), runs=1)


def test_pipeline_objects_are_left_as_they_were(flux_dir):
    pipe = diffgen.load_pipeline(flux_dir, dtype=torch.float32)
    result = bench(side(flux_dir, pipeline=pipe), side(flux_dir, pipeline=pipe), warmup_runs=0, runs=1)
    assert result["baseline"]["source"] == {"kind": "pipeline object", "pipeline": "FluxPipeline"}
    assert "encode_prompt" not in vars(pipe) and "decode" not in vars(pipe.vae)  # timer wrappers removed
    assert pipe.transformer is not None


def cli_argv(model, out, *flags) -> list[str]:
    return ["bench", "--model-path", str(model), "--prompt", SAMPLING.prompt, "--height", "32", "--width", "32",
            "--num-inference-steps", "2", "--device", "cpu", "--dtype", "fp32", "--output-json", str(out), *flags]


def test_cli(flux_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(cli_argv(flux_dir, out, "--candidate-quantization", "fp8", "--warmup-runs", "0", "--runs", "1")) == 0
    table = capsys.readouterr().out
    assert "denoising step (median)" in table and "candidate (fp8)" in table and "baseline (unquantized)" in table
    data = json.loads(out.read_text())
    assert data["candidate"]["source"]["quantization"] == "fp8" and data["baseline"]["source"]["quantization"] is None
    assert data["runs"] == 1 and len(data["baseline"]["measured_runs"]) == 1
    # Any difference but checkpoint or quantization: a one-line error and status 2, before loading.
    for flags, message in ((["--candidate-seed", "1"], "seed (0 vs 1)"),
                           (["--baseline-width", "64"], "width (64 vs 32)"),
                           (["--candidate-compile"], "compile (False vs True)")):
        assert main(cli_argv(flux_dir, tmp_path / "refused.json", *flags)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused.json").exists()


@pytest.mark.parametrize("script,embeddings,text", [
    ("flux_compare_bench.py", ["pooled_prompt_embeds", "prompt_embeds"], "text_encoders"),
    ("wan_compare_bench.py", ["negative_prompt_embeds", "prompt_embeds"], "text_encoder")])
def test_gpu_script_assembles_at_tiny_size(script, embeddings, text, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tiny.json"
    monkeypatch.setattr(sys, "argv", [script, "--tiny", "--bench-steps", "2", "--compare-steps", "2",
                                      "--warmup-runs", "0", "--runs", "1", "--out", str(out)])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the Wan script puts benchmarks/ on it
    try:
        runpy.run_path(str(REPO / "benchmarks" / script), run_name="__main__")
    finally:
        torch.set_flush_denormal(False)  # the script flushes subnormals on the CPU; torch's default is off
    data = json.loads(out.read_text())
    assert data["summary"]["same_weights"] is True  # both sides streamed the same random weights
    assert data["bench"]["candidate"]["source"]["quantization"] == "fp8"
    assert "fp8-reference" in data["compare"]["candidate"]["methods"]["transformer"].values()
    assert data["bench"]["extra_call_arguments"] == embeddings
    assert 0.999 < data["summary"]["min_step_cosine"] < 1.0
    assert "left out" in data["setup"][text]
    assert json.loads(capsys.readouterr().out) == data
