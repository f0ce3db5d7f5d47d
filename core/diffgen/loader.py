"""Build a diffusers transformer on the meta device, swap planned linears, stream weights in.

Only parameters live on the meta device while the model is built; buffers computed at init
(rotary tables) stay real. Tensors then stream shard by shard through ``repack_checkpoint`` onto
the target device, and each quantized layer is processed (converted, or quantized online) as soon
as its last tensor arrives, so the full 16-bit model never sits on the device.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from . import fused_blocks, fusion
from .checkpoint import CheckpointSource, open_checkpoint
from .errors import LoadError, QuantConfigError
from .linear import QuantLinear, replace_module
from .platform import Platform, detect_platform
from .plugins import PluginHost, best_claim, choose_method, get_plugin_host
from .quant import LayerDecision, default_online_ignore, QuantClaim, QuantConfig, QuantRequest, RepackTarget, layer_group, linear_layers

log = logging.getLogger("diffgen")
Progress = Callable[[int, int, int, int], None]  # (bytes loaded, bytes in total, shard, shards)


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


@dataclass
class LoadPlan:
    """Everything decided before a tensor is read; ``diffgen inspect`` prints it."""

    source: CheckpointSource
    model_class: str
    claims: list[QuantClaim]
    claim: QuantClaim | None
    decisions: list[LayerDecision]
    platform: Platform
    dtype: torch.dtype
    plugin_failures: list = field(default_factory=list)

    @property
    def config(self) -> QuantConfig | None:
        return self.claim.config if self.claim else None


def resolve_claim(source: CheckpointSource, request: QuantRequest | None, host: PluginHost
                  ) -> tuple[list[QuantClaim], QuantClaim | None]:
    """Rank the plugins' claims; an explicit request must not contradict the checkpoint."""
    claims = host.detect_quant_config(source, request)
    declared = source.config.get("quantization_config")
    checkpoint_claims = [c for c in claims if not c.config.online]
    if request is not None:
        if declared or checkpoint_claims:
            what = checkpoint_claims[0].evidence if checkpoint_claims else \
                f"config.json quantization_config={declared!r}"
            raise QuantConfigError(
                f"--quantization {request.method} was given, but {source.describe()} already declares "
                f"quantization ({what}); drop --quantization to load the checkpoint as it is")
        online = [c for c in claims if c.config.online]
        if not online:
            raise QuantConfigError(
                f"no installed plugin implements online quantization {request.method!r} "
                f"(installed: {', '.join(sorted(host.plugins))}); see `diffgen plugins`")
        return claims, best_claim(online)
    claim = best_claim(checkpoint_claims)
    if claim is not None and claim.unsupported_reason:
        raise QuantConfigError(f"{source.describe()}: {claim.evidence}; plugin {claim.plugin} recognises "
                               f"this format but cannot load it: {claim.unsupported_reason}")
    if claim is None and declared:
        method = declared.get("quant_method") if isinstance(declared, dict) else declared
        raise QuantConfigError(
            f"{source.describe()} declares quantization_config quant_method={method!r}, but no installed "
            f"plugin recognises it (installed: {', '.join(sorted(host.plugins))}); install the plugin "
            "for this format, e.g. pip install diffgen[cuda]")
    return claims, claim


def diffusers_class(source: CheckpointSource) -> type:
    import diffusers

    name = source.config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None:
        raise LoadError(f"config.json of {source.describe()} names _class_name={name!r}, which is not a "
                        "diffusers model class in this diffusers version")
    return cls


def build_meta_model(source: CheckpointSource) -> nn.Module:
    cls = diffusers_class(source)
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    with parameters_on_meta():
        return cls.from_config(config)


def plan_model(model: nn.Module, source: CheckpointSource, *, request: QuantRequest | None = None,
               quant_backend: str | None = None, device: str | None = None,
               dtype: torch.dtype = torch.bfloat16, host: PluginHost | None = None) -> LoadPlan:
    """Detect the format and decide, for every linear, its method or why it stays 16-bit."""
    host = host or get_plugin_host()
    platform = detect_platform(device)
    claims, claim = resolve_claim(source, request, host)
    decisions = []
    for spec in linear_layers(model, dtype):
        if claim is None:
            decisions.append(LayerDecision(spec, "keep", "the checkpoint is not quantized"))
            continue
        ignored = claim.config.ignored_by(spec.name)
        default = default_online_ignore(type(model).__name__, spec.name) if claim.config.online else None
        if default and not ignored:
            decisions.append(LayerDecision(spec, "keep", f"precision-sensitive: diffgen keeps {default!r} of "
                                           f"{type(model).__name__} in 16-bit when quantizing online"))
            continue
        if ignored:
            who, pattern = ignored
            reason = (f"ignored by --quantization-ignored-layers {pattern!r}" if who == "user"
                      else f"excluded by the checkpoint ({pattern!r})")
            decisions.append(LayerDecision(spec, "keep", reason))
            continue
        offers = host.create_linear_method(claim.config, spec, platform)
        plugin, method = choose_method(offers, spec.name, quant_backend)
        passed = [f"{m.name}: {m.unavailable_reason}" for _, m in offers
                  if m.unavailable_reason and m.kind == "native"]
        reason = f"{method.kind} method of plugin {plugin}" + (f" (not native: {passed[0]})" if passed and method.kind != "native" else "")
        decisions.append(LayerDecision(spec, "quantize", reason, method, plugin))
    return LoadPlan(source, type(model).__name__, claims, claim, decisions, platform, dtype,
                    list(host.failures))


def warn_fallbacks(plan: LoadPlan) -> None:
    """One line per (method, reason) when quantized layers do not run natively."""
    seen: dict[str, list[str]] = {}
    for d in plan.decisions:
        if d.action == "quantize" and d.method.kind != "native":
            seen.setdefault(d.reason, []).append(layer_group(d.layer.name))
    for reason, groups in seen.items():
        log.warning("%d quantized layers run %s; expect them to be slower than 16-bit, not faster",
                    len(groups), reason)


def apply_plan(model: nn.Module, plan: LoadPlan) -> None:
    with parameters_on_meta():
        for d in plan.decisions:
            if d.action == "quantize":
                replace_module(model, d.layer.name, QuantLinear(d.layer, d.method, dtype=plan.dtype))


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


def _fit(name: str, tensor: torch.Tensor, want: torch.Tensor, where: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(want.shape):
        same = tensor.numel() == want.numel() and [s for s in tensor.shape if s != 1] == [s for s in want.shape if s != 1]
        if not same:
            raise LoadError(f"tensor {name!r} in {where} has shape {tuple(tensor.shape)}, "
                            f"the model expects {tuple(want.shape)}")
        tensor = tensor.reshape(want.shape)  # singleton dimensions carry no meaning ([] vs [1], [N] vs [N,1])
    if tensor.dtype != want.dtype:
        float16 = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        if tensor.dtype in float16 and want.dtype in float16:
            return tensor.to(want.dtype)
        raise LoadError(f"tensor {name!r} in {where} is {tensor.dtype}, but the model expects {want.dtype} "
                        "there (is the layer quantized in the checkpoint but kept 16-bit by the plan, or the "
                        "other way round? see `diffgen inspect`)")
    return tensor


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def load_weights(model: nn.Module, plan: LoadPlan, *, device: str | torch.device,
                 host: PluginHost | None = None, progress: Progress | None = None) -> None:
    host = host or get_plugin_host()
    source = plan.source
    expected = expected_tensors(model, plan.dtype)
    target = RepackTarget("runtime", plan.model_class, dict(source.config),
                          {k: (tuple(v.shape), v.dtype) for k, v in expected.items()},
                          tuple(d.layer.name for d in plan.decisions))
    stream = host.repack_checkpoint(plan.config, source.iter_tensors(), target,
                                    first=plan.claim.plugin if plan.claim else None)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    pending = {n: {k for k in expected if k.rpartition(".")[0] == n} for n in quant}
    total = sum(i.nbytes for i in source.tensors.values())
    shard_of = {path: i + 1 for i, path in enumerate(source.files)}
    done, loaded, unexpected, shard = 0, set(), [], 1
    for name, tensor in stream:
        where = str(source.file_of(name)) if name in source.tensors else source.describe()
        if name in source.tensors:
            shard = shard_of.get(source.file_of(name), shard)
        if name not in expected:
            unexpected.append(name)
            continue
        if name in loaded:
            raise LoadError(f"tensor {name!r} arrives twice (second time from {where})")
        _assign(model, name, _fit(name, tensor, expected[name], where).to(device))
        loaded.add(name)
        done += tensor.numel() * tensor.element_size()
        if progress:
            progress(done, total, shard, len(source.files))
        owner = name.rpartition(".")[0]
        if owner in pending:
            pending[owner].discard(name)
            if not pending[owner]:
                quant[owner].method.process_weights_after_loading(quant[owner])
                del pending[owner]
    missing = [k for k, v in expected.items() if k not in loaded and v.device.type == "meta"]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:8])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:8])})")
        raise LoadError(f"{source.describe()} does not fit {plan.model_class}: {'; '.join(parts)}. "
                        "A checkpoint for another model, or a format whose plugin is not installed?")
    for module in model.modules():  # buffers made at init (rotary tables) follow the weights
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != torch.device(device):
                module._buffers[key] = buf.to(device)


def _pin_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """diffusers reads ``model.dtype`` from the first float parameter, which may now be FP8."""
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"dtype": property(lambda self: dtype),
                                                  "__module__": cls.__module__})
    model.is_quantized = True  # diffusers then refuses .to(dtype), which would ruin FP8 weights


def load_transformer(path, *, weights_path=None, quantization: str | None = None,
                     quantization_ignored_layers=(), quant_backend: str | None = None,
                     device: str | None = None, dtype: torch.dtype = torch.bfloat16,
                     allow_pickle: bool = False, progress: Progress | None = None,
                     fuse_projections: bool = True) -> nn.Module:
    """Load one diffusers transformer through the plugins.

    ``path`` is a component directory (config.json + weights), a weights file or index, or an
    already-open source: anything with the :class:`~diffgen.checkpoint.CheckpointSource`
    interface (a benchmark serves tensors built in memory this way). ``fuse_projections`` merges
    quantized Q/K/V projections where that is exact (:mod:`diffgen.fusion`) and then lets eligible
    blocks feed their quantized linears from fused producers in eager runs
    (:mod:`diffgen.fused_blocks`); False leaves the model as diffusers builds it.
    """
    host = get_plugin_host()
    source = path if hasattr(path, "iter_tensors") else \
        open_checkpoint(path, weights_path=weights_path, allow_pickle=allow_pickle)
    request = QuantRequest(quantization, tuple(quantization_ignored_layers)) if quantization else None
    model = build_meta_model(source)
    plan = plan_model(model, source, request=request, quant_backend=quant_backend, device=device,
                      dtype=dtype, host=host)
    warn_fallbacks(plan)
    apply_plan(model, plan)
    load_weights(model, plan, device=plan.platform.device, host=host, progress=progress)
    if any(d.action == "quantize" for d in plan.decisions):
        _pin_compute_dtype(model, dtype)
    model.eval().requires_grad_(False)
    model.diffgen_plan = plan
    model.diffgen_fused_projections = fusion.fuse_projections(model) if fuse_projections else []
    model.diffgen_fused_blocks = fused_blocks.fuse_blocks(model) if fuse_projections else []
    return model
