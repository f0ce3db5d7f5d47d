"""Write the ModelOpt fixtures under tests/fixtures/ with the real producer, NVIDIA ModelOpt.

The tests read the committed output, so CI needs no nvidia-modelopt. Re-run this script (CPU only,
about a minute) after changing a family below, then commit tests/fixtures/ again:

    pip install --no-deps --target /tmp/modelopt-site nvidia-modelopt==0.47.0 omegaconf \\
        antlr4-python3-runtime==4.9.3 "pulp<4" scipy
    PYTHONPATH=/tmp/modelopt-site python plugins/diffgen-cuda/tests/make_modelopt_fixtures.py

(``--no-deps`` keeps pip from replacing the installed torch; those four are the only runtime
dependencies ModelOpt imports for quantize + export that a diffgen environment lacks.)

Per family, the recipe of ModelOpt's diffusers example (``examples/diffusers/quantization``):
``mtq.quantize(backbone, FP8_DEFAULT_CFG, forward_loop)`` with a short calibration forward,
``mto.save(backbone, backbone.pt)`` (quantizer ``_amax`` buffers + the 16-bit weights) and
``export_hf_checkpoint(backbone, export_dir=hf/)`` (FP8 weights + scales + config.json). The
transformers are diffgen's tiny ones with one attention head (hidden size 16), which keeps the
whole fixture set at a few hundred KB.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import warnings
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"
CALIBRATION_SEEDS = (1, 2, 3, 4)
# (directory, family, ModelOpt config name, also save backbone.pt)
EXPORTS = [
    ("flux1-fp8", "flux1", "FP8_DEFAULT_CFG", True),
    ("qwen_image-fp8", "qwen_image", "FP8_DEFAULT_CFG", True),
    ("hunyuan_video-fp8", "hunyuan_video", "FP8_DEFAULT_CFG", True),
    ("flux1-fp8-per-channel", "flux1", "FP8_PER_CHANNEL_PER_TOKEN_CFG", False),
    ("flux1-nvfp4", "flux1", "NVFP4_DEFAULT_CFG", False),
    ("flux1-w4a16-nvfp4", "flux1", "W4A16_NVFP4_CFG", False),
    ("flux2-nvfp4", "flux2", "NVFP4_DEFAULT_CFG", False),
    ("wan-nvfp4", "wan", "NVFP4_DEFAULT_CFG", False),
    ("qwen_image-nvfp4", "qwen_image", "NVFP4_DEFAULT_CFG", False),
    ("hunyuan_video-nvfp4", "hunyuan_video", "NVFP4_DEFAULT_CFG", False),
]


def fixture_transformer(family: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """diffgen's tiny transformer of ``family`` with one attention head, seed 0."""
    import diffusers

    from diffgen.tiny.transformers import TINY_TRANSFORMERS

    spec = TINY_TRANSFORMERS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(diffusers, spec["class_name"])(**{**spec["kwargs"], "num_attention_heads": 1})
    return model.to(dtype).eval()


def _export(directory: str, family: str, config_name: str, with_backbone: bool, out: Path) -> dict:
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    from diffgen.tiny.transformers import tiny_transformer_inputs

    model = fixture_transformer(family)
    batches = [tiny_transformer_inputs(family, model, seed=s) for s in CALIBRATION_SEEDS]

    def forward_loop(m):
        with torch.no_grad():
            for inputs in batches:
                m(**inputs, return_dict=False)

    # NVFP4 calibration runs on the CPU (quantizers are off while amax is collected); only a
    # fake-quantized NVFP4 forward would need CUDA, and nothing here runs one.
    mtq.quantize(model, copy.deepcopy(getattr(mtq, config_name)), forward_loop=forward_loop)
    target = out / directory
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if with_backbone:  # before the export, as ModelOpt's example does: export_hf_checkpoint
        mto.save(model, target / "backbone.pt")  # turns the model's weights into FP8 in place
    export_hf_checkpoint(model, export_dir=target / "hf")
    return {"family": family, "modelopt_config": config_name, "backbone": with_backbone}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURES)
    parser.add_argument("--only", nargs="+", help="directories to (re)make, e.g. flux1-fp8")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
    import diffusers
    import modelopt

    made = {}
    for directory, family, config_name, with_backbone in EXPORTS:
        if args.only and directory not in args.only:
            continue
        print(f"== {directory}: {family} with {config_name}", file=sys.stderr)
        made[directory] = _export(directory, family, config_name, with_backbone, args.out)
    provenance = args.out / "PROVENANCE.json"
    record = json.loads(provenance.read_text()) if provenance.is_file() else {"exports": {}}
    record.update({"producer": f"nvidia-modelopt {modelopt.__version__}", "torch": torch.__version__,
                   "diffusers": diffusers.__version__, "calibration_seeds": list(CALIBRATION_SEEDS),
                   "script": "plugins/diffgen-cuda/tests/make_modelopt_fixtures.py"})
    record["exports"].update(made)
    provenance.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
