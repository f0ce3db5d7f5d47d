"""Foreign module names -> diffusers', as a stream: the one mechanism layout plugins share (BFL and
ComfyUI single files, SGLang runtime names, nunchaku's names).

A ``RenameRule`` matches a foreign module name (regex, fullmatch) and names the diffusers modules
it stands for. One target is a rename; several are the parts of a linear the foreign layout fused
along dim 0 ([q; k; v], [q; k; v; mlp]), and every tensor of that linear is cut the way the
weight is:

  a leaf in ``shared_leaves`` (a per-input-channel companion: AWQ's pre_quant_scale,
    SVDQuant's smoothing) or one value in all  -> each part gets a copy
  one value per part, for a ``*_scale`` leaf  -> each part its own (per-shard scales)
  one row per row of the fused linear  -> split by the parts' widths
  anything else  -> LoadError naming the tensor
``swap`` exchanges the two halves of a single target (BFL stores the final adaLN as [shift;
scale], diffusers as [scale; shift]). Only shapes are used, so ``meta`` tensors work too, and
names that match no rule pass through unchanged: a converted stream converts to itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import torch

from .errors import LoadError
from .quant import TensorStream


@dataclass(frozen=True)
class RenameRule:
    source: str  # regex, fullmatch on the foreign module name
    targets: tuple[str, ...]  # diffusers module templates (re.sub syntax); several = parts along dim 0
    # rows of each part from the model config and the fused rows; None = equal parts
    widths: Callable[[dict, int], list[int]] | None = None
    swap: bool = False  # one target stored as [second half; first half]
    leaves: Mapping[str, str] = field(default_factory=dict)  # leaf renames for this rule (BFL's norm "scale")


class RenameTable:
    """Rules tried in order; the first that matches a module name wins."""

    def __init__(self, rules: Iterable[RenameRule]):
        self.rules = tuple(rules)
        self._compiled = [(re.compile(rule.source), rule) for rule in self.rules]

    def match(self, module: str) -> tuple[RenameRule, list[str]] | None:
        """The rule for ``module`` and the diffusers modules it names, or None."""
        for pattern, rule in self._compiled:
            m = pattern.fullmatch(module)
            if m:
                return rule, [m.expand(t) for t in rule.targets]
        return None

    def modules(self, module: str) -> list[str]:
        """The diffusers modules a foreign module stands for ([] when no rule names it)."""
        found = self.match(module)
        return found[1] if found else []


def _parts(name: str, tensor: torch.Tensor, leaf: str, rule: RenameRule, targets: list[str], config: dict,
           shared_leaves: frozenset[str], describe: str) -> list[torch.Tensor] | None:
    """``tensor`` of a fused linear cut into its parts; None when every part takes all of it."""
    if leaf in shared_leaves or tensor.numel() == 1:
        return None
    if leaf.endswith("_scale") and tensor.numel() == len(targets):
        return [t.reshape(()) for t in tensor.reshape(-1)]
    rows = tensor.shape[0] if tensor.dim() else 0
    widths = rule.widths(config, rows) if rule.widths else [rows // len(targets)] * len(targets)
    if rows and sum(widths) == rows and min(widths) > 0:
        return list(torch.split(tensor, widths, dim=0))
    raise LoadError(f"{describe} tensor {name!r} of shape {tuple(tensor.shape)} belongs to a fused linear of "
                    f"{sum(widths)} rows ({', '.join(targets)}: {widths}) but has neither one value per row, one "
                    "per part nor one in all, so it cannot be cut into the diffusers layers; requantize the "
                    "layer per row or per tensor")


def rename_and_split(tensors: TensorStream, table: RenameTable, config: dict, *, describe: str,
                     leaf_renames: Mapping[str, str] | None = None, shared_leaves: Iterable[str] = (),
                     prefix: str = "", drop: Iterable[str] = (),
                     keep: Callable[[str], bool] | None = None) -> TensorStream:
    """Stream ``tensors`` with every name ``table`` knows renamed (and split) into diffusers'.

    ``prefix`` is taken off every name first (ComfyUI's ``model.diffusion_model.``); names in
    ``drop`` are left out (markers that are no tensor of any model); ``keep(name)`` True passes a
    name through untouched (it is the model's own already); ``leaf_renames`` map leaf names for
    every rule (ComfyUI's ``scale_weight`` is ``weight_scale``); ``describe`` names the layout in errors.
    """
    shared, dropped = frozenset(shared_leaves), frozenset(drop)
    leaf_renames = dict(leaf_renames or {})

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for raw_name, tensor in tensors:
            name = raw_name.removeprefix(prefix) if prefix else raw_name
            if name in dropped:
                continue
            module, _, leaf = name.rpartition(".")
            found = None if keep is not None and keep(name) else table.match(module)
            if found is None:
                yield name, tensor
                continue
            rule, targets = found
            leaf = rule.leaves.get(leaf, leaf_renames.get(leaf, leaf))
            if len(targets) == 1 and not rule.swap:
                yield f"{targets[0]}.{leaf}", tensor
                continue
            if rule.swap:  # the two halves of one linear: cut as two parts, put back the other way round
                halves = _parts(raw_name, tensor, leaf, rule, targets * 2, config, shared, describe)
                yield f"{targets[0]}.{leaf}", tensor if halves is None else \
                    torch.cat([h.reshape(-1) if h.dim() == 0 else h for h in halves[::-1]], dim=0)
                continue
            parts = _parts(raw_name, tensor, leaf, rule, targets, config, shared, describe)
            for target, part in zip(targets, parts or [tensor.clone() for _ in targets]):
                yield f"{target}.{leaf}", part.contiguous()

    return stream()
