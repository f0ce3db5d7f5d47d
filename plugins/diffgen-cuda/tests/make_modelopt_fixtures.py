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

INT8 (``INT8_DEFAULT_CFG``, the example's default ``--format int8``, and ``INT8_SMOOTHQUANT_CFG``,
its ``--quant-algo smoothquant``) calibrates and fake-quantizes on the CPU as ModelOpt ships.
The searching recipes (SVDQuant: the diffusers example's FLUX preset ``nvfp4_fp8_mha`` and
``NVFP4_SVDQUANT_DEFAULT_CFG``, its ``--quant-algo svdquant``; AWQ: ``NVFP4_AWQ_LITE_CFG``) run
NVFP4 fake-quantized forwards while they search, and ModelOpt's NVFP4 fake-quantizer runs on CUDA
only; here it is replaced by diffgen's definition of NVFP4 rounding (``_cpu_nvfp4_fake_quant``).
The search, the SVD, the smoothing and the export are ModelOpt's own. Their rank is 4 (the
example's 32 exceeds the tiny layers' 16 inputs), and the modules the example keeps 16-bit per
model (``EXAMPLE_FILTER``) are off from the start. ``--format fp8 --quant-algo svdquant`` is
``FP8_DEFAULT_CFG`` with the example's svdquant algorithm put in (``ALGORITHMS``); its FP8
fake-quantizer runs on the CPU. For the NVFP4 searching exports and
INT8's the script also records, before the export, what ModelOpt's quantized linears compute
(``modelopt_layers.safetensors``: the first rows of each layer's input and output) for the layers
the export writes as they are (not the fused Q/K/V groups, whose smoothing the export re-solves).
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
    ("flux1-nvfp4-svdquant", "flux1", "diffusers/nvfp4_fp8_mha", False),  # the example's FLUX preset
    ("wan-nvfp4-svdquant", "wan", "NVFP4_SVDQUANT_DEFAULT_CFG", False),
    ("flux1-nvfp4-awq", "flux1", "NVFP4_AWQ_LITE_CFG", False),
    ("flux1-nvfp4-single-file-options", "flux1", "NVFP4_DEFAULT_CFG", False),
    ("flux1-int8", "flux1", "INT8_DEFAULT_CFG", False),  # the example's default --format int8
    ("flux1-int8-smoothquant", "flux1", "INT8_SMOOTHQUANT_CFG", False),
    ("flux1-fp8-svdquant", "flux1", "FP8_DEFAULT_CFG", False),  # the example's --format fp8 --quant-algo svdquant
    ("flux1-int8-svdquant", "flux1", "INT8_DEFAULT_CFG", False),  # and --format int8 --quant-algo svdquant
    ("flux1-int8-weight-only", "flux1", "INT8_WEIGHT_ONLY_CFG", False),  # quant_algo W8A16
    ("flux1-fp8-block-weight-only", "flux1", "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", False),  # quant_algo FP8_PB_WO
]
# the algorithm the example's --quant-algo puts in place of the config's own
ALGORITHMS = {"flux1-fp8-svdquant": {"method": "svdquant", "lowrank": 32},
              "flux1-int8-svdquant": {"method": "svdquant", "lowrank": 32}}
# export_hf_checkpoint's options for single-file runtimes (the example's --extra-param): scales
# 128x4-tiled, weights and scales padded to 16, ModelOpt's per-layer header in the safetensors
EXPORT_OPTIONS = {"flux1-nvfp4-single-file-options": {"enable_swizzle_layout": True, "padding_strategy": "row_col",
                                                      "enable_layerwise_quant_metadata": True}}
# fake-quantized forwards while calibrating; "diffusers/nvfp4_fp8_mha" is ModelOpt's recipe file
# (modelopt_recipes/configs/ptq/presets/) its diffusers example quantizes FLUX with: svdquant, NVFP4
# linears and FP8 attention quantizers (which the HF export does not write)
SEARCHING = ("NVFP4_SVDQUANT_DEFAULT_CFG", "NVFP4_AWQ_LITE_CFG", "diffusers/nvfp4_fp8_mha")
# what ModelOpt's quantized linears compute is recorded for these (INT8's fake quantizer runs on the CPU)
RECORDED = SEARCHING + ("INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG", "INT8_WEIGHT_ONLY_CFG",
                       "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG")
LOWRANK = 4
# Modules ModelOpt's diffusers example keeps 16-bit per model (its filter); with a searching recipe
# they must be off while it calibrates: Wan's Conv3d patch embedding has no CPU fake-quantizer.
EXAMPLE_FILTER = {"wan": ("*patch_embedding*", "*condition_embedder*", "*proj_out*"),
                  "flux1": ("*proj_out*", "*time_text_embed*", "*context_embedder*", "*x_embedder*", "*norm_out*")}
CAPTURE_SEED, CAPTURE_ROWS = 5, 4
LAYERS_FILE = "modelopt_layers.safetensors"


def fixture_transformer(family: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """diffgen's tiny transformer of ``family`` with one attention head, seed 0."""
    import diffusers

    from diffgen.tiny.transformers import TINY_TRANSFORMERS

    spec = TINY_TRANSFORMERS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(diffusers, spec["class_name"])(**{**spec["kwargs"], "num_attention_heads": 1})
    return model.to(dtype).eval()


def _cpu_nvfp4_fake_quant(inputs, block_size, amax, bias, num_bits, scale_bits, *rest):
    """ModelOpt's dynamic block fake-quantizer (CUDA only) for NVFP4, by diffgen's definition:
    global scale amax / (6 * 448), E4M3 block scales per 16, E2M1 values."""
    from diffgen.numerics.nvfp4 import fake_quantize_nvfp4

    if block_size != 16 or tuple(num_bits) != (2, 1) or tuple(scale_bits) != (4, 3) or bias is not None:
        raise NotImplementedError(f"only NVFP4 is emulated here, not {num_bits} / {scale_bits} per {block_size}")
    global_scale = (amax.float().amax() / (6 * 448)).reshape(())
    return fake_quantize_nvfp4(inputs.float(), global_scale).to(inputs.dtype)


def _capture_layers(model, inputs, skip) -> dict[str, torch.Tensor]:
    """The first CAPTURE_ROWS rows of every quantized linear's input and output, one forward."""
    from modelopt.torch.quantization.nn import QuantModule

    captured, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, QuantModule) and isinstance(module, torch.nn.Linear) and name not in skip \
                and module.weight_quantizer.is_enabled:
            def hook(mod, args, output, name=name):
                captured[f"{name}.input"] = args[0].reshape(-1, args[0].shape[-1])[:CAPTURE_ROWS].contiguous()
                captured[f"{name}.output"] = output.reshape(-1, output.shape[-1])[:CAPTURE_ROWS].contiguous()
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(**inputs, return_dict=False)
    for h in hooks:
        h.remove()
    return captured


def _export(directory: str, family: str, config_name: str, with_backbone: bool, out: Path) -> dict:
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq
    import modelopt.torch.quantization.nn.modules.quant_conv as quant_conv
    import modelopt.torch.quantization.nn.modules.tensor_quantizer as tensor_quantizer
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import save_file

    from diffgen.tiny.transformers import tiny_transformer_inputs

    model = fixture_transformer(family)
    batches = [tiny_transformer_inputs(family, model, seed=s) for s in CALIBRATION_SEEDS]

    def forward_loop(m):
        with torch.no_grad():
            for inputs in batches:
                m(**inputs, return_dict=False)

    # NVFP4 max calibration runs on the CPU (quantizers are off while amax is collected); the
    # searching recipes run fake-quantized NVFP4 forwards, emulated here (see the module's text).
    if "/" in config_name:
        from modelopt.torch.quantization.config import _load_quantize_config_dict

        config = copy.deepcopy(_load_quantize_config_dict(f"configs/ptq/presets/{config_name}"))
    else:
        config = copy.deepcopy(getattr(mtq, config_name))
    if directory in ALGORITHMS:
        config["algorithm"] = copy.deepcopy(ALGORITHMS[directory])
    searching = config_name in SEARCHING or directory in ALGORITHMS
    svd = isinstance(config["algorithm"], dict) and config["algorithm"].get("method") == "svdquant"
    if searching:
        tensor_quantizer.dynamic_block_quant = _cpu_nvfp4_fake_quant
        # NVFP4 convolutions take a CUDA implicit GEMM even with their quantizers off (the filter
        # below); the plain path through the quantizers computes what they say
        quant_conv._QuantConv3d._should_use_implicit_gemm = lambda self: False
        if svd:
            config["algorithm"]["lowrank"] = LOWRANK
        config["quant_cfg"] += [{"quantizer_name": p, "enable": False} for p in EXAMPLE_FILTER.get(family, ())]
    mtq.quantize(model, config, forward_loop=forward_loop)
    target = out / directory
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if config_name in RECORDED:
        fused = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in
                 ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
        captured = _capture_layers(model, tiny_transformer_inputs(family, model, seed=CAPTURE_SEED), fused)
        save_file(captured, target / LAYERS_FILE, metadata={"format": "pt"})
    if with_backbone:  # before the export, as ModelOpt's example does: export_hf_checkpoint
        mto.save(model, target / "backbone.pt")  # turns the model's weights into FP8 in place
    export_hf_checkpoint(model, export_dir=target / "hf", **EXPORT_OPTIONS.get(directory, {}))
    made = {"family": family, "modelopt_config": config_name, "backbone": with_backbone}
    if directory in ALGORITHMS:
        made["algorithm"] = config["algorithm"]
    if directory in EXPORT_OPTIONS:
        made["export_options"] = EXPORT_OPTIONS[directory]
    if config_name in RECORDED:
        made.update({"layers_file": LAYERS_FILE, "capture_seed": CAPTURE_SEED})
    if config_name in SEARCHING:
        made["nvfp4_fake_quant"] = "diffgen's definition (ModelOpt's needs CUDA)"
        if svd:
            made["lowrank"] = LOWRANK
    return made


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
