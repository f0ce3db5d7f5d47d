"""Attention backends: the mechanism that routes a loaded transformer's attention to a plugin's kernel.

A plugin publishes an :class:`AttentionBackend` in the entry-point group ``diffgen.attention``
under the name users pass to ``--attention`` (``attention=`` in ``load_pipeline`` and
``load_transformer``); ``sdpa`` is diffusers' own dispatch and needs no backend. The core names
no kernel.

How a call reaches the backend: diffusers' attention processors (and the plugins' rewritten
blocks) call ``dispatch_attention_fn(q, k, v, ..., backend=processor._attention_backend)`` with
q, k, v as [B, L, H, D]. ``install_attention`` sets each processor's ``_attention_backend`` to a
:class:`RoutedAttention` and puts a thin wrapper in place of ``dispatch_attention_fn`` (in
diffusers' ``attention_dispatch`` module and in each processor's module) that hands calls
carrying a RoutedAttention to it and every other call to diffusers unchanged, so models not
routed are untouched. A mask that masks nothing is dropped; a key-padding mask ([B, 1, 1, Lk] or
[B, Lk], bool or 0/-inf) is applied by giving the backend each batch element's kept keys only
(exact: a masked key has weight zero), in eager runs. A call the backend cannot take (any other
mask, a mask while compiling, dropout, causal, context parallelism, a head dim or dtype the backend
declines) runs diffusers' dispatch with the processor's previous backend, and is counted with its
reason; the counts are for eager calls (a compiled graph makes its choice once, when traced).

Which PyTorch kernel diffusers' own attention ran (``sdpa``, and a routed backend's fallbacks):
PyTorch's scaled_dot_product_attention picks one of its kernels per call (cuDNN, flash, memory-
efficient, math; on a Hopper GPU cuDNN is 1.6-1.9x flash at diffusion shapes), and a changed
layout, dtype or mask can move a model to a slower one without a word. ``install_attention``
therefore also wraps diffusers' native backend: each eager call asks PyTorch's own selection
(``torch._fused_sdp_choice``, with the arguments the native backend passes on) which kernel it
takes, and counts it per loaded transformer (``AttentionStats.sdpa_kernels``, in perf.json).
Compiled graphs choose when traced and are not counted.
"""

from __future__ import annotations

import contextvars
import functools
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .errors import DiffgenError

if TYPE_CHECKING:
    from .platform import Platform

ATTENTION = "diffgen.attention"  # the entry-point group
SDPA = "sdpa"  # diffusers' own dispatch (PyTorch SDPA by default)


@dataclass
class AttentionCall:
    """One ``dispatch_attention_fn`` call: query [B, Lq, H, D], key and value [B, Lk, H, D]."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False


class AttentionBackend:
    """A plugin's attention kernel. Set ``name`` (what ``--attention`` takes) and ``description``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def unavailable_reason(self, platform: "Platform") -> str | None:
        """None when the kernel runs on ``platform``; else why not, in words."""
        return None

    def call_unsupported_reason(self, call: AttentionCall) -> str | None:
        """None when ``attention(call)`` can take this call (mask, dropout and causal are checked
        by the core before); else why not: the call then runs diffusers' dispatch."""
        return None

    def attention(self, call: AttentionCall) -> torch.Tensor:
        """softmax(q k^T * scale) v, [B, Lq, H, D] in the query's dtype."""
        raise NotImplementedError

    def variant(self, platform: "Platform") -> str | None:
        """Which of its kernels the backend runs on ``platform`` (a launch config, say), for
        perf.json and ``diffgen inspect``; None when there is only one."""
        return None


_REGISTERED: dict[str, AttentionBackend] = {}  # backends registered in-process (tests, notebooks)


def register_attention_backend(backend: AttentionBackend) -> None:
    """Make ``backend`` available by its name without an entry point; it outranks a published one."""
    _REGISTERED[backend.name] = backend


def unregister_attention_backend(name: str) -> None:
    _REGISTERED.pop(name, None)


def attention_backends() -> dict[str, AttentionBackend]:
    """Every backend the loaded plugins publish (and those registered in-process), by name."""
    from .plugins import get_plugin_host

    host = get_plugin_host()
    found: dict[str, AttentionBackend] = {}
    for name, extension in host.extensions(ATTENTION).items():
        backend = host.load_extension(extension)
        if isinstance(backend, AttentionBackend):
            found[name] = backend
    return {**found, **_REGISTERED}


def resolve_attention_backend(name: str | None, platform: "Platform") -> AttentionBackend | None:
    """The backend for ``--attention name`` (None for sdpa); a DiffgenError when it is not
    installed or cannot run here, never a silent 16-bit run."""
    if name is None or name == SDPA:
        return None
    backends = attention_backends()
    if name not in backends:
        known = ", ".join([SDPA, *sorted(backends)])
        raise DiffgenError(f"--attention {name}: no installed plugin publishes this attention backend "
                           f"(known here: {known}); FP8 attention comes with diffgen-cuda (pip install diffgen[cuda])")
    backend = backends[name]
    reason = backend.unavailable_reason(platform)
    if reason is not None:
        raise DiffgenError(f"--attention {name} cannot run on {platform.describe()}: {reason}; "
                           f"use --attention {SDPA}")
    return backend


def _kept_keys(mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor | None:
    """[B, Lk] bool, the keys a key-padding mask keeps; None for any other mask (eager only)."""
    if mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if mask.dim() != 2 or mask.shape[-1] != keys or mask.shape[0] not in (1, batch):
        return None
    if mask.dtype == torch.bool:
        return mask.expand(batch, keys)
    keep = mask == 0
    if not bool((keep | (mask == -math.inf)).all()):
        return None  # a bias, not a mask
    return keep.expand(batch, keys)


@dataclass(eq=False)
class RoutedAttention:
    """What a routed processor carries as its ``_attention_backend``: the backend, the one it had
    before (for fallbacks and ``remove_attention``), and the model's shared counters."""

    backend: AttentionBackend
    previous: Any
    stats: "AttentionStats"

    def __call__(self, dispatch, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, attention_kwargs=None, parallel_config=None):
        call = AttentionCall(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        reason = None
        if parallel_config is not None:
            reason = "context parallelism"
        elif dropout_p:
            reason = "dropout"
        elif is_causal:
            reason = "causal"
        elif enable_gqa:
            reason = "grouped-query attention"
        elif attention_kwargs:
            reason = f"attention kwargs {sorted(attention_kwargs)}"
        elif attn_mask is not None:
            keep = None if torch.compiler.is_compiling() else _kept_keys(attn_mask, query.shape[0], key.shape[1])
            if keep is None or not bool(keep.any(dim=1).all()):  # a query with no key: diffusers' business
                reason = "attention mask"
            elif bool(keep.all()):
                call.attn_mask = None
            else:
                return self._kept_keys_only(dispatch, call, keep, attention_kwargs, parallel_config)
        if reason is None:
            reason = self.backend.call_unsupported_reason(call)
        counting = not torch.compiler.is_compiling()
        if reason is None:
            if counting:
                self.stats.calls += 1
            return self.backend.attention(call)
        if counting:
            self.stats.fallbacks[reason] += 1
        return dispatch(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs,
                        backend=self.previous, parallel_config=parallel_config)


    def _kept_keys_only(self, dispatch, call: AttentionCall, keep: torch.Tensor, attention_kwargs, parallel_config):
        """A key-padding mask: each batch element attends to its kept keys alone."""
        outs = []
        for b in range(call.query.shape[0]):
            kept = keep[b].nonzero().squeeze(1)
            outs.append(self(dispatch, call.query[b:b + 1], call.key[b:b + 1, kept], call.value[b:b + 1, kept],
                             scale=call.scale, attention_kwargs=attention_kwargs, parallel_config=parallel_config))
        return torch.cat(outs)


@dataclass
class AttentionStats:
    """Per model: the backend, the attention modules routed, eager calls it ran, and fallbacks."""

    backend: str
    modules: int = 0
    calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    sdpa_kernels: Counter = field(default_factory=Counter)  # PyTorch SDPA kernel -> eager calls
    variant: str | None = None  # the backend's ``variant`` on the model's platform

    def to_dict(self) -> dict:
        out = {"backend": self.backend, "modules": self.modules, "calls": self.calls,
               "fallbacks": dict(self.fallbacks), "sdpa_kernels": dict(self.sdpa_kernels)}
        return out if self.variant is None else {**out, "variant": self.variant}


# -- which PyTorch SDPA kernel diffusers' native backend ran -----------------------------------
_WATCHED: contextvars.ContextVar = contextvars.ContextVar("diffgen_sdpa_watch", default=None)
_KERNEL_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}  # torch's SDPBackend
_CHOICES: dict = {}  # (layout, settings) -> kernel name: what PyTorch's choice reads, and its answer


def sdpa_kernel_for(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False) -> str:
    """The kernel PyTorch's scaled_dot_product_attention takes for these [B, H, L, D] arguments
    under the current settings (``torch.nn.attention.sdpa_kernel``, deterministic mode): cudnn,
    flash, efficient or math. PyTorch's own selection reads shapes, strides, dtypes, alignment, the
    device and those settings, never values, so it is asked once per such layout."""
    def spec(t):
        return None if t is None else (tuple(t.shape), tuple(t.stride()), t.dtype, t.data_ptr() % 16 == 0,
                                       t.requires_grad)

    cuda = torch.backends.cuda
    settings = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
                cuda.math_sdp_enabled(), torch.are_deterministic_algorithms_enabled(), torch.is_grad_enabled())
    layout = (spec(query), spec(key), spec(value), spec(attn_mask), float(dropout_p), bool(is_causal), scale,
              bool(enable_gqa), query.device, settings)
    name = _CHOICES.get(layout)
    if name is None:
        choice = int(torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                             enable_gqa=enable_gqa))
        name = _CHOICES[layout] = _KERNEL_NAMES.get(choice, f"backend {choice}")
        if len(_CHOICES) > 4096:  # many shapes (a sweep of resolutions): start over rather than grow
            _CHOICES.clear()
            _CHOICES[layout] = name
    return name


def _watch_native_backend() -> bool:
    """Wrap diffusers' native attention backend so that its eager calls count their SDPA kernel
    for the transformer running (``_WATCHED``); False where diffusers has no such registry."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
        backends = _AttentionBackendRegistry._backends
        native = backends[AttentionBackendName.NATIVE]
    except (ImportError, AttributeError, KeyError, TypeError):
        return False
    if getattr(native, "_diffgen_watch", False):
        return True

    @functools.wraps(native)
    def watched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                return_lse=False, _parallel_config=None):
        # is_compiling first: a graph being traced never reaches the context variable (no graph break)
        stats = None if torch.compiler.is_compiling() or _parallel_config is not None else _WATCHED.get()
        if stats is not None:
            mask = attn_mask
            if mask is not None and mask.ndim == 2 and mask.shape[0] == query.shape[0] \
                    and mask.shape[1] == key.shape[1]:
                mask = mask[:, None, None, :]  # as the native backend reshapes it for SDPA
            q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
            stats.sdpa_kernels[sdpa_kernel_for(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)] += 1
        return native(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                      scale=scale, enable_gqa=enable_gqa, return_lse=return_lse, _parallel_config=_parallel_config)

    watched._diffgen_watch = True
    backends[AttentionBackendName.NATIVE] = watched
    return True


def _enter_watch(model, args):
    if not torch.compiler.is_compiling():  # a whole compiled model: its calls are not counted anyway
        model.__dict__.setdefault("_diffgen_watch_tokens", []).append(_WATCHED.set(model.diffgen_attention))


def _leave_watch(model, args, output):
    tokens = model.__dict__.get("_diffgen_watch_tokens")
    if not torch.compiler.is_compiling() and tokens:
        _WATCHED.reset(tokens.pop())


def _watch_sdpa(model: nn.Module) -> None:
    """Count the SDPA kernels of ``model``'s eager attention calls in ``model.diffgen_attention``."""
    if getattr(model, "_diffgen_watch_hooks", None) is None and _watch_native_backend():
        model._diffgen_watch_hooks = (model.register_forward_pre_hook(_enter_watch),
                                      model.register_forward_hook(_leave_watch, always_call=True))


_ORIGINAL_DISPATCH: dict[str, Any] = {}


def _install_dispatch(module_name: str) -> None:
    """Put the routing wrapper in place of ``dispatch_attention_fn`` in diffusers' dispatch module
    and in ``module_name`` where that module imported it by name (a processor that imports it when
    called gets the wrapper from the dispatch module)."""
    import diffusers.models.attention_dispatch as dispatch_module

    original = _ORIGINAL_DISPATCH.setdefault("fn", dispatch_module.dispatch_attention_fn)
    if getattr(original, "_diffgen_routing", False):
        raise RuntimeError("diffgen.attention: the original dispatch_attention_fn was lost")
    if "wrapper" not in _ORIGINAL_DISPATCH:
        def dispatch_attention_fn(query, key, value, *args, backend=None, **kwargs):
            if isinstance(backend, RoutedAttention):
                return backend(original, query, key, value, *args, **kwargs)
            return original(query, key, value, *args, backend=backend, **kwargs)

        dispatch_attention_fn._diffgen_routing = True
        _ORIGINAL_DISPATCH["wrapper"] = dispatch_attention_fn
    wrapper = _ORIGINAL_DISPATCH["wrapper"]
    for name in (dispatch_module.__name__, module_name):
        module = sys.modules.get(name)
        if getattr(module, "dispatch_attention_fn", None) is original:
            setattr(module, "dispatch_attention_fn", wrapper)


def install_attention(model: nn.Module, backend: AttentionBackend | None,
                      platform: "Platform | None" = None) -> AttentionStats:
    """Route the attention of every attention module of ``model`` to ``backend`` (None: sdpa,
    nothing changes). Sets ``model.diffgen_attention`` (an AttentionStats) either way; with the
    ``platform``, it records the backend's ``variant`` there."""
    stats = AttentionStats(backend.name if backend is not None else SDPA)
    if backend is not None:
        stats.variant = backend.variant(platform) if platform is not None else None
        for module in model.modules():
            processor = getattr(module, "processor", None)
            if processor is None or not hasattr(processor, "_attention_backend"):
                continue
            _install_dispatch(type(processor).__module__)
            previous = processor._attention_backend
            if isinstance(previous, RoutedAttention):
                previous = previous.previous
            processor._attention_backend = RoutedAttention(backend, previous, stats)
            stats.modules += 1
        if stats.modules == 0:
            raise DiffgenError(f"--attention {backend.name}: {type(model).__name__} has no attention module with a "
                               "diffusers attention processor (dispatch_attention_fn), so none can be routed; "
                               "use --attention sdpa")
    model.diffgen_attention = stats
    _watch_sdpa(model)
    return stats


def remove_attention(model: nn.Module) -> None:
    """Give every routed processor of ``model`` its previous backend back."""
    for module in model.modules():
        processor = getattr(module, "processor", None)
        routed = getattr(processor, "_attention_backend", None)
        if isinstance(routed, RoutedAttention):
            processor._attention_backend = routed.previous
    model.diffgen_attention = AttentionStats(SDPA)


def describe_attention(platform: "Platform", requested: str | None = None) -> dict:
    """For ``diffgen inspect``: the backend a load with ``--attention requested`` would run, and
    every installed backend with whether it runs on ``platform`` and why not."""
    backends = []
    for name, backend in sorted(attention_backends().items()):
        reason = backend.unavailable_reason(platform)
        backends.append({"name": name, "description": backend.description, "available": reason is None,
                         "reason": reason or "", "variant": backend.variant(platform) if reason is None else None})
    return {"requested": requested or SDPA, "backends": backends}
