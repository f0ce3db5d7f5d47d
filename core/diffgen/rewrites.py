"""Rewrites of a loaded model: the mechanism. Which modules are rewritten, and how, comes from plugins.

A plugin publishes :class:`BlockRewrite` objects in the entry-point group ``diffgen.rewrites``.
Each names the diffusers class of the modules it rewrites (``block_class``: a transformer block,
an attention). After the weights are loaded, every module of that class is offered to it,
innermost modules first (an attention before the block that holds it, so a block's rewrite sees
its parts rewritten already), and ``rewrite(module, platform)`` either prepares the module and
returns None, or returns why it leaves the module alone. A rewrite with a ``forward_mixin`` then
has that class put in front of the module's own, so the module's ``forward`` is the mixin's; the
mixin calls ``super().forward(...)`` for calls it does not handle (diffusers' own forward).

``undo_rewrites`` takes the mixins out again. That is how a rewrite proves itself: the same
loaded model run rewritten and not must give the same numbers (``diffgen.testing.rewrites``).
What a rewrite changes in the module itself stays: ``fuse_linears`` (Q, K and V as one GEMM) is
exact because ``LinearMethod.fuse`` promises to be.

Rewrites usually hand quantized linears their input ready-made: see ``PreparedInputMethod`` in
``diffgen.linear`` for the contract between a rewritten block and a linear method.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable

from torch import nn

from .linear import QuantLinear

if TYPE_CHECKING:
    from .platform import Platform


class BlockRewrite:
    """One plugin-offered rewrite of the modules of one diffusers class.

    Set ``name`` (shown in ``perf.json`` and ``diffgen inspect``), ``block_class`` (the diffusers
    class name of the blocks, or attentions, it rewrites), and either override ``rewrite`` or give a
    ``forward_mixin``, or both.
    """

    name: ClassVar[str] = ""
    block_class: ClassVar[str] = ""
    forward_mixin: ClassVar[type | None] = None

    def rewrite(self, module: nn.Module, platform: "Platform") -> str | None:
        """Prepare ``module`` for this rewrite and return None, or return why it is left alone
        (its parts are not what the rewrite expects, no linear of it gains anything). Answer
        from the module and ``platform``; leave the module as it was when returning a reason."""
        return None


@functools.cache
def _rewritten_class(cls: type, mixin: type) -> type:
    return type(cls.__name__, (mixin, cls), {"__module__": cls.__module__, "_diffgen_original_class": cls})


def apply_rewrites(model: nn.Module, rewrites: Iterable[BlockRewrite], platform: "Platform", *,
                   on_error: Callable[[BlockRewrite, Exception], None] | None = None,
                   declined: dict[str, tuple[str, str]] | None = None) -> dict[str, str]:
    """Offer every module of ``model`` to the rewrites of its class, innermost first; returns
    module name -> the rewrite applied, in the model's order. At most one rewrite per module:
    the first one that accepts it. ``declined`` (if given) collects module name -> (rewrite,
    reason) for the modules every candidate left alone. A rewrite that raises is reported to
    ``on_error`` (raised when there is none) and its module stays as the rewrite left it."""
    by_class: dict[str, list[BlockRewrite]] = {}
    for rewrite in rewrites:
        by_class.setdefault(rewrite.block_class, []).append(rewrite)
    order = list(model.named_modules())
    done: dict[str, str] = {}
    for name, module in reversed(order):
        if hasattr(type(module), "_diffgen_original_class"):
            continue  # rewritten already
        for rewrite in by_class.get(type(module).__name__, ()):
            try:
                reason = rewrite.rewrite(module, platform)
            except (Exception, SystemExit) as exc:  # a plugin's sys.exit must not end the load either
                if on_error is None:
                    raise
                on_error(rewrite, exc)
                continue
            if reason is None:
                if rewrite.forward_mixin is not None:
                    module.__class__ = _rewritten_class(type(module), rewrite.forward_mixin)
                done[name] = rewrite.name
                break
            if declined is not None:
                declined[name] = (rewrite.name, reason)
    if declined is not None:
        for name in done:
            declined.pop(name, None)
    return {name: done[name] for name, _ in order if name in done}


def undo_rewrites(model: nn.Module) -> None:
    """Give every module a rewrite mixed into its class back its own class (and forward)."""
    for module in model.modules():
        original = getattr(type(module), "_diffgen_original_class", None)
        if original is not None:
            module.__class__ = original


def fuse_linears(module: nn.Module, groups: Iterable[tuple[str, tuple[str, ...]]]) -> bool:
    """Replace each group of quantized linears of ``module`` that read the same input by one layer
    (``target``) whose output is theirs concatenated, through ``LinearMethod.fuse``; the parts are
    deleted, so no weight is held twice. All groups or none: False (nothing changed) when a part is
    not a QuantLinear or its method declines. A group whose parts are all absent is skipped."""
    fused = {}
    groups = list(groups)
    for target, parts in groups:
        layers = [getattr(module, part, None) for part in parts]
        if all(layer is None for layer in layers):
            continue
        if not all(isinstance(layer, QuantLinear) for layer in layers):
            return False
        owner = layers[0].method.layer.name.rpartition(".")[0]  # the dotted name the parts live under
        layer = layers[0].method.fuse(layers, f"{owner}.{target}" if owner else target)
        if layer is None:
            return False
        fused[target] = layer
    if not fused:
        return False
    for target, parts in groups:
        if target in fused:
            setattr(module, target, fused[target])
            for part in parts:
                delattr(module, part)
    return True
