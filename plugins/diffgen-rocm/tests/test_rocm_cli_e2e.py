"""End to end on the CPU for FLUX.1 and Wan2.2 (both experts): online ``--quantization mxfp4`` and
AMD Quark MXFP4 checkpoints generate through ``diffgen generate``, and the denoising trajectory of
the same load (``load_pipeline``, what the CLI calls) matches, step by step, diffusers' own pipeline
whose quantized linears compute the MXFP4 definition written in the test (mx_definition)."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch

from diffgen.cli import main
from diffgen.pipeline import load_pipeline
from diffgen.quant import default_online_ignore
from diffgen.tiny.pipelines import build_tiny_pipeline

import mx_definition as mx
from wide_models import build_wide_pipeline

FIXTURES = Path(__file__).parent / "fixtures"
SIZE, FRAMES, STEPS = 32, 5, 2
QUARK = {"flux1": {"transformer": "flux1-mxfp4"},
         "wan": {"transformer": "wan-mxfp4-transformer", "transformer_2": "wan-mxfp4-transformer_2"}}
WIDE_HEADS = {"flux1": 1, "wan": 1}  # hidden 128: the N=128 attention stays 16-bit, the MLPs and FLUX.1 modulation (N>=384) are MXFP4


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    built = {}

    def get(family: str, kind: str) -> Path:
        if (family, kind) not in built:
            where = tmp_path_factory.mktemp(f"{family}-{kind}")
            built[family, kind] = (build_wide_pipeline(family, WIDE_HEADS[family], where) if kind == "wide"
                                   else build_tiny_pipeline(family, where))
        return built[family, kind]

    return get


def _call(pipe, latents: list) -> None:
    def on_step_end(p, step, timestep, kwargs):
        latents.append(kwargs["latents"].detach().float().clone())
        return kwargs

    kwargs = dict(prompt="a red fox in the snow", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=on_step_end,
                  callback_on_step_end_tensor_inputs=["latents"], output_type="latent")
    if "num_frames" in type(pipe).__call__.__code__.co_varnames:
        kwargs["num_frames"] = FRAMES
    with torch.no_grad():
        pipe(**kwargs)


def _trajectory(pipe) -> list[torch.Tensor]:
    latents: list[torch.Tensor] = []
    _call(pipe, latents)
    return latents


def _patch(linear: torch.nn.Linear, weight: torch.Tensor, activations: bool) -> None:
    def forward(x, linear=linear, weight=weight):
        return torch.nn.functional.linear(mx.fake_quantize_mxfp4(x) if activations else x, weight, linear.bias)

    linear.forward = forward


def _independent_online(pipe, quantized: dict[str, set[str]]):
    """``pipe`` (16-bit) with the linears online MXFP4 quantizes computing the definition."""
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        mine = set()
        for layer_name, module in model.named_modules():
            # the rule, from SGLang-Diffusion and diffgen's default ignores: N >= 256, not an embedder
            if isinstance(module, torch.nn.Linear) and module.out_features >= 256 \
                    and default_online_ignore(type(model).__name__, layer_name) is None:
                _patch(module, mx.fake_quantize_mxfp4(module.weight.data), activations=True)
                mine.add(f"{name}.{layer_name}")
        assert mine == quantized[name]
    return pipe


def _independent_quark(pipe, family: str):
    """``pipe`` (16-bit) with Quark's linears computing the definition on the decoded tensors."""
    from safetensors.torch import load_file

    for name, fixture in QUARK[family].items():
        model = getattr(pipe, name)
        tensors = load_file(FIXTURES / fixture / "diffusion_pytorch_model.safetensors")
        for key, scales in tensors.items():
            if key.endswith(".weight_quantizer.scale"):
                prefix = key[: -len(".weight_quantizer.scale")]
                _patch(model.get_submodule(prefix), mx.decode_mxfp4(tensors[f"{prefix}.weight"], scales), True)
    return pipe


def _cosines(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    assert len(a) == len(b) == STEPS
    return [torch.nn.functional.cosine_similarity(x.flatten().double(), y.flatten().double(), dim=0).item()
            for x, y in zip(a, b)]


def _generate_cli(tmp_path: Path, model: Path, *flags: str) -> dict:
    out = tmp_path / "out"
    argv = ["generate", "--model-path", str(model), "--prompt", "a red fox in the snow", "--height", str(SIZE),
            "--width", str(SIZE), "--num-inference-steps", str(STEPS), "--num-frames", str(FRAMES),
            "--dtype", "fp32", "--device", "cpu", "--output-path", str(out), "--output-file-name", "x",
            "--perf-json", str(tmp_path / "perf.json"), "--quiet", *flags]
    assert main(argv) == 0
    assert [p.suffix for p in out.iterdir()] in ([".png"], [".mp4"])
    return json.loads((tmp_path / "perf.json").read_text())


@pytest.mark.parametrize("family", ["flux1", "wan"])
def test_online_mxfp4_generates_and_follows_the_definition(family, pipelines, tmp_path):
    path = pipelines(family, "wide")
    perf = _generate_cli(tmp_path, path, "--quantization", "mxfp4")
    methods = {m for component in perf["methods"].values() for m in component.values()}
    assert methods == {"mxfp4-reference", "16-bit"}
    pipe = load_pipeline(path, quantization="mxfp4", device="cpu", dtype="fp32")
    quantized = {name: {f"{name}.{n}" for n in getattr(pipe, name).diffgen_plan.quantized()}
                 for name in ("transformer", "transformer_2") if getattr(pipe, name, None) is not None}
    assert all(quantized.values())
    got = _trajectory(pipe)
    sixteen_bit = diffusers.DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    # Against the 16-bit model, loosely: 4-bit weights and activations (measured 0.9998 and above
    # per step on these random models; the margin allows other seeds and platforms).
    assert min(_cosines(got, _trajectory(sixteen_bit))) >= 0.995
    # Identical math in fp32 (the test's rounding and decode against the plugin's): per step at
    # least 0.999, as the project asks (measured 1 - 1e-13).
    assert min(_cosines(got, _trajectory(_independent_online(sixteen_bit, quantized)))) >= 0.999


@pytest.mark.parametrize("family", ["flux1", "wan"])
def test_quark_checkpoint_generates_and_follows_the_definition(family, pipelines, tmp_path):
    path = pipelines(family, "tiny")
    flags = [f"--{name.replace('_', '-')}-path={FIXTURES / fixture}" for name, fixture in QUARK[family].items()]
    perf = _generate_cli(tmp_path, path, *flags)
    assert set(perf["methods"]) == set(QUARK[family])
    overrides = {name: FIXTURES / fixture for name, fixture in QUARK[family].items()}
    pipe = load_pipeline(path, transformer_path=overrides.pop("transformer"), component_paths=overrides,
                         device="cpu", dtype="fp32")
    got = _trajectory(pipe)
    sixteen_bit = diffusers.DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    assert min(_cosines(got, _trajectory(sixteen_bit))) >= 0.995  # measured 0.9997 and above
    assert min(_cosines(got, _trajectory(_independent_quark(sixteen_bit, family)))) >= 0.999
