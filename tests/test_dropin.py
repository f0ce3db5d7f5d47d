"""SGLang-Diffusion's command lines work with `diffgen` in place of `sglang`: its flag spellings and
meanings, and the rough edges a new user meets first, each through the CLI and the API."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import diffgen
from diffgen.cli import main
from diffgen.cli.common import component_overrides
from diffgen.errors import DiffgenError
from diffgen.offload import offload_transformers
from diffgen.tiny.pipelines import build_tiny_pipeline

SMALL = ["--num-inference-steps", "1", "--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_pipeline("flux1", tmp_path_factory.mktemp("pipe") / "flux")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffgen: error: "), err
    return err[0]


@pytest.mark.parametrize("spelling, expected", [
    (["--transformer-2-path", "A"], ({"transformer_2": "A"}, {})),
    (["--transformer_2_path", "A"], ({"transformer_2": "A"}, {})),
    (["--component_paths.transformer_2=A"], ({"transformer_2": "A"}, {})),
    (["--component-paths.transformer_2", "A"], ({"transformer_2": "A"}, {})),
    (["--component-weights-paths.transformer", "W"], ({}, {"transformer": "W"})),
    (["--component_weights_paths.transformer=W"], ({}, {"transformer": "W"})),
    (["--vae-weights-path=W", "--text-encoder-path", "T"], ({"text_encoder": "T"}, {"vae": "W"})),
])
def test_every_component_path_spelling_of_sglangs_docs(spelling, expected):
    assert component_overrides(spelling) == expected


@pytest.mark.parametrize("alias", ["--transformer-quantized-path", "--quantized-model-path"])
def test_legacy_weights_path_names_are_the_weights_path(alias, pipe_dir, tmp_path):
    weights = pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    perf = tmp_path / "perf.json"
    assert main(["generate", "--model-path", str(pipe_dir), alias, str(weights), "--prompt", "x", *SMALL,
                 "--no-save-output", "--perf-json", str(perf), "--quiet"]) == 0
    assert json.loads(perf.read_text())["command"][4] == alias


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda_is_one_line(device, capsys):
    assert main(["generate", "--prompt", "x", "--device", device]) == 2
    assert "this torch" in one_line_error(capsys)
    with pytest.raises(DiffgenError, match=f"^--device {device}: "):
        diffgen.load_transformer("anything", device=device)


def test_offload_flags_name_themselves_and_refuse_the_cpu(capsys):
    assert main(["generate", "--prompt", "x", "--pipeline-cpu-offload", "--device", "cpu"]) == 2
    assert "--pipeline-cpu-offload moves weights" in one_line_error(capsys)
    assert main(["generate", "--prompt", "x", "--dit-cpu-offload", "--pipeline-cpu-offload"]) == 2
    assert "--dit-cpu-offload and --pipeline-cpu-offload contradict" in one_line_error(capsys)


def test_dit_cpu_offload_moves_only_the_transformer_in_for_denoising_and_out_for_the_vae(pipe_dir):
    pipe = diffgen.load_pipeline(pipe_dir, device="cpu")
    moves = []
    for name in ("transformer", "text_encoder", "vae"):
        component = pipe.components[name]
        original = component.to

        def to(*args, _name=name, _original=original, **kwargs):
            moves.append((_name, str(args[0])))
            return _original(*args, **kwargs)

        component.to = to
    # "cpu:0" is a device other than the parameters' "cpu", so every move the hooks make is seen.
    offload_transformers(pipe, torch.device("cpu:0"))
    moves.clear()
    decode = pipe.vae.decode
    pipe.vae.decode = lambda *a, **k: (moves.append(("vae.decode", "")), decode(*a, **k))[1]
    with torch.inference_mode():
        pipe(prompt="x", num_inference_steps=2, height=64, width=64)
    assert moves[0] == ("transformer", "cpu:0")
    assert ("transformer", "cpu") in moves[moves.index(("vae.decode", "")) - 1:]
    assert {name for name, _ in moves} == {"transformer", "vae.decode"}  # the other components stay put


def test_profile_writes_a_trace_of_the_steps_and_names_the_top_operators(pipe_dir, tmp_path, capsys):
    assert main(["generate", "--model-path", str(pipe_dir), "--prompt", "x", *SMALL, "--no-save-output",
                 "--profile", str(tmp_path / "prof"), "--device", "cpu"]) == 0
    trace = json.loads((tmp_path / "prof" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert any(str(n).startswith("aten::") for n in names)
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("profile: "))
    assert "top operators (CPU) by self time: aten::" in line


def test_generate_says_which_layers_online_quantization_kept_and_how_to_quantize_them(pipe_dir, capsys):
    assert main(["generate", "--model-path", str(pipe_dir), "--prompt", "x", *SMALL, "--no-save-output",
                 "--quantization", "fp8"]) == 0
    err = capsys.readouterr().err
    assert "transformer: kept 10 precision-sensitive layers 16-bit (context_embedder, " in err
    assert "--quantize-all-layers quantizes them too" in err
    assert "torchvision" not in err  # transformers' PIL-fallback notices are not the user's business


def test_inspect_quantize_all_layers_keeps_nothing(pipe_dir, capsys):
    assert main(["inspect", str(pipe_dir / "transformer"), "--quantization", "fp8", "--quantize-all-layers",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transformer"]["layers"]["kept_16bit"] == 0


def test_unknown_quant_backend_with_nothing_to_quantize_is_refused(pipe_dir, capsys):
    assert main(["inspect", str(pipe_dir / "transformer"), "--quant-backend", "nosuch"]) == 2
    assert "--quant-backend nosuch has nothing to choose for" in one_line_error(capsys)


def test_single_weights_file_without_a_config_says_what_is_needed(pipe_dir, tmp_path, capsys):
    lone = tmp_path / "flux1-dev.safetensors"
    lone.symlink_to(pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DiffgenError, match="^no model config: .*--model-path with --transformer-weights-path"):
        diffgen.load_transformer(lone)
    assert main(["inspect", str(lone)]) == 2
    assert "_class_name=None" not in one_line_error(capsys)


def test_outputs_follow_the_umask_like_every_other_tool(pipe_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "fp8"
        diffgen.quantize(pipe_dir / "transformer", out)
        cache = tmp_path / "cache"
        from diffgen.tiny.pipelines import embedded_default_pipeline

        model = embedded_default_pipeline(cache)
    finally:
        os.umask(old)
    for directory in (out, model):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory
    for file in [*out.iterdir(), *model.rglob("*.safetensors")]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_transformer_path_naming_one_file_overrides_only_the_weights(pipe_dir, tmp_path):
    weights = pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    perf = tmp_path / "perf.json"
    assert main(["generate", "--model-path", str(pipe_dir), "--transformer-path", str(weights), "--prompt", "x",
                 *SMALL, "--no-save-output", "--perf-json", str(perf), "--quiet"]) == 0


def test_a_component_of_pickles_needs_trust_pickle(pipe_dir, tmp_path, capsys):
    import shutil

    vae = shutil.copytree(pipe_dir / "vae", tmp_path / "vae")
    weights = next(vae.glob("*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(weights), vae / "diffusion_pytorch_model.bin")
    weights.unlink()
    assert main(["generate", "--model-path", str(pipe_dir), "--vae-path", str(vae), "--prompt", "x", *SMALL,
                 "--no-save-output"]) == 2
    assert "component 'vae' holds only pickle weights" in one_line_error(capsys)
    assert main(["generate", "--model-path", str(pipe_dir), "--vae-path", str(vae), "--prompt", "x", *SMALL,
                 "--no-save-output", "--trust-pickle", "--quiet"]) == 0


def test_tools_never_touch_a_file_or_a_users_old_directory(pipe_dir, tmp_path):
    from diffgen.errors import DiffgenError

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(DiffgenError, match="not a checkpoint directory; --overwrite replaces a directory"):
        diffgen.quantize(pipe_dir / "transformer", a_file, overwrite=True)
    assert a_file.read_text() == "mine"
    out = tmp_path / "fp8"
    (tmp_path / ".fp8.old").mkdir()
    (tmp_path / ".fp8.old" / "keep").write_text("mine too")
    diffgen.quantize(pipe_dir / "transformer", out)
    diffgen.quantize(pipe_dir / "transformer", out, overwrite=True)
    assert (tmp_path / ".fp8.old" / "keep").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fp8.old", "fp8", "notes.txt"]


def test_a_killed_writers_staging_directory_is_cleaned_up(pipe_dir, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".fp8.tmp-abc123"
    stale.mkdir()
    (stale / "shard.safetensors").write_bytes(b"x" * 1000)
    (stale / ".diffgen-owner-pid").write_text(dead.stdout.strip())
    foreign = tmp_path / ".fp8.tmp-notours"
    foreign.mkdir()  # no owner file: not diffgen's, left alone
    diffgen.quantize(pipe_dir / "transformer", tmp_path / "fp8")
    assert not stale.exists() and foreign.exists()
    assert not (tmp_path / "fp8" / ".diffgen-owner-pid").exists()
