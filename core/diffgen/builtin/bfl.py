"""Builtin plugin: FLUX.1 and FLUX.2 single files in Black Forest Labs' layout, streamed into diffusers'.

BFL names modules after its reference code (``img_in``, ``time_in.in_layer``, ``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``, ``final_layer.adaLN_modulation.1``; RMSNorm gains are ``*.query_norm.scale``)
and fuses along dim 0 linears that diffusers keeps apart: ``{img,txt}_attn.qkv`` = [q; k; v] and FLUX.1's
``linear1`` = [q; k; v; mlp] (FLUX.2's stays fused, as ``attn.to_qkv_mlp_proj``). The final adaLN linear
stores [shift; scale], diffusers [scale; shift]. ComfyUI saves the same names under ``model.diffusion_model.``,
its scaled FP8 as a float8_e4m3fn ``weight`` with a scalar dequant multiplier ``scale_weight`` (``scale_input``
for activations) beside a ``scaled_fp8`` marker. Every tensor of a fused linear is cut like its weight: per-row
companions are split, one-value ones copied to each part. Only shapes are used, so meta tensors work too.
ComfyUI's per-layer ``comfy_quant`` markers are kept out of the stream (the format plugins read them from
the file), and NVFP4 block scales stored in 128x4 tiles are put in rows before a fused linear is cut
(``comfy.py``).
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..quant import RepackTarget, TensorStream
from ..renames import RenameRule, RenameTable, rename_and_split
from . import comfy

COMFYUI_PREFIX = "model.diffusion_model."
# ComfyUI's file-wide "this file is scaled FP8" marker (2 elements: full-precision matmul asked for);
# comfy.utils.convert_old_quants drops it. It is no parameter of any model.
COMFYUI_MARKERS = frozenset({"scaled_fp8"})
# ComfyUI's scaled-FP8 companions under ModelOpt's names (both are dequant multipliers).
COMFYUI_LEAVES = {"scale_weight": "weight_scale", "scale_input": "input_scale"}
# Companions of a fused linear's input or of the layer as a whole, which every part keeps whole:
# AWQ/SmoothQuant's per-input-channel ``pre_quant_scale`` [K], ComfyUI's per-layer JSON ``comfy_quant``.
SHARED_LEAVES = frozenset({"pre_quant_scale", "comfy_quant"})
_NORM = {"scale": "weight"}  # BFL's RMSNorm gain is diffusers' weight


def _inner(config: dict) -> int:
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


def _thirds(config: dict, rows: int) -> list[int]:
    return [_inner(config)] * 3


def _halves(config: dict, rows: int) -> list[int]:
    return [_inner(config)] * 2


def _flux1_linear1(config: dict, rows: int) -> list[int]:
    # FluxTransformer2DModel builds its single blocks with mlp_ratio 4; its config has no mlp_ratio.
    inner = _inner(config)
    return [inner, inner, inner, 4 * inner]


_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_D, _S = r"double_blocks\.(\d+)", r"single_blocks\.(\d+)"
_TD, _TS = r"transformer_blocks.\1", r"single_transformer_blocks.\1"


def _shared_rules(embed: str, ff: tuple[str, str], ff_context: tuple[str, str]) -> tuple[RenameRule, ...]:
    """The names FLUX.1 and FLUX.2 share; ``embed`` is the timestep embedding's module, the ff pairs
    the diffusers names of ``img_mlp.0``/``.2`` and ``txt_mlp.0``/``.2``."""
    return (
        RenameRule(r"img_in", ("x_embedder",)),
        RenameRule(r"txt_in", ("context_embedder",)),
        RenameRule(r"time_in\.in_layer", (f"{embed}.timestep_embedder.linear_1",)),
        RenameRule(r"time_in\.out_layer", (f"{embed}.timestep_embedder.linear_2",)),
        RenameRule(r"guidance_in\.in_layer", (f"{embed}.guidance_embedder.linear_1",)),
        RenameRule(r"guidance_in\.out_layer", (f"{embed}.guidance_embedder.linear_2",)),
        RenameRule(rf"{_D}\.img_attn\.qkv", tuple(f"{_TD}.{m}" for m in _QKV), _thirds),
        RenameRule(rf"{_D}\.txt_attn\.qkv", tuple(f"{_TD}.{m}" for m in _ADDED_QKV), _thirds),
        RenameRule(rf"{_D}\.img_attn\.proj", (rf"{_TD}.attn.to_out.0",)),
        RenameRule(rf"{_D}\.txt_attn\.proj", (rf"{_TD}.attn.to_add_out",)),
        RenameRule(rf"{_D}\.img_attn\.norm\.query_norm", (rf"{_TD}.attn.norm_q",), leaves=_NORM),
        RenameRule(rf"{_D}\.img_attn\.norm\.key_norm", (rf"{_TD}.attn.norm_k",), leaves=_NORM),
        RenameRule(rf"{_D}\.txt_attn\.norm\.query_norm", (rf"{_TD}.attn.norm_added_q",), leaves=_NORM),
        RenameRule(rf"{_D}\.txt_attn\.norm\.key_norm", (rf"{_TD}.attn.norm_added_k",), leaves=_NORM),
        RenameRule(rf"{_D}\.img_mlp\.0", (rf"{_TD}.{ff[0]}",)),
        RenameRule(rf"{_D}\.img_mlp\.2", (rf"{_TD}.{ff[1]}",)),
        RenameRule(rf"{_D}\.txt_mlp\.0", (rf"{_TD}.{ff_context[0]}",)),
        RenameRule(rf"{_D}\.txt_mlp\.2", (rf"{_TD}.{ff_context[1]}",)),
        RenameRule(rf"{_S}\.norm\.query_norm", (rf"{_TS}.attn.norm_q",), leaves=_NORM),
        RenameRule(rf"{_S}\.norm\.key_norm", (rf"{_TS}.attn.norm_k",), leaves=_NORM),
        RenameRule(r"final_layer\.linear", ("proj_out",)),
        RenameRule(r"final_layer\.adaLN_modulation\.1", ("norm_out.linear",), _halves, swap=True),
    )


# diffusers.loaders.single_file_utils implements the same mapping for whole state dicts, in
# convert_flux_transformer_checkpoint_to_diffusers and convert_flux2_transformer_checkpoint_to_diffusers.
RULES: dict[str, RenameTable] = {name: RenameTable(rules) for name, rules in {
    "FluxTransformer2DModel": _shared_rules("time_text_embed", ("ff.net.0.proj", "ff.net.2"),
                                            ("ff_context.net.0.proj", "ff_context.net.2")) + (
        RenameRule(r"vector_in\.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        RenameRule(r"vector_in\.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        RenameRule(rf"{_D}\.img_mod\.lin", (rf"{_TD}.norm1.linear",)),
        RenameRule(rf"{_D}\.txt_mod\.lin", (rf"{_TD}.norm1_context.linear",)),
        RenameRule(rf"{_S}\.modulation\.lin", (rf"{_TS}.norm.linear",)),
        RenameRule(rf"{_S}\.linear1", tuple(f"{_TS}.{m}" for m in (*_QKV, "proj_mlp")), _flux1_linear1),
        RenameRule(rf"{_S}\.linear2", (rf"{_TS}.proj_out",)),
    ),
    "Flux2Transformer2DModel": _shared_rules("time_guidance_embed", ("ff.linear_in", "ff.linear_out"),
                                             ("ff_context.linear_in", "ff_context.linear_out")) + (
        RenameRule(r"double_stream_modulation_img\.lin", ("double_stream_modulation_img.linear",)),
        RenameRule(r"double_stream_modulation_txt\.lin", ("double_stream_modulation_txt.linear",)),
        RenameRule(r"single_stream_modulation\.lin", ("single_stream_modulation.linear",)),
        RenameRule(rf"{_S}\.linear1", (rf"{_TS}.attn.to_qkv_mlp_proj",)),
        RenameRule(rf"{_S}\.linear2", (rf"{_TS}.attn.to_out",)),
    ),
}.items()}


def is_bfl_name(name: str, model_class: str | None = None) -> bool:
    """Whether ``name`` is a tensor of a BFL module (``model.diffusion_model.`` prefix or not), for
    ``model_class``'s table or, with None, FLUX.1's or FLUX.2's; diffusers names are not."""
    module = name.removeprefix(COMFYUI_PREFIX).rpartition(".")[0]
    tables = [RULES[model_class]] if model_class in RULES else [] if model_class else list(RULES.values())
    return any(table.match(module) for table in tables)


def bfl_to_diffusers_modules(model_class: str, module: str) -> list[str]:
    """The diffusers modules a BFL module stands for ([] when it is not one), e.g. for ignore lists."""
    table = RULES.get(model_class)
    return table.modules(module.removeprefix(COMFYUI_PREFIX)) if table else []


def bfl_to_diffusers(tensors: TensorStream, target: RepackTarget) -> TensorStream:
    """Rename, split and swap BFL (and ComfyUI) tensors into ``target.model_class``'s diffusers names,
    tensor by tensor; every other name passes through, so the conversion is idempotent."""
    # ComfyUI's per-layer markers leave the stream, and tiled NVFP4 scales become row-major before a
    # fused linear is cut by rows (builtin/comfy.py).
    tensors = comfy.rows_from_tiles(tensors, target, lambda m: bfl_to_diffusers_modules(target.model_class, m))
    return rename_and_split(tensors, RULES[target.model_class], target.model_config, describe="BFL",
                            prefix=COMFYUI_PREFIX, drop=COMFYUI_MARKERS, leaf_renames=COMFYUI_LEAVES,
                            shared_leaves=SHARED_LEAVES)


@hookimpl
def repack_checkpoint(tensors, target: RepackTarget):
    # A layout, not a format: it acts for every target kind (the planner's meta pass included) and any config.
    if target.model_class not in RULES:
        return None
    return bfl_to_diffusers(tensors, target)
