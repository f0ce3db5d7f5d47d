"""Builtin plugin: FLUX.1 and FLUX.2 single files in Black Forest Labs' layout, streamed into diffusers'.

BFL names modules after its reference code (``img_in``, ``time_in.in_layer``, ``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``, ``final_layer.adaLN_modulation.1``; RMSNorm gains are ``*.query_norm.scale``)
and fuses along dim 0 linears that diffusers keeps apart: ``{img,txt}_attn.qkv`` = [q; k; v] and FLUX.1's
``linear1`` = [q; k; v; mlp] (FLUX.2's stays fused, as ``attn.to_qkv_mlp_proj``). The final adaLN linear
stores [shift; scale], diffusers [scale; shift]. ComfyUI saves the same names under ``model.diffusion_model.``,
its scaled FP8 as a float8_e4m3fn ``weight`` with a scalar dequant multiplier ``scale_weight`` (``scale_input``
for activations) beside a ``scaled_fp8`` marker. Every tensor of a fused linear is cut like its weight: per-row
companions are split, one-value ones copied to each part. Only shapes are used, so meta tensors work too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..errors import LoadError
from ..hookspecs import hookimpl
from ..quant import RepackTarget, TensorStream

COMFYUI_PREFIX = "model.diffusion_model."
# ComfyUI's file-wide "this file is scaled FP8" marker (2 elements: full-precision matmul asked for);
# comfy.utils.convert_old_quants drops it. It is no parameter of any model.
COMFYUI_MARKERS = frozenset({"scaled_fp8"})
# ComfyUI's scaled-FP8 companions under ModelOpt's names (both are dequant multipliers).
COMFYUI_LEAVES = {"scale_weight": "weight_scale", "scale_input": "input_scale"}
# Companions of a fused linear's input or of the layer as a whole, which every part keeps whole:
# AWQ/SmoothQuant's per-input-channel ``pre_quant_scale`` [K], ComfyUI's per-layer JSON ``comfy_quant``.
SHARED_LEAVES = frozenset({"pre_quant_scale", "comfy_quant"})


@dataclass(frozen=True)
class Rule:
    bfl: str  # regex, fullmatch on the BFL module name
    diffusers: tuple[str, ...]  # templates (re.sub syntax); several = the parts of a fused linear along dim 0
    widths: Callable[[dict], list[int]] | None = None  # rows of each part (each half, with swap), from the config
    swap: bool = False  # two halves stored [shift; scale], wanted [scale; shift]
    norm: bool = False  # an RMSNorm: BFL's ``scale`` is diffusers' ``weight``


def _inner(config: dict) -> int:
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


def _thirds(config: dict) -> list[int]:
    return [_inner(config)] * 3


def _halves(config: dict) -> list[int]:
    return [_inner(config)] * 2


def _flux1_linear1(config: dict) -> list[int]:
    # FluxTransformer2DModel builds its single blocks with mlp_ratio 4; its config has no mlp_ratio.
    inner = _inner(config)
    return [inner, inner, inner, 4 * inner]


_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_D, _S = r"double_blocks\.(\d+)", r"single_blocks\.(\d+)"
_TD, _TS = r"transformer_blocks.\1", r"single_transformer_blocks.\1"


def _shared_rules(embed: str, ff: tuple[str, str], ff_context: tuple[str, str]) -> tuple[Rule, ...]:
    """The names FLUX.1 and FLUX.2 share; ``embed`` is the timestep embedding's module, the ff pairs
    the diffusers names of ``img_mlp.0``/``.2`` and ``txt_mlp.0``/``.2``."""
    return (
        Rule(r"img_in", ("x_embedder",)),
        Rule(r"txt_in", ("context_embedder",)),
        Rule(r"time_in\.in_layer", (f"{embed}.timestep_embedder.linear_1",)),
        Rule(r"time_in\.out_layer", (f"{embed}.timestep_embedder.linear_2",)),
        Rule(r"guidance_in\.in_layer", (f"{embed}.guidance_embedder.linear_1",)),
        Rule(r"guidance_in\.out_layer", (f"{embed}.guidance_embedder.linear_2",)),
        Rule(rf"{_D}\.img_attn\.qkv", tuple(f"{_TD}.{m}" for m in _QKV), _thirds),
        Rule(rf"{_D}\.txt_attn\.qkv", tuple(f"{_TD}.{m}" for m in _ADDED_QKV), _thirds),
        Rule(rf"{_D}\.img_attn\.proj", (rf"{_TD}.attn.to_out.0",)),
        Rule(rf"{_D}\.txt_attn\.proj", (rf"{_TD}.attn.to_add_out",)),
        Rule(rf"{_D}\.img_attn\.norm\.query_norm", (rf"{_TD}.attn.norm_q",), norm=True),
        Rule(rf"{_D}\.img_attn\.norm\.key_norm", (rf"{_TD}.attn.norm_k",), norm=True),
        Rule(rf"{_D}\.txt_attn\.norm\.query_norm", (rf"{_TD}.attn.norm_added_q",), norm=True),
        Rule(rf"{_D}\.txt_attn\.norm\.key_norm", (rf"{_TD}.attn.norm_added_k",), norm=True),
        Rule(rf"{_D}\.img_mlp\.0", (rf"{_TD}.{ff[0]}",)),
        Rule(rf"{_D}\.img_mlp\.2", (rf"{_TD}.{ff[1]}",)),
        Rule(rf"{_D}\.txt_mlp\.0", (rf"{_TD}.{ff_context[0]}",)),
        Rule(rf"{_D}\.txt_mlp\.2", (rf"{_TD}.{ff_context[1]}",)),
        Rule(rf"{_S}\.norm\.query_norm", (rf"{_TS}.attn.norm_q",), norm=True),
        Rule(rf"{_S}\.norm\.key_norm", (rf"{_TS}.attn.norm_k",), norm=True),
        Rule(r"final_layer\.linear", ("proj_out",)),
        Rule(r"final_layer\.adaLN_modulation\.1", ("norm_out.linear",), _halves, swap=True),
    )


# diffusers.loaders.single_file_utils implements the same mapping for whole state dicts, in
# convert_flux_transformer_checkpoint_to_diffusers and convert_flux2_transformer_checkpoint_to_diffusers.
RULES: dict[str, tuple[Rule, ...]] = {
    "FluxTransformer2DModel": _shared_rules("time_text_embed", ("ff.net.0.proj", "ff.net.2"),
                                            ("ff_context.net.0.proj", "ff_context.net.2")) + (
        Rule(r"vector_in\.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        Rule(r"vector_in\.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        Rule(rf"{_D}\.img_mod\.lin", (rf"{_TD}.norm1.linear",)),
        Rule(rf"{_D}\.txt_mod\.lin", (rf"{_TD}.norm1_context.linear",)),
        Rule(rf"{_S}\.modulation\.lin", (rf"{_TS}.norm.linear",)),
        Rule(rf"{_S}\.linear1", tuple(f"{_TS}.{m}" for m in (*_QKV, "proj_mlp")), _flux1_linear1),
        Rule(rf"{_S}\.linear2", (rf"{_TS}.proj_out",)),
    ),
    "Flux2Transformer2DModel": _shared_rules("time_guidance_embed", ("ff.linear_in", "ff.linear_out"),
                                             ("ff_context.linear_in", "ff_context.linear_out")) + (
        Rule(r"double_stream_modulation_img\.lin", ("double_stream_modulation_img.linear",)),
        Rule(r"double_stream_modulation_txt\.lin", ("double_stream_modulation_txt.linear",)),
        Rule(r"single_stream_modulation\.lin", ("single_stream_modulation.linear",)),
        Rule(rf"{_S}\.linear1", (rf"{_TS}.attn.to_qkv_mlp_proj",)),
        Rule(rf"{_S}\.linear2", (rf"{_TS}.attn.to_out",)),
    ),
}


def _match(rules: tuple[Rule, ...], module: str) -> tuple[Rule, re.Match] | None:
    for rule in rules:
        m = re.fullmatch(rule.bfl, module)
        if m:
            return rule, m
    return None


def is_bfl_name(name: str, model_class: str | None = None) -> bool:
    """Whether ``name`` is a tensor of a BFL module (``model.diffusion_model.`` prefix or not), for
    ``model_class``'s table or, with None, FLUX.1's or FLUX.2's; diffusers names are not."""
    module = name.removeprefix(COMFYUI_PREFIX).rpartition(".")[0]
    tables = [RULES.get(model_class, ())] if model_class else list(RULES.values())
    return any(_match(rules, module) for rules in tables)


def bfl_to_diffusers_modules(model_class: str, module: str) -> list[str]:
    """The diffusers modules a BFL module stands for ([] when it is not one), e.g. for ignore lists."""
    found = _match(RULES.get(model_class, ()), module.removeprefix(COMFYUI_PREFIX))
    return [found[1].expand(t) for t in found[0].diffusers] if found else []


def _cut(name: str, tensor: torch.Tensor, widths: list[int], targets: list[str]) -> list[torch.Tensor] | None:
    """``tensor`` of a fused linear in parts of ``widths`` rows; None when every part takes all of it."""
    leaf = name.rpartition(".")[2]
    rows = sum(widths)
    if leaf in SHARED_LEAVES:
        return None
    if tensor.dim() and tensor.shape[0] == rows:  # a weight, bias or per-row scale, cut like the weight
        return list(torch.split(tensor, widths, dim=0))
    if tensor.numel() == 1:  # a per-tensor scale, shared by the parts
        return None
    raise LoadError(f"tensor {name!r} of shape {tuple(tensor.shape)} belongs to a fused linear of {rows} rows "
                    f"({', '.join(targets)}), but it has neither one value per row nor one value in all, so "
                    "it cannot be cut into the diffusers layers; requantize the layer per row or per tensor")


def bfl_to_diffusers(tensors: TensorStream, target: RepackTarget) -> TensorStream:
    """Rename, split and swap BFL (and ComfyUI) tensors into ``target.model_class``'s diffusers names,
    tensor by tensor; every other name passes through, so the conversion is idempotent."""
    rules = RULES[target.model_class]

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for raw_name, tensor in tensors:
            name = raw_name.removeprefix(COMFYUI_PREFIX)
            if name in COMFYUI_MARKERS:
                continue
            module, _, leaf = name.rpartition(".")
            found = _match(rules, module)
            if found is None:
                yield name, tensor
                continue
            rule, m = found
            leaf = "weight" if rule.norm and leaf == "scale" else COMFYUI_LEAVES.get(leaf, leaf)
            targets = [m.expand(t) for t in rule.diffusers]
            if rule.widths is None:
                yield f"{targets[0]}.{leaf}", tensor
                continue
            parts = _cut(raw_name, tensor, rule.widths(target.model_config), targets)
            if rule.swap:
                yield f"{targets[0]}.{leaf}", tensor if parts is None else torch.cat(parts[::-1], dim=0)
            else:
                for t, part in zip(targets, parts or [tensor.clone() for _ in targets]):
                    yield f"{t}.{leaf}", part

    return stream()


@hookimpl
def repack_checkpoint(tensors, target: RepackTarget):
    # A layout, not a format: it acts for every target kind (the planner's meta pass included) and any config.
    if target.model_class not in RULES:
        return None
    return bfl_to_diffusers(tensors, target)
