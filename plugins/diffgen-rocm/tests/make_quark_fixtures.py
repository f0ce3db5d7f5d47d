"""Write the AMD Quark MXFP4 fixtures under tests/fixtures/ with the real producer, amd-quark.

The tests read the committed output, so CI needs no amd-quark. Re-run this script (CPU only,
a few minutes: Quark JIT-compiles its CPU kernels, then freezes every quantized layer) after
changing an export below, then commit tests/fixtures/ again:

    python -m venv /tmp/quark-env && /tmp/quark-env/bin/pip install amd-quark==0.13
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/quark-env/lib/python3.11/site-packages/diffgen.pth
    PYTHONPATH=core /tmp/quark-env/bin/python plugins/diffgen-rocm/tests/make_quark_fixtures.py

(amd-quark's dependencies do not include torch; the .pth line lends it this checkout's torch and
diffusers without installing anything into the project's environment.)

Per export, Quark's diffusers recipe: ``ModelQuantizer(QConfig(global_quant_config=QLayerConfig(
weight=OCP_MXFP4Spec(is_dynamic=False), input_tensors=OCP_MXFP4Spec(is_dynamic=True)),
exclude=...)).quantize_model(model, calibration)``, ``freeze``, then ``export_safetensors(model,
dir, custom_mode="quark", weight_format="real_quantized", pack_method="reorder")``. The models are
exactly the transformers of diffgen's tiny pipelines (same family, seed and size), so a fixture can
replace a pipeline's transformer; Quark's MXFP4 fake-quantization runs on the CPU only in float32.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"
CALIBRATION_SEEDS = (1, 2)
# The layers diffgen keeps 16-bit when quantizing online (diffgen.quant.DEFAULT_ONLINE_IGNORES);
# Quark writes them to ``exclude`` expanded to the module names they match.
EXCLUDE = {"flux1": ["time_text_embed.*", "context_embedder", "x_embedder", "norm_out.*", "proj_out"],
           "wan": ["condition_embedder.*", "proj_out"]}
# (directory, family, seed of the pipeline's transformer, activations quantized)
EXPORTS = [
    ("flux1-mxfp4", "flux1", 0, True),
    ("flux1-mxfp4-w4a16", "flux1", 0, False),
    ("wan-mxfp4-transformer", "wan", 0, True),
    ("wan-mxfp4-transformer_2", "wan", 4, True),  # tiny wan pipelines build transformer_2 with seed + 4
]


def _export(directory: str, family: str, seed: int, activations: bool, out: Path) -> None:
    from quark.torch import ModelQuantizer, export_safetensors
    from quark.torch.quantization.config.config import OCP_MXFP4Spec, QConfig, QLayerConfig

    from diffgen.tiny.transformers import tiny_transformer, tiny_transformer_inputs

    model = tiny_transformer(family, seed=seed).float().eval()
    weight = OCP_MXFP4Spec(ch_axis=-1, is_dynamic=False).to_quantization_spec()
    inputs = OCP_MXFP4Spec(ch_axis=-1, is_dynamic=True).to_quantization_spec() if activations else None
    config = QConfig(global_quant_config=QLayerConfig(weight=weight, input_tensors=inputs), exclude=EXCLUDE[family])
    calibration = [tiny_transformer_inputs(family, model, seed=s) for s in CALIBRATION_SEEDS]
    quantizer = ModelQuantizer(config)
    with torch.no_grad():
        model = quantizer.quantize_model(model, calibration)
        model = quantizer.freeze(model)
    target = out / directory
    if target.exists():
        shutil.rmtree(target)
    export_safetensors(model, target, custom_mode="quark", weight_format="real_quantized", pack_method="reorder")


def main() -> None:
    import diffusers
    import quark

    warnings.filterwarnings("ignore")
    out = FIXTURES
    out.mkdir(parents=True, exist_ok=True)
    for directory, family, seed, activations in EXPORTS:
        print(f"exporting {directory}", file=sys.stderr)
        _export(directory, family, seed, activations, out)
    provenance = {
        "producer": "amd-quark", "amd_quark": getattr(quark, "__version__", "?"), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "calibration_seeds": list(CALIBRATION_SEEDS),
        "exports": {d: {"family": f, "seed": s, "activations": "dynamic fp4" if a else None, "exclude": EXCLUDE[f]}
                    for d, f, s, a in EXPORTS},
    }
    (out / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
