"""The committed ModelOpt exports (tests/fixtures/, written by make_modelopt_fixtures.py) and
the 16-bit models they were made from, rebuilt from backbone.pt's own weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

FIXTURES = Path(__file__).parent / "fixtures"


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


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out.float()
