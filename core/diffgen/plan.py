"""The plan: everything decided about one component before a tensor is read.

One function, :func:`plan`, serves every path that needs to know what diffgen will do with a
checkpoint: loading (``load_transformer``), ``inspect``, ``quantize`` and ``repack``. It ranks the
plugins' claims, builds the diffusers model on the meta device, decides for every linear whether
it is quantized and by which method (or why it stays 16-bit), and swaps the planned linears in.
Because ``inspect`` and ``generate`` call the same function with the same platform and dtype
(``diffgen.platform.resolve``), what ``inspect`` prints is what a load on that machine runs.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .checkpoint import CheckpointSource
from .errors import LoadError, QuantConfigError
from .foreign import FORMATS, describe_quantized, format_of_declaration, format_of_tensors, quantized_tensors
from .layout import in_model_layout
from .linear import QuantLinear, replace_module
from .platform import Platform
from .plugins import PluginHost, best_claim, choose_method, get_plugin_host
from .quant import (LayerDecision, QuantClaim, QuantConfig, QuantRequest, RepackTarget, default_online_ignore,
                    linear_layers, matches_user_pattern)

log = logging.getLogger("diffgen")


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every parameter on the meta device; buffers are left where they are made."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def resolve_claim(source: CheckpointSource, request: QuantRequest | None, host: PluginHost
                  ) -> tuple[list[QuantClaim], QuantClaim | None]:
    """Rank the plugins' claims. An explicit request must not contradict the checkpoint, and a
    checkpoint that declares quantization or holds quantized tensors needs a plugin's claim: it is
    never taken for a 16-bit one."""
    claims = host.detect_quant_config(source, request)
    declared = source.config.get("quantization_config")
    checkpoint_claims = [c for c in claims if not c.config.online]
    quantized = quantized_tensors(source.tensors)
    where = source.describe()
    if request is not None and not request.describes_checkpoint:
        if declared or checkpoint_claims or quantized:
            what = (checkpoint_claims[0].evidence if checkpoint_claims else
                    f"quantization_config={declared!r}" if declared else describe_quantized(quantized))
            raise QuantConfigError(
                f"--quantization {request.method} asks to quantize a checkpoint that is already quantized "
                f"({what}); drop --quantization to load it as it is ({where})")
        online = [c for c in claims if c.config.online]
        if not online:
            raise QuantConfigError(
                f"no installed plugin implements online quantization {request.method!r} "
                f"(installed: {', '.join(sorted(host.plugins))}); see `diffgen plugins`")
        claim = best_claim(online)
    else:
        claim = best_claim(checkpoint_claims)
    if claim is None and request is not None and request.describes_checkpoint:
        what, loader = FORMATS.get(request.method, (request.method, None))
        raise QuantConfigError(f"the flags describe a {what} checkpoint, but no installed plugin recognises this one "
                               f"as such (installed: {', '.join(sorted(host.plugins))}"
                               f"{f'; {loader} loads them' if loader else ''}; {where})")
    if claim is not None and claim.unsupported_reason:
        raise QuantConfigError(f"plugin {claim.plugin} recognises this format but cannot load it: "
                               f"{claim.unsupported_reason} ({claim.evidence}; {where})")
    if claim is None and (declared or quantized):
        method = declared.get("quant_method") if isinstance(declared, dict) else declared
        what = (format_of_declaration(str(method)) if declared else format_of_tensors(source.tensors)
                or f"no installed plugin recognises its quantized tensors: {describe_quantized(quantized)}")
        raise QuantConfigError(f"cannot load this checkpoint: {what} (installed plugins: "
                               f"{', '.join(sorted(host.plugins))}; {where})")
    return claims, claim


def diffusers_class(source: CheckpointSource) -> type:
    import diffusers

    name = source.config.get("_class_name")
    if name is None:
        raise LoadError(
            f"no model config: {source.describe()} has no config.json with a _class_name beside it. A weights "
            "file alone does not say which model it is: give the base model's transformer folder as the path "
            "and the file as weights_path (on the command line: --model-path with --transformer-weights-path, "
            "or --transformer-path DIR)")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    # ModelMixin itself (and any class without a config) names no model that from_config can build.
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) and issubclass(cls, diffusers.ConfigMixin)
            and cls is not diffusers.ModelMixin):
        raise LoadError(f"config.json names _class_name={name!r}, which is not a diffusers model class in this "
                        f"diffusers version ({source.describe()})")
    return cls


# A size in a model config beyond this is not a model diffgen can hold: it would only make
# from_config allocate (or loop) until the process is killed.
MAX_CONFIG_SIZE = 1 << 20


def check_config_sizes(cls: type, config: dict, source) -> None:
    """Every config value whose default in ``cls.__init__`` is an integer must be a non-negative
    integer no larger than MAX_CONFIG_SIZE (and likewise inside lists such as ``axes_dims_rope``)."""
    import inspect as pyinspect

    for key, param in pyinspect.signature(cls.__init__).parameters.items():
        default = param.default
        if key not in config:
            continue
        values = config[key]
        if isinstance(default, bool):  # a switch (guidance_embeds): -1 or [4, 4, 8] would pass as "true"
            if not isinstance(values, bool):
                raise LoadError(f"config.json {key}={values!r} is not true or false ({source.describe()})")
            continue
        if default is None and _annotated_int(param.annotation):  # ``out_channels: Optional[int] = None``
            if values is None:
                continue
            values = values if isinstance(values, (list, tuple)) else [values]
        elif isinstance(default, int):
            values = [values]
        elif not (isinstance(default, (list, tuple)) and default and all(isinstance(d, int) for d in default)):
            continue
        if not isinstance(values, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_CONFIG_SIZE for v in values):
            raise LoadError(f"config.json {key}={config[key]!r} is not a size {cls.__name__} can have (non-negative "
                            f"integers up to {MAX_CONFIG_SIZE}) ({source.describe()})")


# Rotary tables whose per-axis widths must add up to the attention head width (FLUX.1/2, Qwen-Image:
# axes_dims_rope; HunyuanVideo: rope_axes_dim). A wrong sum builds and loads, then fails at the first step.
ROPE_AXES_KEYS = ("axes_dims_rope", "rope_axes_dim")


def check_rope_axes(config: dict, source) -> None:
    head = config.get("attention_head_dim")
    for key in ROPE_AXES_KEYS:
        axes = config.get(key)
        if isinstance(head, int) and isinstance(axes, (list, tuple)) and all(isinstance(a, int) for a in axes) \
                and sum(axes) != head:
            raise LoadError(f"config.json {key}={list(axes)} adds up to {sum(axes)}, but attention_head_dim is {head}: "
                            f"the rotary embedding would not fit the attention heads ({source.describe()})")


def _annotated_int(annotation) -> bool:
    """An annotation of sizes only: ``int``, ``Optional[int]``, ``Tuple[int, ...]`` (no float, no str)."""
    import re

    text = annotation if isinstance(annotation, str) else repr(annotation)
    return bool(re.search(r"\bint\b", text)) and not re.search(r"\b(float|str|bool|Any)\b", text)


def build_meta_model(source: CheckpointSource) -> nn.Module:
    cls = diffusers_class(source)
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    check_config_sizes(cls, config, source)
    check_rope_axes(config, source)
    with parameters_on_meta():
        try:
            return cls.from_config(config)
        except Exception as exc:  # noqa: BLE001 - diffusers' own checks, or none: any failure is the config's
            raise LoadError(f"{cls.__name__} cannot be built from config.json: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''} ({source.describe()})") from exc


def expected_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """name -> the (meta) tensor to fill, with 16-bit floats retargeted to the compute dtype."""
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    quant_prefixes = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        if tensor.is_floating_point() and (owner not in quant_prefixes or name.endswith(".bias")):
            if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32):
                fp32 = any(m in name.split(".") for m in keep_fp32)
                tensor = tensor.to(torch.float32 if fp32 else dtype) if tensor.device.type == "meta" else tensor
        out[name] = tensor
    return out


@dataclass
class LoadPlan:
    """The claims, the winner, a decision per linear, and the meta model with the planned linears
    swapped in; ``diffgen inspect`` prints it, the loader fills it."""

    source: CheckpointSource
    model: nn.Module
    claims: list[QuantClaim]
    claim: QuantClaim | None
    decisions: list[LayerDecision]
    platform: Platform
    dtype: torch.dtype

    @property
    def config(self) -> QuantConfig | None:
        return self.claim.config if self.claim else None

    @property
    def model_class(self) -> str:
        return type(self.model).__name__

    def quantized(self) -> list[str]:
        return [d.layer.name for d in self.decisions if d.action == "quantize"]

    def kept(self) -> list[str]:
        return [d.layer.name for d in self.decisions if d.action == "keep"]

    def expected(self) -> dict[str, torch.Tensor]:
        return expected_tensors(self.model, self.dtype)

    def target(self, kind: str = "runtime") -> RepackTarget:
        """What ``repack_checkpoint`` streams into: this model's parameters (``runtime``, with
        their shapes and dtypes), a checkpoint file (``checkpoint``, as quantize writes), or the
        model's names only (``layout``, see ``diffgen.layout``)."""
        return _target(self.model, self.source, self.dtype, tuple(self.quantized()), kind)


def _target(model: nn.Module, source, dtype: torch.dtype, quantized: tuple[str, ...], kind: str) -> RepackTarget:
    expected = {k: (tuple(v.shape), v.dtype) for k, v in expected_tensors(model, dtype).items()} \
        if kind != "checkpoint" else {}
    linears = tuple(n for n, m in model.named_modules() if type(m) is nn.Linear or isinstance(m, QuantLinear))
    return RepackTarget(kind, type(model).__name__, dict(source.config), expected, linears, quantized)


def _decide(spec, claim: QuantClaim | None, model_class: str, host: PluginHost, platform: Platform,
            quant_backend: str | None, default_ignores: bool) -> LayerDecision:
    if claim is None:
        return LayerDecision(spec, "keep", "the checkpoint is not quantized")
    ignored = claim.config.ignored_by(spec.name)
    default = default_online_ignore(model_class, spec.name) if claim.config.online and default_ignores else None
    if default and not ignored:
        return LayerDecision(spec, "keep", f"{DEFAULT_KEPT}: diffgen keeps {default!r} of {model_class} in "
                                           "16-bit when quantizing online (--quantize-all-layers quantizes it)")
    if ignored:
        who, pattern = ignored
        return LayerDecision(spec, "keep", f"ignored by --quantization-ignored-layers {pattern!r}" if who == "user"
                             else f"excluded by the checkpoint ({pattern!r})")
    offers = host.create_linear_method(claim.config, spec, platform)
    plugin, method = choose_method(offers, spec.name, quant_backend)
    passed = [f"{m.name}: {m.unavailable_reason}" for _, m in offers
              if m.unavailable_reason and m.kind == "native"]
    reason = f"{method.kind} method of plugin {plugin}"
    if passed and method.kind != "native":
        reason += f" (not native: {passed[0]})"
    return LayerDecision(spec, "quantize", reason, method, plugin)


DEFAULT_KEPT = "precision-sensitive"  # the reason of a layer DEFAULT_ONLINE_IGNORES keeps 16-bit


def _check_request(request: QuantRequest | None, quant_backend: str | None, decisions: list[LayerDecision],
                   model_class: str, source) -> None:
    """Flags that would change nothing are said, not swallowed."""
    for pattern in request.ignored_layers if request else ():
        if not any(matches_user_pattern(pattern, d.layer.name) for d in decisions):
            example = decisions[0].layer.name if decisions else "none"
            log.warning("--quantization-ignored-layers %r matches no linear layer of %s (names look like %s); "
                        "it keeps nothing 16-bit", pattern, model_class, example)
    if quant_backend and not any(d.action == "quantize" for d in decisions):
        raise QuantConfigError(
            f"--quant-backend {quant_backend} has nothing to choose for: no layer is quantized (the checkpoint is "
            f"16-bit and no --quantization was given; {source.describe()})")


def _check_kept_layers_are_16bit(decisions: list[LayerDecision], source) -> None:
    """A layer the checkpoint's own ignore list keeps 16-bit must be stored in 16-bit: an ignore entry
    that names a layer whose weight is quantized contradicts the tensors (the load would then fail on
    its scales as "unexpected", or read FP8 bytes as a 16-bit weight)."""
    for d in decisions:
        info = source.tensors.get(f"{d.layer.name}.weight")
        if d.action == "keep" and d.reason.startswith("excluded by the checkpoint") and info is not None \
                and info.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise QuantConfigError(
                f"the checkpoint's quantization_config keeps layer {d.layer.name} in 16-bit ({d.reason}), but its "
                f"weight is stored {str(info.dtype).removeprefix('torch.')}: the ignore list (ignored_layers / "
                f"modules_to_not_convert / ignore) contradicts the tensors ({source.describe()})")


def plan(source: CheckpointSource, *, platform: Platform, dtype: torch.dtype, request: QuantRequest | None = None,
         quant_backend: str | None = None, host: PluginHost | None = None) -> LoadPlan:
    """Detect the format, decide for every linear its method or why it stays 16-bit, and build the
    meta model with the planned linears in place. ``platform`` and ``dtype`` come resolved
    (``diffgen.platform.resolve``)."""
    host = host or get_plugin_host()
    model = build_meta_model(source)
    model_class = type(model).__name__
    source = in_model_layout(source, host, _target(model, source, dtype, (), "layout"))
    claims, claim = resolve_claim(source, request, host)
    default_ignores = request is None or not request.quantize_all_layers
    decisions = [_decide(spec, claim, model_class, host, platform, quant_backend, default_ignores)
                 for spec in linear_layers(model, dtype)]
    _check_kept_layers_are_16bit(decisions, source)
    _check_request(request, quant_backend, decisions, model_class, source)
    with parameters_on_meta():
        for d in decisions:
            if d.action == "quantize":
                replace_module(model, d.layer.name, QuantLinear(d.layer, d.method, dtype=dtype))
    return LoadPlan(source, model, claims, claim, decisions, platform, dtype)
