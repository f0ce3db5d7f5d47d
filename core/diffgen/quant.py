"""Quantization configs, the claims plugins make about checkpoints, and the per-layer plan.

Two pattern languages, kept apart on purpose:

- user patterns (``--quantization-ignored-layers``) follow SGLang-Diffusion's documented rule: a
  layer is skipped if its dotted name contains the pattern. ``attn.to_`` keeps ``attn.to_q``,
  ``to_k``, ``to_v`` and ``to_out.0``; ``transformer_blocks.3`` also keeps
  ``single_transformer_blocks.3`` and ``transformer_blocks.30`` (end it with ``.`` to stop at the
  block: ``transformer_blocks.3.``). A pattern that matches no layer is reported, never ignored.
- checkpoint ignore lists (``ignore``, ``ignored_layers``, ``modules_to_not_convert``,
  ``exclude_modules``) are glob patterns (``fnmatch``, case-sensitive) on the full module name.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Literal

import torch

TensorStream = Iterator[tuple[str, torch.Tensor]]
log = logging.getLogger("diffgen")


def matches_user_pattern(pattern: str, name: str) -> bool:
    """The rule of ``--quantization-ignored-layers``: containment, as SGLang-Diffusion documents it;
    a pattern with ``*`` or ``?`` (which no layer name contains, so containment never matched it) is
    a glob on the full name, which can say what containment cannot: ``transformer_blocks.*.attn.to_q``
    leaves out ``single_transformer_blocks``."""
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name or pattern in f"{name}."


def matches_glob(pattern: str, name: str) -> bool:
    """Glob match on the full module name, used by checkpoint ignore lists."""
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class QuantRequest:
    """The user's explicit ``--quantization`` choice for one component. ``scheme`` picks a variant
    of the method (``diffgen quantize --scheme``); None is the method's default."""

    method: str
    ignored_layers: tuple[str, ...] = ()
    scheme: str | None = None
    quantize_all_layers: bool = False  # no DEFAULT_ONLINE_IGNORES: every linear, as SGLang does
    # --enable-svdquant / --quantization-precision / --quantization-rank: they describe a quantized
    # checkpoint (method "svdquant") rather than ask for online quantization; detection must agree.
    enable_svdquant: bool = False
    precision: str | None = None
    rank: int | None = None

    @property
    def describes_checkpoint(self) -> bool:
        return self.enable_svdquant


# --quantization-precision's values (SGLang-Diffusion's; fp4 is nvfp4)
SVDQUANT_PRECISIONS = ("int4", "nvfp4", "fp4")


def quant_request(method: str | None, ignored_layers=(), *, quantize_all_layers: bool = False,
                  scheme: str | None = None, enable_svdquant: bool = False, precision: str | None = None,
                  rank: int | None = None) -> QuantRequest | None:
    """The request behind ``--quantization`` and its companions; None without a method.
    ``enable_svdquant`` (implied by ``precision`` or ``rank``) asks for an SVDQuant checkpoint."""
    if enable_svdquant or precision or rank:
        from .errors import QuantConfigError

        if method is not None:
            raise QuantConfigError(f"--quantization {method} and --enable-svdquant exclude each other: an SVDQuant "
                                   "checkpoint is already quantized")
        if rank is not None and int(rank) <= 0:
            raise QuantConfigError(f"--quantization-rank must be positive, not {rank}")
        if precision is not None and precision not in SVDQUANT_PRECISIONS:
            raise QuantConfigError(f"--quantization-precision is int4 or nvfp4 (fp4), not {precision!r}")
        return QuantRequest("svdquant", tuple(ignored_layers), None, quantize_all_layers, True,
                            "nvfp4" if precision == "fp4" else precision, None if rank is None else int(rank))
    if method is None:
        if ignored_layers or quantize_all_layers:
            log.warning("--quantization-ignored-layers and --quantize-all-layers shape online quantization; "
                        "without --quantization they change nothing (a quantized checkpoint says itself "
                        "which layers it keeps 16-bit)")
        return None
    return QuantRequest(method, tuple(ignored_layers), scheme, quantize_all_layers)


@dataclass(frozen=True)
class QuantConfig:
    """One component's quantization, as a plugin understood it.

    ``family`` names the format (``fp8``, ``modelopt-fp8``, ...); ``scheme`` its variant
    (``per-tensor``, ``per-channel``, ``block``, ...); ``layer_schemes`` per-layer schemes where the
    format has them; ``params`` anything else the format needs (JSON-friendly values).
    ``ignore`` holds checkpoint glob patterns, ``user_ignore`` the user's containment patterns.
    ``online`` means 16-bit weights are quantized while they load.
    """

    family: str
    scheme: str | None = None
    params: tuple[tuple[str, Any], ...] = ()
    layer_schemes: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    user_ignore: tuple[str, ...] = ()
    online: bool = False
    provenance: str = ""

    @classmethod
    def make(cls, family: str, *, params: dict | None = None, layer_schemes: dict | None = None,
             **kwargs: Any) -> "QuantConfig":
        """Build a config from plain dicts (stored as sorted tuples so configs compare and hash)."""
        return cls(family, params=tuple(sorted((params or {}).items())),
                   layer_schemes=tuple(sorted((layer_schemes or {}).items())), **kwargs)

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def scheme_for(self, layer: str) -> str | None:
        return dict(self.layer_schemes).get(layer, self.scheme)

    def ignored_by(self, layer: str) -> tuple[str, str] | None:
        """Why ``layer`` stays 16-bit: ("user", pattern), ("checkpoint", pattern) or None."""
        for pattern in self.user_ignore:
            if matches_user_pattern(pattern, layer):
                return ("user", pattern)
        for pattern in self.ignore:
            if matches_glob(pattern, layer):
                return ("checkpoint", pattern)
        return None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["params"] = dict(self.params)
        out["layer_schemes"] = dict(self.layer_schemes)
        out["ignore"] = list(self.ignore)
        out["user_ignore"] = list(self.user_ignore)
        return out


@dataclass(frozen=True)
class QuantClaim:
    """A plugin's claim that a checkpoint is in its format.

    ``unsupported_reason``: set when the plugin recognises the format but cannot load this
    variant of it (say, an algorithm it does not implement); if such a claim wins, loading stops
    with the evidence and this reason instead of a generic "no plugin recognises it".
    """

    config: QuantConfig
    specificity: int
    evidence: str
    plugin: str = ""  # filled in by the core
    unsupported_reason: str | None = None


@dataclass(frozen=True)
class LayerSpec:
    """One ``nn.Linear`` of a model, as create_linear_method sees it."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    dtype: torch.dtype


@dataclass
class RepackTarget:
    """What a repacked stream must become (see the ``repack_checkpoint`` hook)."""

    kind: Literal["runtime", "checkpoint", "layout"]
    model_class: str | None = None
    model_config: dict = field(default_factory=dict)
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    linears: tuple[str, ...] = ()  # dotted names of the model's nn.Linear layers
    quantized: tuple[str, ...] = ()  # those the plan quantizes; the others stay 16-bit


@dataclass
class LayerDecision:
    """The plan for one linear: quantized with a method, or kept 16-bit and why."""

    layer: LayerSpec
    action: Literal["quantize", "keep"]
    reason: str
    method: Any = None  # a LinearMethod when action == "quantize"
    plugin: str | None = None


# Layers online quantization keeps in 16-bit unless the user says otherwise: embedders, modulation
# of the final norm and the final projection. They are a small share of the FLOPs, quantizing
# them is what turned peers' online FP8 images into noise (vllm-omni#2728, unsloth#6772), and
# some diffusers models cast their inputs to these layers' weight dtype (Wan's time_embedder,
# Z-Image's t_embedder), which would be FP8.
DEFAULT_ONLINE_IGNORES: dict[str, tuple[str, ...]] = {  # glob patterns on the full module name
    "FluxTransformer2DModel": ("time_text_embed.*", "context_embedder", "x_embedder", "norm_out.*", "proj_out"),
    "Flux2Transformer2DModel": ("time_guidance_embed.*", "context_embedder", "x_embedder", "norm_out.*",
                                "proj_out", "double_stream_modulation_img.*", "double_stream_modulation_txt.*",
                                "single_stream_modulation.*"),
    "WanTransformer3DModel": ("condition_embedder.*", "proj_out"),
    "HunyuanVideoTransformer3DModel": ("context_embedder.*", "time_text_embed.*", "norm_out.*", "proj_out"),
    "QwenImageTransformer2DModel": ("time_text_embed.*", "img_in", "txt_in", "norm_out.*", "proj_out"),
    "ZImageTransformer2DModel": ("t_embedder.*", "cap_embedder.*", "all_x_embedder.*", "all_final_layer.*"),
}


def default_online_ignore(model_class: str, layer: str) -> str | None:
    """The DEFAULT_ONLINE_IGNORES pattern that keeps ``layer`` 16-bit, if any. Globs, so that
    ``proj_out`` is the model's final projection and not every block's ``proj_out``."""
    for pattern in DEFAULT_ONLINE_IGNORES.get(model_class, ()):
        if matches_glob(pattern, layer):
            return pattern
    return None


def layer_group(name: str) -> str:
    """``transformer_blocks.12.attn.to_q`` -> ``transformer_blocks.*.attn.to_q``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)


def linear_layers(model: torch.nn.Module, dtype: torch.dtype) -> Iterable[LayerSpec]:
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear:
            yield LayerSpec(name, module.in_features, module.out_features,
                            module.bias is not None, dtype)
