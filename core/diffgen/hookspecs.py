"""The four hooks every diffgen plugin may implement.

A plugin is a module (or object) with functions marked ``@diffgen.hookimpl`` and named exactly as
below; it is found through an entry point in group ``diffgen``. An implementation may accept a
subset of a hook's arguments. The core never relies on pluggy's call order: it calls each
implementation on its own, records what one raises (fatal only with ``DIFFGEN_STRICT_PLUGINS=1``)
and ranks the answers itself, as each docstring says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import pluggy

if TYPE_CHECKING:
    from .checkpoint import CheckpointSource
    from .linear import LinearMethod
    from .platform import Platform, PlatformReport
    from .quant import LayerSpec, QuantClaim, QuantConfig, QuantRequest, RepackTarget, TensorStream

PROJECT = "diffgen"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def check_platform(platform: Platform) -> PlatformReport | None:
    """Say what this plugin can run on this machine.

    :param platform: what the core found: device kind (``cuda``, ``rocm``, ``mps``, ``cpu``),
        device name, compute capability or gfx arch, memory, torch version, and
        ``platform.library(name)`` to check whether an optional library imports (lazy, cached).
    :return: a :class:`~diffgen.platform.PlatformReport` naming each kernel the plugin has, each
        available or not with the reason ("mm_fp4 needs SM100+, this GPU is SM90"); or ``None``
        when the plugin has nothing to say.

    Every plugin's report is collected; nothing is ranked. ``diffgen plugins`` and
    ``diffgen inspect`` print the reports. Never import a heavy optional library at module import
    time: do it here, inside ``platform.library()``, or inside the kernel.
    """


@hookspec
def detect_quant_config(source: CheckpointSource, request: QuantRequest | None) -> QuantClaim | None:
    """Recognise the quantization format of one checkpoint component.

    :param source: lazy access to the component: ``source.config`` (its ``config.json``),
        ``source.sidecars`` (other JSON files, e.g. ``quant_model_description.json``),
        ``source.metadata`` (safetensors ``__metadata__`` per file), ``source.tensors``
        (name -> dtype, shape, file; no tensor data is read) and ``source.files``.
    :param request: the user's explicit quantization request (``--quantization NAME`` with its
        ignored layers), or ``None``. A plugin that implements online quantization for
        ``request.method`` claims it here when the checkpoint is 16-bit.
    :return: a :class:`~diffgen.quant.QuantClaim` (the QuantConfig, an integer specificity and the
        evidence in words), or ``None`` when the checkpoint is not this plugin's format. A plugin
        that recognises its format but not this variant of it (an algorithm it does not
        implement) claims it with ``unsupported_reason`` saying what is supported; if that claim
        wins, loading stops with the evidence and the reason. Do not raise for this: an exception
        is recorded as a plugin failure, not shown as the user's error.

    Every plugin may claim. The core takes the claim with the highest specificity; two claims
    with different configs at the same highest specificity are an error naming both plugins and
    their evidence. A checkpoint that declares quantization together with a ``request`` is an
    error: an explicit flag never silently overrides what the checkpoint says.
    Conventional specificities: 10 for a bare ``quant_method`` match, 20 for method plus
    algorithm, 25 for tensors that show the format when nothing declares one, 30 when tensor
    names and dtypes confirm a declaration, 100 for an online request. The declaration may come
    from config.json, a config.json or sidecar beside a weights-only override, or the
    safetensors metadata (``source.declared_in`` says where). A checkpoint with quantized tensors
    (FP8, integer, packed) that no plugin claims is an error, never a 16-bit load.
    """


@hookspec
def create_linear_method(
    config: QuantConfig, layer: LayerSpec, platform: Platform
) -> LinearMethod | Iterable[LinearMethod] | None:
    """Offer implementations for one linear layer of a model quantized with ``config``.

    :param config: the winning QuantConfig (any plugin may serve any family it understands, e.g.
        a kernel plugin offering a faster method for the builtin ``fp8`` family).
    :param layer: the layer's dotted name, ``in_features``, ``out_features``, ``bias`` and the
        compute dtype.
    :param platform: the platform the model will run on.
    :return: one :class:`~diffgen.linear.LinearMethod`, several, or ``None``. An offer that cannot
        run here is still returned, with ``unavailable_reason`` set, so errors can list it.

    The core ranks the offers that can run by kind: ``native`` > ``weight-only`` > ``reference``,
    then by the method's ``priority`` (higher first; a kernel plugin outranks a generic method of
    the same kind this way), then plugin name and method name. ``--quant-backend NAME`` keeps only offers whose
    method name or plugin name is NAME. When no offer can run, the error lists every offer and why.
    """


@hookspec
def repack_checkpoint(
    config: QuantConfig | None, tensors: TensorStream, target: RepackTarget
) -> TensorStream | None:
    """Turn a foreign checkpoint layout into the runtime layout, as a stream.

    :param config: the winning QuantConfig, or ``None`` for a 16-bit checkpoint.
    :param tensors: an iterator of ``(name, tensor)`` pairs, shard by shard.
    :param target: what the stream must become: ``target.kind`` is ``"runtime"`` (load into a
        model; ``target.expected`` maps each parameter name to its shape and dtype) or
        ``"checkpoint"`` (offline repack or quantize), or ``"layout"``: names only. Before
        detection the planner runs the hooks once over the header with ``meta`` tensors (and
        ``config=None``) to see the checkpoint in the model's names: a plugin that renames or
        splits a foreign layout (BFL single files, SGLang runtime names) acts for every kind, uses
        only shapes, and passes model names through unchanged, since the loaded stream meets it
        again; a plugin that changes values (scales, quantization) acts only for its kind.
    :return: a new iterator of ``(name, tensor)`` pairs (renamed, re-laid-out, quantized), or
        ``None`` when this plugin has nothing to change. Be lazy: transform pair by pair so peak
        memory stays near one shard; pass through what you do not touch.

    Streams are chained: the plugin that made the winning claim runs first, then the others in
    plugin-name order, each fed the previous one's output.
    """


# The hook names, read off the specs above (the plugin host and the conformance suite use this).
HOOK_NAMES: tuple[str, ...] = tuple(name for name, value in list(globals().items())
                                    if getattr(value, f"{PROJECT}_spec", None) is not None)
