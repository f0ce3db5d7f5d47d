"""diffusers' ``nunchaku_lite`` checkpoints (``NunchakuLiteQuantizationConfig``, diffusers 0.42): the
tensors nunchaku's kernels take, stored per diffusers linear under its own name, declared by a
quantization_config listing the targets. diffusers itself loads them only on a CUDA GPU with
nunchaku's kernels, never on Hopper; diffgen reads them into its plain layouts and runs them with
the reference method here (and the packed4 methods on Hopper).

The checkpoints are written by the test from the format's definition (svdq_writer, index
arithmetic independent of the plugin's unpacking), and every loaded layer is held to the forward
computed from the writer's own logical values, as test_end_to_end.py does for nunchaku's files."""

import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffgen.errors import DiffgenError
from diffgen.loader import load_transformer
from diffgen.tiny.transformers import tiny_transformer_inputs
import svdq_writer as W

from svdq_families import RANK, WIDE

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    built = {}

    def get(precision):
        if precision not in built:
            cls, kwargs = WIDE["flux1"]
            torch.manual_seed(0)
            model = getattr(diffusers, cls)(**kwargs).eval()
            tensors, qc, records = W.quantize_model_lite(model, precision, rank=RANK)
            path = tmp_path_factory.mktemp(f"lite-{precision}")
            (path / "config.json").write_text(json.dumps({**dict(model.config), "_class_name": cls,
                                                          "quantization_config": qc}))
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / WEIGHTS), metadata={"format": "pt"})
            built[precision] = path, model, records
        return built[precision]

    return get


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_every_layer_and_the_model_match_the_format(lite, precision):
    path, model, records = lite(precision)
    loaded = load_transformer(path, device="cpu", dtype="fp32")
    plan = loaded.diffgen_plan
    assert plan.claim.plugin == "nunchaku" and "nunchaku_lite" in plan.claim.evidence
    assert plan.config.param("precision") == precision and plan.config.param("rank") == RANK
    assert {r.zeros is not None for r in records.values()} == {True, False}  # SVDQ W4A4 and AWQ W4A16 layers
    assert not any(u for r in records.values() for _, _, u in r.unsigned)  # diffusers quantizes them all signed
    W.assert_layers_follow_the_records(loaded, records, precision)
    inputs = tiny_transformer_inputs("flux1", model, seed=2)
    with torch.no_grad():
        got = loaded(**inputs, return_dict=False)[0]
        base = model(**inputs, return_dict=False)[0]
    assert cosine(got, base) > 0.9  # 4-bit weights and activations, rank 16, random weights


def test_targets_that_the_tensors_do_not_show_are_refused(lite, tmp_path):
    path, _, records = lite("int4")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["svdq_w4a4"]["targets"].append("transformer_blocks.0.attn.to_out.1")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / WEIGHTS).write_bytes((path / WEIGHTS).read_bytes())
    with pytest.raises(DiffgenError, match=r"svdq_w4a4: layer transformer_blocks\.0\.attn\.to_out\.1 has no such tensors"):
        load_transformer(tmp_path, device="cpu", dtype="fp32")


def test_a_rank_the_tensors_contradict_is_refused(lite, tmp_path):
    path, _, _ = lite("int4")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["svdq_w4a4"]["rank"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / WEIGHTS).write_bytes((path / WEIGHTS).read_bytes())
    with pytest.raises(DiffgenError, match=r"ranks disagree: .*nunchaku_lite config 32"):
        load_transformer(tmp_path, device="cpu", dtype="fp32")


def test_the_file_holds_what_diffusers_modules_hold(lite):
    """The shapes and dtypes of diffusers' SVDQW4A4Linear and AWQW4A16Linear (0.42.1)."""
    path, _, records = lite("nvfp4")
    tensors = load_file(path / WEIGHTS)
    svdq = next(n for n, r in records.items() if r.zeros is None)
    awq = next(n for n, r in records.items() if r.zeros is not None)
    n, k = records[svdq].codes.shape
    assert tensors[f"{svdq}.qweight"].dtype == torch.int8 and tensors[f"{svdq}.qweight"].shape == (n, k // 2)
    assert tensors[f"{svdq}.wscales"].shape == (k // 16, n) and tensors[f"{svdq}.wscales"].dtype == torch.float8_e4m3fn
    assert tensors[f"{svdq}.proj_down"].shape == (k, RANK) and tensors[f"{svdq}.proj_up"].shape == (n, RANK)
    assert tensors[f"{svdq}.wcscales"].shape == (n,) and tensors[f"{svdq}.wtscale"].shape == (1,)
    assert f"{svdq}.smooth_factor_orig" not in tensors
    n, k = records[awq].codes.shape
    assert tensors[f"{awq}.qweight"].dtype == torch.int32 and tensors[f"{awq}.qweight"].shape == (n // 4, k // 2)
    assert tensors[f"{awq}.wscales"].shape == (k // 64, n) and tensors[f"{awq}.wzeros"].shape == (k // 64, n)
