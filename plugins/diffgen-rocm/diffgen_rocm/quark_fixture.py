"""A tiny AMD Quark MXFP4 checkpoint written from the format definition, for conformance runs
(entry point group ``diffgen.fixtures``, name ``quark-mxfp4``). Not runtime code: the runtime
never writes files. The layout is the one amd-quark 0.13's diffusers exporter writes (see
``quark.py`` and ``tests/make_quark_fixtures.py``, whose committed output the tests also read):
every linear except diffgen's default online ignores becomes ``weight`` (packed E2M1) and
``weight_quantizer.scale`` (E8M0), with the concrete names of the others in ``exclude``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .mxfp4 import GROUP, quantize_mxfp4

SPEC = {"dtype": "fp4", "qscheme": "per_group", "ch_axis": -1, "group_size": GROUP, "scale_format": "e8m0",
        "scale_calculation_mode": "even", "round_method": "half_even"}


def quark_quantization_config(exclude: list[str], activations: bool = True) -> dict:
    return {"quant_method": "quark", "version": "0.13",
            "export": {"weight_format": "real_quantized", "pack_method": "reorder", "kv_cache_group": []},
            "global_quant_config": {"weight": {**SPEC, "is_dynamic": False},
                                    "input_tensors": {**SPEC, "is_dynamic": True} if activations else None,
                                    "output_tensors": None, "bias": None},
            "layer_quant_config": {}, "layer_type_quant_config": {}, "exclude": exclude}


def write_quark_mxfp4(src: Path, dst: Path) -> None:
    """``src``: a 16-bit diffusers transformer directory; ``dst``: the Quark MXFP4 export of it."""
    import diffusers
    from safetensors.torch import save_file

    from diffgen.quant import default_online_ignore

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    model = getattr(diffusers, config["_class_name"]).from_pretrained(src, torch_dtype=torch.float32)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    exclude = []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        if default_online_ignore(config["_class_name"], name) or module.in_features % GROUP:
            exclude.append(name)
            continue
        packed, scales = quantize_mxfp4(module.weight.data, "even")
        tensors[f"{name}.weight"] = packed
        tensors[f"{name}.weight_quantizer.scale"] = scales
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dst / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    config["quantization_config"] = quark_quantization_config(exclude)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
