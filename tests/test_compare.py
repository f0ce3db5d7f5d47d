"""diffgen compare on tiny pipelines (fp32 on the CPU, 32x32 px, 2 steps): exactness of 16-bit
against itself, fp8 against 16-bit, video frames, gates through the CLI, the JSON file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import diffgen
from diffgen.cli import main
from diffgen.cli.sides import side_overrides
from diffgen.platform import resolve
from diffgen.run import SamplingArgs
from diffgen.tiny.pipelines import build_tiny_pipeline
from diffgen.tools.compare import compare, run_side
from diffgen.tools.sides import PipelineConfig

SAMPLING = SamplingArgs("a red fox in the snow", height=32, width=32, num_inference_steps=2, seed=0)
# Online fp8 (per-channel weights, per-token activations) moves the tiny FLUX.1's latents by
# ~1e-6 in cosine (measured: 0.999998) and its PNG to ~58-60 dB; 0.999 and 35 dB leave wide margins
# while staying far from what a different seed gives (PSNR 12.6 dB, tests/test_cli.py).
FP8_MIN_COSINE = 0.999
FP8_MIN_PSNR_DB = 35.0


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("compare") / "flux1", seed=0)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_tiny_pipeline("wan", tmp_path_factory.mktemp("compare") / "wan", seed=0)


def compare_argv(model, *flags) -> list[str]:
    return ["compare", "--model-path", str(model), "--prompt", SAMPLING.prompt, "--height", "32", "--width", "32",
            "--num-inference-steps", "2", "--seed", "0", "--device", "cpu", "--dtype", "fp32", *flags]


def test_captured_latents_and_output_are_the_pipelines_own(flux_dir):
    """The per-step latents compare captures end in what the pipeline returns as latents, and its
    8-bit output is the PNG a plain call writes."""
    side = run_side(PipelineConfig(str(flux_dir)), SAMPLING, platform=resolve("cpu")[0], dtype=torch.float32)
    pipe = diffgen.load_pipeline(flux_dir, dtype=torch.float32)
    call = dict(prompt=SAMPLING.prompt, height=32, width=32, num_inference_steps=2)
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    image = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    assert len(side.latents) == 2 and len(side.timesteps) == 2 and side.timesteps[0] > side.timesteps[1]
    assert torch.equal(side.latents[-1], latents.float())
    assert side.frames.shape == (1, 32, 32, 3) and not side.video
    assert np.array_equal(side.frames[0], np.asarray(image))


def test_16bit_against_itself_is_exact(flux_dir):
    config = PipelineConfig(str(flux_dir))
    result = compare(config, config, SAMPLING, device="cpu", dtype=torch.float32)
    assert [s["cosine_similarity"] for s in result["trajectory"]] == [1.0, 1.0]
    assert all(s["mae"] == 0 and s["max_abs"] == 0 for s in result["trajectory"])
    image = result["output"]["image"]
    assert image["psnr_db"] == math.inf and image["mae"] == 0 and image["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert result["gates"] == {"min_cosine": None, "min_psnr": None, "passed": True, "violations": []}


def test_fp8_against_16bit(flux_dir):
    result = compare(PipelineConfig(str(flux_dir)), PipelineConfig(str(flux_dir), quantization="fp8"), SAMPLING,
                     device="cpu", dtype=torch.float32)
    cosines = [s["cosine_similarity"] for s in result["trajectory"]]
    assert len(cosines) == 2 and all(FP8_MIN_COSINE < c < 1.0 for c in cosines)  # close, and really quantized
    image = result["output"]["image"]
    assert math.isfinite(image["psnr_db"]) and image["psnr_db"] > FP8_MIN_PSNR_DB
    assert 0.9 < image["ssim"] < 1.0 + 1e-12
    methods = set(result["candidate"]["methods"]["transformer"].values())
    assert methods == {"fp8-reference", "16-bit"}  # default exclusions stay 16-bit
    assert set(result["reference"]["methods"]["transformer"].values()) == {"16-bit"}
    assert result["candidate"]["weight_bytes"]["transformer"] < result["reference"]["weight_bytes"]["transformer"]


def test_video_reports_first_middle_and_all_frames(wan_dir):
    sampling = SamplingArgs("a red fox in the snow", height=32, width=32, num_frames=5, num_inference_steps=2)
    result = compare(PipelineConfig(str(wan_dir)), PipelineConfig(str(wan_dir), quantization="fp8"), sampling,
                     device="cpu", dtype=torch.float32)
    out = result["output"]
    assert out["kind"] == "video" and out["frames"] == 5 and (out["height"], out["width"]) == (32, 32)
    assert out["middle_frame"]["index"] == 2
    for part in ("first_frame", "middle_frame", "all_frames"):
        assert math.isfinite(out[part]["psnr_db"]) and out[part]["psnr_db"] > 30
        assert set(out[part]) >= {"psnr_db", "ssim", "mae", "mse", "max_abs"}
    assert len(result["trajectory"]) == 2
    assert all(FP8_MIN_COSINE < s["cosine_similarity"] < 1.0 for s in result["trajectory"])
    # Wan2.2 A14B has two experts; --quantization applies to both.
    for name in ("transformer", "transformer_2"):
        assert "fp8-reference" in result["candidate"]["methods"][name].values()
    assert result["summary"]["psnr_db"] == out["all_frames"]["psnr_db"]


def test_cli_gate_violation_exits_1(flux_dir, tmp_path, capsys):
    out = tmp_path / "fp8.json"
    status = main(compare_argv(flux_dir, "--candidate-quantization", "fp8", "--min-cosine", "1.0",
                               "--output-json", str(out)))
    assert status == 1
    data = json.loads(out.read_text())
    assert data["gates"]["passed"] is False and data["gates"]["min_cosine"] == 1.0
    assert "below --min-cosine 1.0" in data["gates"]["violations"][0]
    assert "gates: FAILED" in capsys.readouterr().out
    assert data["summary"]["min_step_cosine"] > FP8_MIN_COSINE  # a sane gate would have passed


def test_json_file_structure(flux_dir, tmp_path):
    out = tmp_path / "same.json"
    # Gates that hold exit 0; identical outputs have PSNR +inf, which passes any --min-psnr.
    assert main(compare_argv(flux_dir, "--output-json", str(out), "--min-cosine", "1.0", "--min-psnr", "100")) == 0

    def no_constants(name):
        raise AssertionError(f"{name} is not strict JSON")

    data = json.loads(out.read_text(), parse_constant=no_constants)
    assert {"tool", "versions", "device", "dtype", "sampling", "reference", "candidate", "trajectory", "output",
            "summary", "gates"} <= set(data)
    assert data["sampling"]["num_inference_steps"] == 2 and data["dtype"] == "float32"
    assert data["reference"]["source"]["quantization"] is None
    assert set(data["reference"]) >= {"source", "pipeline", "generation_s", "methods", "weight_bytes"}
    assert [set(s) for s in data["trajectory"]] == [{"step", "timestep", "candidate_timestep", "cosine_similarity",
                                                     "mae", "mse", "rmse", "max_abs"}] * 2
    assert data["output"]["image"]["psnr_db"] == "inf"  # strict JSON has no infinity
    assert data["summary"]["min_step_cosine"] == 1.0


def test_side_flags():
    overrides = side_overrides(["--candidate-transformer-2-path", "/c/t2", "--reference-vae-path=/r/vae",
                                 "--text-encoder-path", "/both/te", "--candidate-transformer-weights-path", "/c/w"],
                                ("reference", "candidate"))
    assert overrides["reference"] == ({"vae": "/r/vae", "text_encoder": "/both/te"}, {})
    assert overrides["candidate"] == ({"transformer_2": "/c/t2", "text_encoder": "/both/te"}, {"transformer": "/c/w"})


def test_compare_falls_back_to_the_embedded_model_like_generate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFGEN_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["compare", "--prompt", "x", "--num-inference-steps", "1", "--height", "64", "--width", "64",
                 "--candidate-quantization", "fp8", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "using the embedded default model" in captured.err
    # The CPU reference computes in float32: it is not called 16-bit.
    assert "reference: FluxPipeline from " in captured.out and "(unquantized, float32)" in captured.out


def test_cli_errors(flux_dir, capsys):
    assert main(compare_argv(flux_dir, "--candidate-transformer-2-path", "/nowhere")) == 2
    assert "unknown component 'transformer_2'" in capsys.readouterr().err
