"""On a CUDA GPU (SM80+; SM89+ for the W4A8 default): each family's tiny SVDQuant file, in
nunchaku's layout, through the CLI on the GPU.

- ``diffgen generate`` writes the image with the fast methods (perf.json names them);
- ``diffgen compare`` of the fast methods against the reference method on the same file and GPU,
  bf16, per denoising step. The issue's bar: latent cosine >= 0.999 at every step.

The reference computes the format's W4A4 forward (activations rounded to 4 bits per group of 64);
the weight-only method leaves activations in 16-bit and the W4A8 default rounds them to FP8 per
token, both closer to the 16-bit model than the reference is. So the gate measures how far the fast
paths stray from the format's definition, a difference that stays far below 0.001 in cosine on
these models (the CPU suite measures the reference against the 16-bit model at 0.9997 per step).
"""

import json

import diffusers
import pytest
import torch

from diffgen.cli import main
import svdq_writer as W
from svdq_families import WIDE

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs a CUDA GPU, SM80+ (diffgen-cuda's packed4 kernels)")]

STEPS = {"flux1": 4, "qwen_image": 2, "qwen_image_edit": 2, "z_image": 4}  # 4: the Lightning-like count
FAMILIES = sorted(STEPS)


def _fp8() -> bool:
    return torch.cuda.get_device_capability() >= (8, 9)


def _common(pipe, family, tmp_path) -> list[str]:
    argv = ["--model-path", str(pipe), "--prompt", "a fox", "--height", "32", "--width", "32",
            "--num-inference-steps", str(STEPS[family]), "--device", "cuda", "--dtype", "bf16"]
    if family == "qwen_image_edit":
        from PIL import Image

        image = tmp_path / "input.png"
        Image.new("RGB", (32, 32), (200, 40, 90)).save(image)
        argv += ["--image-path", str(image)]
    return argv


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_the_gpu_with_the_fast_methods(checkpoint, family, tmp_path):
    pipe, path, _, _ = checkpoint(family)
    perf_json = tmp_path / "perf.json"
    argv = ["generate", *_common(pipe, family, tmp_path), "--transformer-path", str(path),
            "--output-path", str(tmp_path), "--output-file-name", "svdq", "--perf-json", str(perf_json), "--quiet"]
    assert main(argv) == 0
    assert (tmp_path / "svdq.png").is_file()
    methods = set(json.loads(perf_json.read_text())["methods"]["transformer"].values())
    svdq = "svdq-packed4-w4a8" if _fp8() else "svdq-packed4"
    # FLUX.1 and Qwen-Image files carry AWQ modulation layers, Z-Image's none
    assert svdq in methods and methods <= {svdq, "awq-packed4", "16-bit"}, methods


def _cosines(pipe, family, tmp_path, name, reference: list[str], candidate: list[str]) -> list[float]:
    """Per-step latent cosines of one ``diffgen compare`` run (no gate: the tests state their own)."""
    out = tmp_path / f"{name}.json"
    argv = ["compare", *_common(pipe, family, tmp_path), "--output-json", str(out),
            *[f"--reference-{flag}" for flag in reference], *[f"--candidate-{flag}" for flag in candidate]]
    assert main(argv) == 0
    cosines = [step["cosine_similarity"] for step in json.loads(out.read_text())["trajectory"]]
    assert len(cosines) == STEPS[family]
    return cosines


@pytest.fixture
def dense(checkpoint, tmp_path):
    """The 16-bit transformer whose linears hold W_eff = dequantized R / smooth + up @ down (and the
    shifted bias): what the file's weights compute when activations are not rounded."""
    def get(family, precision):
        _, _, model, records = checkpoint(family, precision)
        cls, kwargs = WIDE[family]
        copy = getattr(diffusers, cls)(**kwargs).eval()
        copy.load_state_dict(model.state_dict())
        with torch.no_grad():
            for name, rec in records.items():
                w, b = W.dense_weight(rec, precision)
                linear = copy.get_submodule(name)
                linear.weight.copy_(w.float())
                if linear.bias is not None:
                    linear.bias.copy_(b.float())
        folder = tmp_path / f"dense-{family}-{precision}"
        copy.save_pretrained(folder)
        return folder
    return get


CASES = [(f, "int4") for f in FAMILIES] + [("flux1", "nvfp4")]


@pytest.mark.parametrize("backend", ["default", "weight-only"])
@pytest.mark.parametrize("family,precision", CASES)
def test_fast_methods_follow_the_reference_step_by_step(checkpoint, dense, family, precision, backend, tmp_path):
    """Against the reference method: cosine >= 0.999 at every step, the issue's bar. Where the
    format's own 4-bit activation rounding moves the reference further than that from the same
    weights with 16-bit activations (W_eff; Z-Image's 4 steps: 0.993 at the last on the CPU), the
    fast path may differ from the reference by that much and 0.001 more, no further."""
    if precision == "nvfp4" and not _fp8():
        pytest.skip("nvfp4 SVDQuant needs E4M3 scales: SM89+")
    pipe, path, _, _ = checkpoint(family, precision)
    fast = [f"transformer-path={path}"] + ([f"quant-backend={backend}"] if backend != "default" else [])
    reference = [f"transformer-path={path}", "quant-backend=reference"]
    got = _cosines(pipe, family, tmp_path, "fast-vs-reference", reference, fast)
    own = _cosines(pipe, family, tmp_path, "reference-vs-weff", [f"transformer-path={dense(family, precision)}"],
                   reference)
    assert all(g >= min(0.999, o - 0.001) for g, o in zip(got, own)), (got, own)


@pytest.mark.parametrize("backend", ["default", "weight-only"])
@pytest.mark.parametrize("family,precision", CASES)
def test_fast_methods_compute_the_stored_weights(checkpoint, dense, family, precision, backend, tmp_path):
    """Against W_eff in 16-bit (the test's own decode of the file): the weight-only method computes
    exactly that up to bf16 rounding, W4A8 adds per-token FP8 activations: 0.999 per step."""
    if precision == "nvfp4" and not _fp8():
        pytest.skip("nvfp4 SVDQuant needs E4M3 scales: SM89+")
    pipe, path, _, _ = checkpoint(family, precision)
    fast = [f"transformer-path={path}"] + ([f"quant-backend={backend}"] if backend != "default" else [])
    got = _cosines(pipe, family, tmp_path, "fast-vs-weff", [f"transformer-path={dense(family, precision)}"], fast)
    assert min(got) >= 0.999, got
