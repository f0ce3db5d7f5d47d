"""Tiny SVDQuant checkpoints of each family SGLang-Diffusion documents (FLUX.1, Qwen-Image,
Qwen-Image-Edit, Z-Image), in nunchaku's layout, through diffgen's loader and CLI on the CPU.

Each test widens the family's tiny transformer so every quantized linear is a multiple of 128
wide (nunchaku's packer requires it), writes it into the tiny pipeline, quantizes it in the test
(svdq_writer, written from the format's definition) and checks:
- every loaded layer against the format's forward computed independently from the test's own
  logical values (relative error <= 1e-4: both sides do the same fp32/fp64 arithmetic on the same
  4-bit values; only summation order differs);
- the whole transformer against the dense model W_eff = R / smooth + up @ down (cosine >= 0.99:
  they differ by the 4-bit activation rounding only) and the 16-bit model (cosine >= 0.9: 4-bit
  weights and activations at rank 16 on random weights, a loose sanity bound);
- ``diffgen generate`` with the file (and a Lightning-like 4-step run), and ``diffgen inspect``.
"""

import json

import diffusers
import pytest
import torch

from diffgen.cli import main
from diffgen.loader import load_transformer
from diffgen.tiny.transformers import tiny_transformer_inputs
import svdq_writer as W

from svdq_families import RANK, WIDE


def _flat(t):
    return torch.cat([x.flatten() for x in t]) if isinstance(t, (list, tuple)) else t.flatten()


def cosine(a, b):  # Z-Image returns a list of images
    return float(torch.nn.functional.cosine_similarity(_flat(a).double(), _flat(b).double(), dim=0))


@pytest.mark.parametrize("family,precision", [("flux1", "int4"), ("flux1", "nvfp4"), ("qwen_image", "int4"),
                                              ("z_image", "int4")])
def test_every_layer_and_the_model_match_the_format(checkpoint, family, precision):
    pipe, path, model, records = checkpoint(family, precision)
    loaded = load_transformer(pipe / "transformer", weights_path=path, device="cpu", dtype="fp32")
    W.assert_layers_follow_the_records(loaded, records, precision)

    dense = getattr(diffusers, type(model).__name__)(**WIDE[family][1]).eval()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, rec in records.items():
            w, b = W.dense_weight(rec, precision)
            linear = dense.get_submodule(name)
            linear.weight.copy_(w.float())
            if linear.bias is not None:
                linear.bias.copy_(b.float())
        inputs = tiny_transformer_inputs(family, model)
        out_loaded = loaded(**inputs, return_dict=False)[0]
        out_dense = dense(**inputs, return_dict=False)[0]
        out_16 = model(**inputs, return_dict=False)[0]
    assert cosine(out_loaded, out_dense) >= 0.99
    assert cosine(out_loaded, out_16) >= 0.9


def _generate(pipe, path, out, name, family, steps, *flags):
    argv = ["generate", "--model-path", str(pipe), "--transformer-path", str(path), "--prompt", "a fox",
            "--height", "32", "--width", "32", "--num-inference-steps", str(steps), "--dtype", "fp32",
            "--device", "cpu", "--output-path", str(out), "--output-file-name", name, "--perf-json",
            str(out / f"{name}.json"), "--quiet", *flags]
    if family == "qwen_image_edit":
        from PIL import Image
        image = out / "input.png"
        Image.new("RGB", (32, 32), (200, 40, 90)).save(image)
        argv += ["--image-path", str(image)]
    assert main(argv) == 0
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family,steps", [("flux1", 4), ("qwen_image", 2), ("qwen_image_edit", 2), ("z_image", 4)])
def test_cli_generates_from_the_svdq_file(checkpoint, family, steps, tmp_path):
    pipe, path, _, _ = checkpoint(family if family != "qwen_image_edit" else "qwen_image_edit")
    perf = _generate(pipe, path, tmp_path, "svdq", family, steps)
    methods = set(perf["methods"]["transformer"].values())
    assert any("svdq-w4a4-reference" in m for m in methods), methods
    assert (tmp_path / "svdq.png").is_file()


@pytest.mark.slow
def test_flags_agree_or_fail(checkpoint, tmp_path, capsys):
    pipe, path, _, _ = checkpoint("flux1")
    _generate(pipe, path, tmp_path, "flags", "flux1", 2, "--enable-svdquant", "--quantization-precision", "int4",
              "--quantization-rank", str(RANK))
    capsys.readouterr()
    assert main(["generate", "--model-path", str(pipe), "--transformer-path", str(path), "--prompt", "a fox",
                 "--device", "cpu", "--quiet", "--quantization-precision", "nvfp4"]) != 0
    err = capsys.readouterr().err
    assert "a flag contradicts the checkpoint" in err and "nvfp4" in err


def test_inspect_shows_rank_precision_and_layer_kinds(checkpoint, capsys):
    pipe, path, _, _ = checkpoint("flux1")
    from diffgen.api import inspect
    report = inspect(pipe / "transformer", weights_path=path, device="cpu", dtype="fp32")
    params = report["winner"]["config"]["params"]
    assert (params["precision"], params["rank"], params["awq_layers"], params["svdq_layers"]) == ("int4", RANK, 3, 17)
    methods = {g["pattern"]: (g["action"], g["method"]) for g in report["groups"]}
    assert methods["transformer_blocks.*.attn.to_q"] == ("quantize", "svdq-w4a4-reference")
    assert methods["transformer_blocks.*.norm1.linear"] == ("quantize", "awq-w4a16-reference")
    assert methods["x_embedder"][0] == "keep"
    schemes = report["winner"]["config"]["layer_schemes"]
    assert schemes["single_transformer_blocks.0.proj_out"] == f"svdq 128r{RANK}+512r{RANK}u"


def test_inspect_on_the_command_line_checks_the_flags_too(checkpoint, capsys):
    pipe, path, _, _ = checkpoint("flux1")
    base = ["inspect", str(pipe / "transformer"), "--weights-path", str(path), "--device", "cpu"]
    assert main(base + ["--enable-svdquant", "--quantization-rank", str(RANK)]) == 0
    assert "rank" in capsys.readouterr().out
    assert main(base + ["--quantization-rank", str(RANK * 2)]) != 0
    assert "a flag contradicts the checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_takes_the_svdquant_flags_per_side(checkpoint, tmp_path, capsys):
    """diffgen compare: the SVDQuant side (its flags checked against the file) against the 16-bit
    model it was made from, per step; a rank that contradicts the file stops that side's load."""
    import json

    pipe, path, _, _ = checkpoint("flux1")
    base = ["compare", "--model-path", str(pipe), "--prompt", "a fox", "--height", "32", "--width", "32",
            "--num-inference-steps", "2", "--device", "cpu", "--candidate-transformer-weights-path", str(path),
            "--output-json", str(tmp_path / "compare.json")]
    assert main(base + ["--candidate-enable-svdquant", "--candidate-quantization-rank", str(RANK)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["candidate"]["source"]["quantization_rank"] == RANK
    capsys.readouterr()
    assert main(base + ["--candidate-quantization-rank", str(RANK * 2)]) != 0
    assert "a flag contradicts the checkpoint" in capsys.readouterr().err
