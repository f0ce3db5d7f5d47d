"""benchmarks/family_step.py's torchao rows (which layers torchao gets, the ratios, the error entry)
and benchmarks/family_quality.py (diffgen compare per tiny family), on the CPU; the timed GPU runs
are marked cuda."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import runpy
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import family_step  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                         reason="needs a CUDA GPU with FP8 tensor cores (SM89+)")


def tiny_cpu_model(family: str):
    import diffusers

    spec = family_step.FAMILIES[family]
    return getattr(diffusers, spec["cls"])(**dict(spec["config"], **spec["tiny"]))


class _Float8Weight(torch.Tensor):
    """Stands in for torchao's float8 weight subclass: only its type matters to the benchmark."""


def fake_torchao(monkeypatch, skip: str | None = None) -> list[str]:
    """A ``torchao.quantization`` whose ``quantize_`` offers every module to ``filter_fn`` by its
    fully qualified name, as torchao does, and swaps the accepted linears' weights for a subclass
    (leaving ``skip`` alone, as a torchao that declined a layer would). Returns the fqns offered."""
    offered: list[str] = []

    def quantize_(model, config, filter_fn):
        assert type(config).__name__ == "Config" and config.granularity == "per-row"
        for fqn, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                offered.append(fqn)
                if filter_fn(module, fqn) and fqn != skip:
                    module.weight = torch.nn.Parameter(module.weight.data.as_subclass(_Float8Weight),
                                                       requires_grad=False)

    class Config:
        def __init__(self, granularity):
            self.granularity = granularity

    torchao, quantization = types.ModuleType("torchao"), types.ModuleType("torchao.quantization")
    for module in (torchao, quantization):  # diffusers asks importlib whether torchao is installed
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    quantization.Float8DynamicActivationFloat8WeightConfig, quantization.quantize_ = Config, quantize_
    quantization.PerRow = lambda: "per-row"
    torchao.quantization, torchao.__version__ = quantization, "0.16.0"
    monkeypatch.setitem(sys.modules, "torchao", torchao)
    monkeypatch.setitem(sys.modules, "torchao.quantization", quantization)
    return offered


@pytest.mark.parametrize("family", sorted(family_step.FAMILIES))
def test_torchao_gets_exactly_the_layers_diffgen_quantizes(family, monkeypatch):
    model = tiny_cpu_model(family)
    names = set(family_step.quantized_linears(model))
    every_linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # diffgen's default ignores (embedders, the final layer) keep some linears 16-bit in every family
    assert names and names < every_linear
    offered = fake_torchao(monkeypatch)
    assert family_step.torchao_float8_rowwise(model, names) == len(names)
    assert set(offered) == every_linear
    converted = {n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and isinstance(m.weight, _Float8Weight)}
    assert converted == names


def test_a_layer_torchao_leaves_alone_is_an_error(monkeypatch):
    model = tiny_cpu_model("wan")
    names = set(family_step.quantized_linears(model))
    fake_torchao(monkeypatch, skip=sorted(names)[0])
    with pytest.raises(RuntimeError, match=f"left 1 of {len(names)} linears unquantized"):
        family_step.torchao_float8_rowwise(model, names)


def test_missing_torchao_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ImportError):
        family_step.torchao_float8_rowwise(torch.nn.Linear(4, 4), {""})


def test_speedup_ratios():
    steps = {"bf16_eager": 100.0, "bf16_compiled": 80.0, "fp8_diffusers_blocks_eager": 90.0,
             "fp8_fused_eager": 75.0, "fp8_fused_compiled": 50.0, "torchao_float8_rowwise_eager": 95.0,
             "torchao_float8_rowwise_compiled": 60.0, "bf16_rewritten_compiled": 64.0}
    assert family_step.speedups_vs_torchao(steps) == pytest.approx(
        {"fp8_diffusers_blocks_eager": 95 / 90, "fp8_fused_eager": 95 / 75, "fp8_fused_compiled": 60 / 50})
    assert family_step.speedups_vs_bf16(steps) == pytest.approx(
        {"fp8_diffusers_blocks_eager": 100 / 90, "fp8_fused_eager": 100 / 75, "fp8_fused_compiled": 80 / 50,
         "torchao_float8_rowwise_eager": 100 / 95, "torchao_float8_rowwise_compiled": 80 / 60,
         "bf16_rewritten_compiled": 80 / 64})
    assert family_step.speedups_vs_torchao({k: v for k, v in steps.items() if "torchao" not in k}) == {}


def test_variant_filter():
    assert family_step.chosen_variants(None, False) == set(family_step.OPTIONAL_VARIANTS)
    assert family_step.chosen_variants(None, True) == set(family_step.OPTIONAL_VARIANTS) - {"torchao"}
    assert family_step.chosen_variants(["fp8_fused", "torchao"], True) == {"fp8_fused"}


def test_unknown_names_are_refused_before_anything_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["family_step.py", "--family", "wan", "--without-rewrites", "wan-gelu-producer",
                                      "wan-fused-qkv"])
    monkeypatch.setattr(family_step, "build", lambda *a: pytest.fail("built a model before refusing the name"))
    with pytest.raises(SystemExit):
        family_step.main()
    err = capsys.readouterr().err
    assert "['wan-fused-qkv'] are not among wan's rewrites" in err and "wan-fused-projections" in err
    monkeypatch.setattr(sys, "argv", ["family_step.py", "--family", "wan", "--config", "num_layers=40", "layers=40"])
    with pytest.raises(SystemExit):
        family_step.main()
    assert "['layers'] are not entries of wan's config" in capsys.readouterr().err


def test_snr_is_signal_over_error_power():
    reference = torch.tensor([3.0, -4.0])  # power 25
    assert family_step.snr_db(reference + torch.tensor([0.5, 0.0]), reference) == pytest.approx(20.0)  # 25 / 0.25
    assert family_step.snr_db(reference, reference) == float("inf")


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("family", sorted(family_step.FAMILIES))
def test_family_step_tiny_on_gpu(family, tmp_path, monkeypatch, capsys):
    """The whole benchmark at tiny sizes, eager (the compiled runs are the real benchmark's): every
    variant timed, torchao's row present (its times when torchao is installed, else the error), the
    ratios against it for both FP8 variants."""
    out = tmp_path / "step.json"
    monkeypatch.setattr(sys, "argv", ["family_step.py", "--family", family, "--tiny", "--iters", "2",
                                      "--no-compile", "--out", str(out)])
    runpy.run_path(str(REPO / "benchmarks" / "family_step.py"), run_name="__main__")
    data = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == data
    assert {"bf16_eager", "fp8_diffusers_blocks_eager", "fp8_fused_eager"} <= set(data["steps_ms"])
    # FP8 rounding of random tiny weights: one step stays well above 0.98 (the full-size runs
    # measure 0.984 to 0.999); the fused blocks change no FP8 math
    assert data["cosine_vs_bf16"]["fp8_fused"] > 0.98
    assert set(data["snr_db_vs_bf16"]) == set(data["cosine_vs_bf16"]) - {"bf16"}
    tao = data["torchao_float8_rowwise"]
    if importlib.util.find_spec("torchao") is None:
        assert tao["error"].startswith(("ImportError", "ModuleNotFoundError"))
        return
    assert "error" not in tao, tao
    assert tao["quantized_linears"] == data["quantized_linears"]
    assert data["cosine_vs_bf16"]["torchao_float8_rowwise"] > 0.98
    assert set(data["speedup_vs_torchao"]) == {"fp8_diffusers_blocks_eager", "fp8_fused_eager"}


# ------------------------------------------------------------------------------------------------
# benchmarks/family_quality.py

import family_quality  # noqa: E402


def test_family_quality_fp8_against_16bit_and_the_cli(tmp_path, capsys):
    """flux1 at 2 steps with the builtin plugins only: online fp8 and per-tensor fp8 lose a little
    against 16-bit, mxfp4's plugin is missing (an error entry, the run goes on), and the printed
    ``diffgen compare`` command, run through the CLI, reports the same per-step cosines and PSNR."""
    from diffgen.cli import main as cli

    out = tmp_path / "quality.json"
    result = family_quality.main(["--families", "flux1", "--variants", "fp8", "fp8_per_tensor", "mxfp4",
                                  "--steps", "2", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
    flux = result["families"]["flux1"]
    for variant in ("fp8", "fp8_per_tensor"):
        entry = flux[variant]
        assert entry["methods"]["transformer"] == ["16-bit", "fp8-reference"]
        assert len(entry["per_step_cosine"]) == 2 and len(entry["timesteps"]) == 2
        # FP8 rounding moves a tiny fp32 model's latents a little but not far: measured 0.99999 and
        # 60 dB on this CPU; 1.0 would mean nothing was quantized. 35 dB is test_cli_families' floor
        # for fp8 PNGs of the same tiny models (seed 0 against seed 1 gives 12-21 dB).
        assert all(0.999 < c < 1.0 for c in entry["per_step_cosine"])
        assert 35.0 <= entry["psnr_db"] < float("inf")
    assert "--candidate-transformer-path" in flux["fp8_per_tensor"]["command"]
    assert flux["mxfp4"]["error"].startswith("QuantConfigError") and "mxfp4" in flux["mxfp4"]["error"]
    assert result["table"]["flux1"]["mxfp4"] == "error"

    import shlex

    cli_json = tmp_path / "cli.json"
    argv = shlex.split(flux["fp8"]["command"])
    assert argv[:2] == ["diffgen", "compare"]
    assert cli([*argv[1:], "--output-json", str(cli_json)]) == 0
    reported = json.loads(cli_json.read_text())
    # the same runs (weights, noise, arithmetic), the reference run once here and once per compare there
    assert [s["cosine_similarity"] for s in reported["trajectory"]] == pytest.approx(flux["fp8"]["per_step_cosine"],
                                                                                     abs=1e-9)
    assert reported["summary"]["psnr_db"] == pytest.approx(flux["fp8"]["psnr_db"], abs=1e-9)
    assert reported["summary"]["ssim"] == pytest.approx(flux["fp8"]["ssim"], abs=1e-12)


def test_family_quality_two_expert_wan_and_a_variant_that_quantizes_nothing(tmp_path, monkeypatch):
    """wan's per-tensor variant quantizes both experts; diffgen-rocm's mxfp4 keeps every tiny linear
    (fewer than 256 outputs) 16-bit, so its run is the reference's exactly (cosine 1, PSNR inf)."""
    from diffgen.plugins import reset_plugins

    monkeypatch.setenv("DIFFGEN_PLUGINS", "rocm")
    reset_plugins()
    result = family_quality.main(["--families", "wan", "--variants", "fp8_per_tensor", "mxfp4", "--steps", "2",
                                  "--frames", "5", "--work-dir", str(tmp_path)])
    wan = result["families"]["wan"]
    per_tensor = wan["fp8_per_tensor"]
    assert per_tensor["output"] == "video"
    assert per_tensor["methods"] == {"transformer": ["16-bit", "fp8-reference"],
                                     "transformer_2": ["16-bit", "fp8-reference"]}
    assert "--candidate-transformer-2-path" in per_tensor["command"]
    assert all(0.999 < c < 1.0 for c in per_tensor["per_step_cosine"])  # as for flux1 above
    nothing = wan["mxfp4"]
    assert "error" not in nothing and nothing["note"].startswith("no linear was quantized")
    assert nothing["per_step_cosine"] == pytest.approx([1.0, 1.0], abs=1e-12) and nothing["psnr_db"] == float("inf")


def test_family_quality_head_dim_64_rebuilds_the_transformers_for_the_attention_variants(tmp_path, monkeypatch):
    """--head-dim 64 (the FP8 attention kernels need 64 or 128; the tiny models have 16 or 48):
    every transformer component of FLUX.1 and Z-Image (whose width is heads x head dim) is rebuilt
    at head dim 64 and its 16-bit run goes through; on the CPU the attention variant is an error
    entry naming why (the kernels are CUDA's, or diffgen-cuda is not loaded), and the run goes on."""
    import os

    import diffusers

    monkeypatch.delenv("DIFFGEN_FP8_ATTENTION_MIN_KEYS", raising=False)
    result = family_quality.main(["--families", "flux1", "z_image", "--variants", "attention_fp8", "fp8",
                                  "--head-dim", "64", "--steps", "1", "--work-dir", str(tmp_path)])
    assert result["head_dim"] == 64
    assert "DIFFGEN_FP8_ATTENTION_MIN_KEYS" not in os.environ  # set for the attention runs only
    for family, heads in (("flux1", "num_attention_heads"), ("z_image", "n_heads")):
        folder = tmp_path / f"{family}-head-dim-64" / "transformer"
        config = json.loads((folder / "config.json").read_text())
        model = getattr(diffusers, config["_class_name"]).from_pretrained(folder)
        attention = next(m for m in model.modules() if hasattr(m, "to_q"))
        assert attention.to_q.out_features // config[heads] == 64  # what each attention call's heads carry
        entry = result["families"][family]
        assert entry["attention_fp8"]["error"].startswith("DiffgenError: --attention fp8")  # no CUDA, or no plugin
        assert 0.99 < entry["fp8"]["min_step_cosine"] < 1.0  # the widened model runs, and FP8 moves it a little


def test_diffgen_bench_runs_the_two_expert_wan_pipeline_with_fp8(tmp_path):
    """Issue 18's whole-pipeline numbers for a video family: `diffgen bench` on the tiny Wan2.2
    A14B-layout pipeline (two experts) with online fp8 on the CPU."""
    from diffgen.cli import main as cli
    from diffgen.tiny.pipelines import build_tiny_pipeline

    model = build_tiny_pipeline("wan", tmp_path / "wan", seed=0)
    out = tmp_path / "bench.json"
    assert cli(["bench", "--model-path", str(model), "--candidate-quantization", "fp8", "--prompt", "a red fox",
                "--height", "32", "--width", "32", "--num-frames", "5", "--num-inference-steps", "2",
                "--device", "cpu", "--warmup-runs", "0", "--runs", "1", "--output-json", str(out)]) == 0
    data = json.loads(out.read_text())
    baseline, fp8 = data["baseline"], data["candidate"]
    for component in ("transformer", "transformer_2"):  # both experts quantized, each step timed
        assert set(baseline["methods"][component].values()) == {"16-bit"}
        assert set(fp8["methods"][component].values()) == {"16-bit", "fp8-reference"}
        # the planned linears' fp32 weights (4 bytes) become E4M3 (1 byte) plus per-channel scales
        assert fp8["weight_bytes"][component] < baseline["weight_bytes"][component]
    assert fp8["weight_bytes"]["vae"] == baseline["weight_bytes"]["vae"]
    assert data["sampling"]["num_inference_steps"] == 2 and data["sampling"]["num_frames"] == 5


@pytest.mark.cuda
@gpu
def test_family_quality_on_gpu_runs_the_fused_fp8_methods(monkeypatch):
    """--device cuda: online fp8 runs diffgen-cuda's Triton methods (and the family's rewritten
    blocks) in bf16, against the bf16 pipeline."""
    from diffgen.plugins import reset_plugins

    monkeypatch.setenv("DIFFGEN_PLUGINS", "cuda")
    reset_plugins()
    result = family_quality.main(["--device", "cuda", "--families", "flux1", "wan", "--variants", "fp8",
                                  "fp8_per_tensor", "--steps", "2"])
    assert result["dtype"] == "bfloat16"
    for family in ("flux1", "wan"):
        for variant in ("fp8", "fp8_per_tensor"):
            entry = result["families"][family][variant]
            assert "error" not in entry, entry
            # E4M3 rounding against a bf16 reference on tiny random models: the CPU's fp32 runs
            # measure 0.9999+ and 54-60 dB; bf16 adds its own rounding to both sides, so the bounds
            # here are looser (0.99, and 30 dB, still far above the 12-21 dB of another seed)
            assert all(0.99 < c <= 1.0 for c in entry["per_step_cosine"])
            assert entry["psnr_db"] >= 30.0
        assert "fp8-triton-scaled-mm" in result["families"][family]["fp8"]["methods"]["transformer"]


@pytest.mark.cuda
@gpu
def test_family_quality_on_gpu_runs_fp8_attention_at_head_dim_64(monkeypatch):
    """--head-dim 64 with the attention variant: every attention call of the tiny FLUX.1 and Wan
    reaches the Triton FP8 kernel (the run routes even short sequences), and the output stays near
    the bf16 pipeline's."""
    from diffgen.plugins import reset_plugins

    monkeypatch.setenv("DIFFGEN_PLUGINS", "cuda")
    reset_plugins()
    result = family_quality.main(["--device", "cuda", "--families", "flux1", "wan", "--variants", "attention_fp8",
                                  "--head-dim", "64", "--size", "64", "--steps", "2"])
    for family in ("flux1", "wan"):
        entry = result["families"][family]["attention_fp8"]
        assert "error" not in entry, entry
        assert entry["command"].startswith("DIFFGEN_FP8_ATTENTION_MIN_KEYS=0 diffgen compare")
        for stats in entry["attention"].values():
            assert stats["backend"] == "fp8" and stats["calls"] > 0 and not stats["fallbacks"]
        # the kernel's ~4% per-call error, through two tiny blocks and two steps: bounds as for fp8
        assert all(0.99 < c <= 1.0 for c in entry["per_step_cosine"]) and entry["psnr_db"] >= 30.0
