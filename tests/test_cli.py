"""The diffgen command line: generate's flags and perf.json, inspect, plugins, quantize, errors, progress.

Most tests call `diffgen.cli.main` in-process on the tiny FLUX.1 pipeline (32x32 px, 2 steps, fp32 on
the CPU); the embedded-default test runs the installed console script, as a user would.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffgen.cli import main
from diffgen.quant import layer_group
from diffgen.tiny.pipelines import EMBEDDED_DEFAULT_VERSION, build_tiny_pipeline
from diffgen.tiny.transformers import save_tiny_transformer
from diffgen.tools import quantize as quantize_tool

DIFFGEN = Path(sys.executable).with_name("diffgen")  # the console script installed beside this python
STEPS = 2
# fp8 against the 16-bit PNG of the tiny FLUX.1 measures 59 dB, two seeds 12.6 dB (every family:
# tests/test_cli_families.py); 35 dB is that file's floor for PNGs.
FP8_PSNR_FLOOR_DB = 35.0


def run_cli(argv: list[str]) -> int:
    """`main`'s exit status, whether it returns it or argparse raises SystemExit with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def generate_argv(model: Path, out: Path, *flags: str, name: str = "out") -> list[str]:
    return ["generate", "--model-path", str(model), "--prompt", "a red fox in the snow",
            "--height", "32", "--width", "32", "--num-inference-steps", str(STEPS), "--dtype", "fp32",
            "--device", "cpu", "--output-path", str(out), "--output-file-name", name, *flags]


def read_png(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("flux1"), seed=0)


@pytest.fixture(scope="module")
def flux_fp8_transformer(flux, tmp_path_factory) -> Path:
    """The flux pipeline's transformer as an fp8 checkpoint (config.json declares quant_method fp8)."""
    out = tmp_path_factory.mktemp("fp8") / "transformer"
    quantize_tool.quantize(flux / "transformer", out)
    return out


@pytest.fixture(scope="module")
def flux_16bit_png(flux, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("reference")
    assert main(generate_argv(flux, out, "--quiet")) == 0
    return read_png(out / "out.png")


# -- generate -----------------------------------------------------------------------------------
def test_embedded_default_runs_offline_and_says_which_model_and_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFGEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([str(DIFFGEN), "generate", "--prompt", "x"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0, result.stderr
    model = cache / f"default-model-{EMBEDDED_DEFAULT_VERSION}"
    assert (model / "model_index.json").is_file()
    assert "embedded default model (tiny FLUX.1" in result.stderr and str(model) in result.stderr
    written = Path("outputs") / "x_seed0.png"
    assert f"diffgen: wrote {written} (FluxPipeline from {model}" in result.stderr
    assert read_png(tmp_path / written).shape == (256, 256, 3)  # FluxPipeline's default size for this VAE
    # The budget is 60 s of wall time on an idle 2-core CPU; on a shared machine the wall time also
    # measures the neighbours. This run is CPU-bound, so its wall time when idle is at most its CPU
    # time. Measured with the model build on 2 cores: 19 s wall and 20 s CPU when idle; 64 s wall
    # but 32 s CPU at a load average of 7.
    cpu_seconds = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    assert cpu_seconds < 60, f"{cpu_seconds:.1f} s of CPU, including building the model on first use"


def test_perf_json_has_stages_memory_weights_methods_device_and_command(flux, tmp_path):
    runs = {}
    for name, flags in (("16bit", ()), ("fp8", ("--quantization", "fp8"))):
        argv = generate_argv(flux, tmp_path, "--quiet", "--perf-json", str(tmp_path / f"{name}.json"), *flags,
                             name=name)
        assert main(argv) == 0
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert runs[name]["command"] == ["diffgen", *argv]

    perf = runs["fp8"]
    assert perf["output"] == str(tmp_path / "fp8.png") and (tmp_path / "fp8.png").is_file()
    stages = perf["stages"]
    assert stages["text_encoding_s"] > 0 and stages["vae_decode_s"] > 0
    assert len(stages["denoising_steps_s"]) == STEPS and all(s > 0 for s in stages["denoising_steps_s"])
    assert perf["peak_host_memory_bytes"] > 0
    assert perf["peak_device_memory_bytes"] is None  # no accelerator in this run
    assert perf["device"]["device_kind"] == "cpu" and perf["dtype"] == "float32"

    components = {"transformer", "vae", "text_encoder", "text_encoder_2"}
    for run in runs.values():
        assert set(run["weight_bytes"]) == components and all(b > 0 for b in run["weight_bytes"].values())
    # Each quantized [N, K] weight goes from 4 bytes (fp32) to 1 byte (fp8) a value plus one fp32
    # scale per output channel; biases and every other component keep their bytes.
    quantized = {name for name, method in perf["methods"]["transformer"].items() if method == "fp8-reference"}
    with safe_open(flux / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as checkpoint:
        shapes = {n[: -len(".weight")]: checkpoint.get_slice(n).get_shape() for n in checkpoint.keys()
                  if n.endswith(".weight")}
    saved = sum(4 * n * k - (n * k + 4 * n) for n, k in (shape for layer, shape in shapes.items()
                                                          if layer_group(layer) in quantized))
    assert saved > 0
    assert runs["fp8"]["weight_bytes"] == {**runs["16bit"]["weight_bytes"],
                                           "transformer": runs["16bit"]["weight_bytes"]["transformer"] - saved}

    assert set(perf["methods"]) == {"transformer"}  # only diffgen-loaded components have a plan
    methods = perf["methods"]["transformer"]
    assert methods["transformer_blocks.*.attn.to_q"] == "fp8-reference"
    assert methods["single_transformer_blocks.*.proj_mlp"] == "fp8-reference"
    assert methods["x_embedder"] == "16-bit"  # embedders stay 16-bit when quantizing online
    assert set(runs["16bit"]["methods"]["transformer"].values()) == {"16-bit"}
    # Rewrites come from plugins (tests/test_rewrites.py); these tests load none.
    assert perf["rewrites"] == {} and runs["16bit"]["rewrites"] == {}
    assert runs["16bit"]["methods"]["transformer"].keys() == methods.keys()


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> dict[str, Path]:
    """The flux1 transformer under seed 7 as a directory, a single file, shards and an index."""
    root = tmp_path_factory.mktemp("weights")
    directory = save_tiny_transformer("flux1", root / "seed7", seed=7, dtype=torch.float32)
    single = directory / "diffusion_pytorch_model.safetensors"
    tensors = load_file(single)
    names = sorted(tensors)
    shards = root / "shards"
    shards.mkdir()
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.array(names), 3)):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(shards / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk.tolist(), shard))
    index = shards / "diffusion_pytorch_model.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"directory": directory, "single file": single, "sharded directory": shards, "index file": index}


@pytest.fixture(scope="module")
def other_transformer_png(flux, other_weights, tmp_path_factory) -> np.ndarray:
    """The output with the whole seed-7 transformer directory swapped in (--transformer-path)."""
    out = tmp_path_factory.mktemp("other-transformer")
    assert main(generate_argv(flux, out, "--quiet", "--transformer-path", str(other_weights["directory"]))) == 0
    return read_png(out / "out.png")


@pytest.mark.parametrize("layout", ["single file", "sharded directory", "index file"])
def test_transformer_weights_path_takes_a_file_shards_or_an_index(layout, flux, other_weights, other_transformer_png,
                                                                  flux_16bit_png, tmp_path):
    assert main(generate_argv(flux, tmp_path, "--quiet", "--transformer-weights-path",
                              str(other_weights[layout]))) == 0
    weights_only = read_png(tmp_path / "out.png")
    assert np.array_equal(weights_only, other_transformer_png)  # the same tensors, however they are laid out
    assert not np.array_equal(weights_only, flux_16bit_png)  # and not the pipeline's own transformer


def test_quantize_writes_a_sharded_checkpoint_that_generate_uses(flux, flux_16bit_png, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(quantize_tool, "SHARD_BYTES", 64 << 10)
    checkpoint = tmp_path / "fp8"
    assert main(["quantize", str(flux / "transformer"), str(checkpoint)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["shards"] > 1 and stats["quantized_layers"] > 0
    assert (checkpoint / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert json.loads((checkpoint / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"

    perf_json = tmp_path / "perf.json"
    assert main(generate_argv(flux, tmp_path, "--quiet", "--transformer-path", str(checkpoint),
                              "--perf-json", str(perf_json))) == 0
    methods = json.loads(perf_json.read_text())["methods"]["transformer"]
    assert methods["transformer_blocks.*.attn.to_q"] == "fp8-reference"
    assert psnr(read_png(tmp_path / "out.png"), flux_16bit_png) >= FP8_PSNR_FLOOR_DB


# -- inspect ------------------------------------------------------------------------------------
def test_inspect_table_shows_claim_evidence_methods_and_weight_bytes(flux_fp8_transformer, capsys):
    assert main(["inspect", str(flux_fp8_transformer)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("== transformer: FluxTransformer2DModel from ")
    assert ("claim * fp8 (specificity 30): quantization_config.quant_method=fp8 in config.json, "
            "activation_scheme=dynamic; per-channel scales found in the tensors") in out
    assert "config: family=fp8 scheme=per-channel online=False" in out
    rows = {line.split()[0]: line.split(None, 4) for line in out.splitlines()
            if line.startswith(("transformer_blocks", "proj_out"))}
    assert rows["transformer_blocks.*.attn.to_q"][2:4] == ["quantize", "fp8-reference"]
    assert rows["transformer_blocks.*.attn.to_q"][4].startswith("reference method of plugin fp8 (not native: ")
    assert rows["proj_out"][2:] == ["keep", "16-bit", "excluded by the checkpoint ('proj_out')"]
    assert re.search(r"^weights: [\d.]+ MiB in 16-bit -> [\d.]+ MiB planned \(0\.\d\dx\)$", out, re.MULTILINE)


def test_inspect_online_quantization_of_a_16bit_checkpoint(flux, capsys):
    assert main(["inspect", str(flux / "transformer"), "--quantization", "fp8",
                 "--quantization-ignored-layers", "proj_mlp"]) == 0
    out = capsys.readouterr().out
    assert "claim * fp8 (specificity 100): --quantization fp8 on a 16-bit checkpoint" in out
    assert "precision-sensitive: diffgen keeps 'x_embedder'" in out
    assert "ignored by --quantization-ignored-layers 'proj_mlp'" in out


def test_inspect_json(flux_fp8_transformer, capsys):
    assert main(["inspect", str(flux_fp8_transformer), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["transformer"]
    assert {"claims", "winner", "groups", "weight_bytes"} <= report.keys()
    assert report["winner"]["plugin"] == "fp8" and report["winner"]["config"]["scheme"] == "per-channel"
    assert "per-channel scales found in the tensors" in report["claims"][0]["evidence"]
    kinds = {(g["action"], g["method"], g["kind"]) for g in report["groups"]}
    assert kinds == {("quantize", "fp8-reference", "reference"), ("keep", None, None)}
    assert report["layers"]["quantized"] == sum(g["layers"] for g in report["groups"] if g["action"] == "quantize")
    assert 0 < report["weight_bytes"]["planned"] < report["weight_bytes"]["16bit"]


def test_inspect_pipeline_covers_each_transformer_component(tmp_path, capsys):
    wan = build_tiny_pipeline("wan", tmp_path / "wan", seed=0)
    assert main(["inspect", str(wan), "--quantization", "fp8", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert set(reports) == {"transformer", "transformer_2"}
    for report in reports.values():
        assert report["model_class"] == "WanTransformer3DModel" and report["winner"]["plugin"] == "fp8"
    assert main(["inspect", str(wan)]) == 0
    out = capsys.readouterr().out
    assert "== transformer: WanTransformer3DModel" in out and "== transformer_2: WanTransformer3DModel" in out
    assert out.count("claims: none (16-bit checkpoint)") == 2


# -- plugins ------------------------------------------------------------------------------------
def test_plugins_table_and_all(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("platform: cpu ") and "no external plugins installed" in out  # conftest hides them
    assert main(["plugins", "--all"]) == 0
    out = capsys.readouterr().out
    assert ("fp8 (builtin, diffgen.builtin.fp8): hooks check_platform, create_linear_method, "
            "detect_quant_config, repack_checkpoint") in out
    assert "    fp8-scaled-mm (torch._scaled_mm): unavailable: FP8 GEMMs need a CUDA SM89+" in out
    assert "    fp8-reference (PyTorch dequantize + matmul): available: runs on every device" in out


def test_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plugins"] == [] and info["failures"] == [] and info["platform"]["device_kind"] == "cpu"
    assert main(["plugins", "--json", "--all"]) == 0
    builtin = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    assert sorted(builtin) == ["bfl", "fp8"] and builtin["bfl"]["hooks"] == ["repack_checkpoint"]
    fp8 = builtin["fp8"]
    assert fp8["name"] == "fp8" and fp8["builtin"] and "version" in fp8
    assert set(fp8["hooks"]) >= {"detect_quant_config", "create_linear_method", "check_platform"}
    kernels = {k["name"].split()[0]: k for k in fp8["platform"]["kernels"]}
    assert kernels["fp8-scaled-mm"]["available"] is False and "this device is cpu" in kernels["fp8-scaled-mm"]["reason"]
    assert kernels["fp8-reference"]["available"] is True and kernels["fp8-reference"]["reason"]


# -- errors: one line, exit status 2 ------------------------------------------------------------
# name -> (argv built from `at`: the flux pipeline, its fp8 transformer, a regular file, a scratch
# directory; what the error line says)
ERROR_CASES = {
    "quantization on a quantized checkpoint": (
        lambda at: generate_argv(at.flux, at.tmp, "--transformer-path", str(at.fp8), "--quantization", "fp8"),
        "already quantized"),
    "contradictory offload flags": (
        lambda at: generate_argv(at.flux, at.tmp, "--dit-cpu-offload", "--dit-layerwise-offload"),
        "contradict each other"),
    "offload on the CPU": (lambda at: generate_argv(at.flux, at.tmp, "--dit-cpu-offload"), "this run is on the CPU"),
    "no model_index.json": (lambda at: generate_argv(at.flux / "transformer", at.tmp), "has no model_index.json"),
    "unknown component": (lambda at: generate_argv(at.flux, at.tmp, "--nonexistent-path", str(at.tmp)),
                          "unknown component 'nonexistent'"),
    "no transformer_2 in this pipeline": (
        lambda at: generate_argv(at.flux, at.tmp, "--transformer-2-path", str(at.fp8)),
        "unknown component 'transformer_2'"),
    "output path under a file": (lambda at: generate_argv(at.flux, at.file / "outputs"),
                                 "cannot write to --output-path"),
    "unknown flag": (lambda at: generate_argv(at.flux, at.tmp, "--bogus", "1"), "unrecognized argument '--bogus'"),
    "missing --prompt": (lambda at: ["generate", "--model-path", str(at.flux)], "required: --prompt"),
    "unknown flag of inspect": (lambda at: ["inspect", str(at.fp8), "--bogus"], "unrecognized arguments: --bogus"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_are_one_line_with_exit_status_2(case, flux, flux_fp8_transformer, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    make_argv, says = ERROR_CASES[case]
    at = SimpleNamespace(flux=flux, fp8=flux_fp8_transformer, file=a_file, tmp=tmp_path)
    assert run_cli(make_argv(at)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffgen: error: "), captured.err
    assert says in lines[0]
    assert not list(tmp_path.glob("*.png"))


# -- progress -----------------------------------------------------------------------------------
def test_quiet_prints_no_progress(flux, tmp_path, capfd):
    logger = logging.getLogger("diffgen")
    logger.setLevel(logging.DEBUG)  # a caller's own setting, which the command must hand back
    try:
        assert main(generate_argv(flux, tmp_path, "--quiet")) == 0
        assert logger.level == logging.DEBUG  # else later warnings in this process would be silenced
    finally:
        logger.setLevel(logging.NOTSET)
    captured = capfd.readouterr()
    assert (tmp_path / "out.png").is_file() and captured.out == ""
    for progress in ("loading weights", "denoising", "Loading pipeline components", "it/s", "\r"):
        assert progress not in captured.err


def test_progress_off_a_terminal_is_plain_lines(flux, tmp_path, capfd):
    assert main(generate_argv(flux, tmp_path)) == 0
    err = capfd.readouterr().err
    assert "\r" not in err  # no redrawn bars: stderr here is a pipe, not a terminal
    loading = [line for line in err.splitlines() if line.startswith("loading weights: ")]
    assert loading[0].startswith("loading weights:   0% (0.0 of ") and loading[-1].startswith("loading weights: 100% (")
    assert all(line.endswith(" MiB, shard 1/1)") for line in loading)
    steps = [line for line in err.splitlines() if line.startswith("denoising: ")]
    assert [line.split(" (")[0] for line in steps] == [f"denoising: step {i}/{STEPS}" for i in (1, 2)]
    assert f"diffgen: wrote {tmp_path / 'out.png'} (FluxPipeline from {flux}, seed 0" in err


def test_an_internal_error_is_one_line_saying_it_is_a_bug(monkeypatch, capsys):
    import diffgen.cli.inspect as command

    def broken(args, extra):
        raise KeyError("a plugin's dict went missing")

    monkeypatch.setattr(command, "run", broken)
    monkeypatch.delenv("DIFFGEN_DEBUG", raising=False)
    assert main(["inspect", "anything"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffgen: internal error, a bug in diffgen or a plugin (KeyError")
    assert "DIFFGEN_DEBUG=1" in err[0]
    monkeypatch.setenv("DIFFGEN_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["inspect", "anything"])

