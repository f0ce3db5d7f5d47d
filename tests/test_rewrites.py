"""diffgen.rewrites, the mechanism, on small modules: which modules are offered, in which order,
what a declining or raising rewrite leaves, undo, and fuse_linears against the unfused layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffgen.builtin.fp8_methods import Fp8ReferenceMethod
from diffgen.platform import resolve
from diffgen.rewrites import BlockRewrite, apply_rewrites, fuse_linears, undo_rewrites
from diffgen.testing.layers import fp8_linear
from diffgen.testing.rewrites import assert_rewrites_exact

CPU, _ = resolve("cpu")


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.other = Inner()

    def forward(self, x):
        return self.other(self.inner(x))


class Doubled:
    def forward(self, x):
        return 2 * super().forward(x)


class Recording(BlockRewrite):
    """Records each module offered (and what it saw there); declines where ``decline`` says."""

    def __init__(self, name, block_class, decline=lambda module: None, mixin=None):
        self.name, self.block_class, self.decline, self.forward_mixin = name, block_class, decline, mixin
        self.seen = []

    def rewrite(self, module, platform):
        self.seen.append((module, getattr(module, "rewritten_by", None)))
        reason = self.decline(module)
        if reason is None:
            module.rewritten_by = self.name
        return reason


def test_innermost_modules_are_offered_first_and_take_one_rewrite():
    model = Outer()
    inner = Recording("inner", "Inner")
    second = Recording("second", "Inner")
    outer = Recording("outer", "Outer")
    done = apply_rewrites(model, [outer, inner, second], CPU)
    assert done == {"": "outer", "inner": "inner", "other": "inner"}  # in the model's order
    assert [m for m, _ in inner.seen] == [model.other, model.inner]  # children before their parent
    assert outer.seen == [(model, None)] and model.inner.rewritten_by == "inner"
    assert second.seen == []  # the first rewrite that accepts a module is its only one


def test_declined_modules_keep_their_class_and_say_why():
    model = Outer()
    declining = Recording("picky", "Inner", decline=lambda m: "not this one" if m is model.other else None,
                          mixin=Doubled)
    declined = {}
    assert apply_rewrites(model, [declining], CPU, declined=declined) == {"inner": "picky"}
    assert declined == {"other": ("picky", "not this one")}
    assert type(model.other) is Inner and type(model.inner) is not Inner
    assert type(model.inner).__name__ == "Inner"  # the class keeps its name for logs and further rewrites
    x = torch.randn(3, 4)
    assert torch.equal(model.inner(x), 2 * model.inner.proj(x))
    assert apply_rewrites(model, [declining], CPU) == {}  # a rewritten module is not offered again
    undo_rewrites(model)
    assert type(model.inner) is Inner and torch.equal(model.inner(x), model.inner.proj(x))


def test_a_raising_rewrite_is_reported_and_the_others_still_run():
    class Raises(BlockRewrite):
        name, block_class = "raises", "Inner"

        def rewrite(self, module, platform):
            raise RuntimeError("broken rewrite")

    model, raising, fallback = Outer(), Raises(), Recording("fallback", "Inner")
    errors = []
    done = apply_rewrites(model, [raising, fallback], CPU, on_error=lambda r, e: errors.append((r.name, str(e))))
    assert done == {"inner": "fallback", "other": "fallback"}
    assert errors == [("raises", "broken rewrite")] * 2
    with pytest.raises(RuntimeError, match="broken rewrite"):
        apply_rewrites(Outer(), [raising], CPU)


def test_assert_rewrites_exact_catches_a_forward_that_changes_the_numbers():
    model, x = Outer(), {"x": torch.randn(2, 4)}

    def run(m, inputs):
        return m(**inputs)

    class SameNumbers:
        def forward(self, x):
            return super().forward(x) * 1

    assert assert_rewrites_exact(model, x, [Recording("same", "Inner", mixin=SameNumbers)], CPU, run=run) == \
        {"inner": "same", "other": "same"}
    undo_rewrites(model)
    with pytest.raises(AssertionError, match="change 100.00% of the output values"):
        assert_rewrites_exact(model, x, [Recording("doubled", "Inner", mixin=Doubled)], CPU, run=run)


class Attention(nn.Module):
    def __init__(self, layers):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)


def test_fuse_linears_is_exact_and_all_or_nothing():
    g = torch.Generator().manual_seed(0)
    weights = {p: torch.randn(16, 32, generator=g) for p in ("to_q", "to_k", "to_v")}
    layers = {p: fp8_linear(Fp8ReferenceMethod, w, dtype=torch.float32, name=f"blocks.0.attn.{p}")
              for p, w in weights.items()}
    attn = Attention(dict(layers))
    x = torch.randn(5, 32, generator=g)
    expected = torch.cat([layers[p](x) for p in ("to_q", "to_k", "to_v")], dim=-1)
    assert fuse_linears(attn, [("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q", "add_k"))])
    assert not hasattr(attn, "to_q") and attn.to_qkv.method.layer.name == "blocks.0.attn.to_qkv"
    # The same dot products per output channel; only fp32 summation order may differ.
    torch.testing.assert_close(attn.to_qkv(x), expected, rtol=1e-6, atol=1e-6)

    mixed = Attention({"to_q": layers["to_q"], "to_k": nn.Linear(32, 16), "to_v": layers["to_v"]})
    assert not fuse_linears(mixed, [("to_qkv", ("to_q", "to_k", "to_v"))])
    assert hasattr(mixed, "to_q") and not hasattr(mixed, "to_qkv")  # nothing changed
