"""Proving a rewrite: the same loaded model run before, rewritten, and with the rewrite taken out
again (``diffgen.rewrites``) must give the same numbers.

Use it for forward rewrites whose ops match the originals exactly (the reference producers of a
``PreparedInputMethod`` do): any slip in the rewritten forward's wiring then shows as a difference.
Rewrites that only fuse layers change the order of sums, so compare those with a tolerance.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..platform import Platform
from ..rewrites import BlockRewrite, apply_rewrites, undo_rewrites


def assert_rewrites_exact(model: torch.nn.Module, inputs: dict, rewrites: Iterable[BlockRewrite],
                          platform: Platform, *, run: Callable[[torch.nn.Module, dict], torch.Tensor]) -> dict[str, str]:
    """Run ``model`` (``run(model, inputs)`` returns a tensor), apply ``rewrites``, run again, take
    their forwards out, run again: all three outputs must be equal. The model is left rewritten;
    returns what ``apply_rewrites`` returned."""
    rewrites = list(rewrites)
    stock = run(model, inputs)
    done = apply_rewrites(model, rewrites, platform)
    rewritten = run(model, inputs)
    undo_rewrites(model)
    undone = run(model, inputs)
    assert torch.equal(undone, stock), "taking the rewrites out did not give the model's own forward back"
    differ = (rewritten != stock).float().mean().item()
    assert torch.equal(rewritten, stock), \
        f"the rewritten modules ({', '.join(done) or 'none'}) change {differ:.2%} of the output values"
    apply_rewrites(model, rewrites, platform)
    return done
