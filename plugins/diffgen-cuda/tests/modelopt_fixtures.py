"""The committed ModelOpt exports (tests/fixtures/, written by make_modelopt_fixtures.py) and
the 16-bit models they were made from, rebuilt from backbone.pt's own weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffgen.numerics.nvfp4 import dequantize_nvfp4, fake_quantize_nvfp4
from diffgen_cuda.block_rewrite import QKV_GROUPS
from diffgen_cuda.wan import CROSS
from diffgen_cuda.z_image import SWIGLU

FIXTURES = Path(__file__).parent / "fixtures"
# the layers the block rewrites fuse on a GPU, by the fused leaf name: which parts, in order
FUSED_PARTS = dict(QKV_GROUPS + CROSS + SWIGLU)


def export_dir(name: str) -> Path:
    return FIXTURES / name / "hf"


def backbone_path(name: str) -> Path:
    return FIXTURES / name / "backbone.pt"


def write_base_transformer(name: str, dst: Path) -> Path:
    """The 16-bit transformer ModelOpt quantized: the export's config without its
    quantization_config, and backbone.pt's weights without the quantizer buffers."""
    state = torch.load(backbone_path(name), map_location="cpu", weights_only=True)["model_state_dict"]
    weights = {k: v.contiguous() for k, v in state.items() if "_quantizer." not in k}
    dst.mkdir(parents=True)
    config = json.loads((export_dir(name) / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, dst / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    return dst


def copy_export(name: str, dst: Path) -> Path:
    shutil.copytree(export_dir(name), dst)
    return dst


def edited_export(name: str, dst: Path, edit) -> Path:
    """A copy of the export whose tensors ``edit`` (a function of the name -> tensor dict) changed."""
    from safetensors.torch import load_file

    ckpt = copy_export(name, dst)
    weights = ckpt / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return ckpt


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out.float()


def nvfp4_definition(file: dict, name: str, x: torch.Tensor, *, w4a4: bool) -> torch.Tensor:
    """ModelOpt's NVFP4 linear ``name`` from the export's tensors (``file``), in x's dtype: the
    input smoothed by pre_quant_scale where the layer has one, rounded to NVFP4 with input_scale
    (``w4a4``), times the dequantized weight, plus the bias and the SVDQuant low-rank branch. A layer
    the GPU's block rewrites fused (``to_qkv``, ...) is its parts' outputs side by side."""
    owner, _, leaf = name.rpartition(".")
    if f"{name}.weight" not in file and leaf in FUSED_PARTS:
        return torch.cat([nvfp4_definition(file, f"{owner}.{part}", x, w4a4=w4a4) for part in FUSED_PARTS[leaf]], -1)

    def get(leaf):
        t = file.get(f"{name}.{leaf}")
        return None if t is None else t.to(x.device)

    smoothing, lora_a, lora_b, bias = get("pre_quant_scale"), get("svdquant_lora_a"), get("svdquant_lora_b"), get("bias")
    if smoothing is not None:
        x = x * smoothing.to(x.dtype)
    w = dequantize_nvfp4(get("weight"), get("weight_scale"), get("weight_scale_2"), k=x.shape[-1], dtype=x.dtype)
    y = F.linear(fake_quantize_nvfp4(x, get("input_scale")) if w4a4 else x, w, None if bias is None else bias.to(x.dtype))
    if lora_a is not None:
        y = y + F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return y


def recorded_layers(name: str):
    """(layer name, input, ModelOpt's output) for each layer make_modelopt_fixtures recorded for the
    export ``name`` (``modelopt_layers.safetensors``: what ModelOpt's quantized linears computed)."""
    from make_modelopt_fixtures import LAYERS_FILE
    from safetensors.torch import load_file

    recorded = load_file(FIXTURES / name / LAYERS_FILE)
    return [(key[: -len(".input")], x, recorded[key[: -len(".input")] + ".output"])
            for key, x in recorded.items() if key.endswith(".input")]
