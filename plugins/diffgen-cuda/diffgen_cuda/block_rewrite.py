"""When a family's rewritten block forward takes over a transformer block: the rule every family
module (``flux1``, ``flux2``, ``qwen_image``, ``hunyuan_video``) shares.

A block is rewritten when its parts are what the family's forward expects, and the linears that read
one input can share one prepared input (``LinearMethod.shares_prepared_input``: e.g. the same static
scale). Most families also ask that some linear take a prepared input at all: in 16-bit or on the
reference method their forward would gain nothing over diffusers'.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from diffgen.linear import prepared_input_method
from diffgen.rewrites import BlockRewrite


def shares(layers) -> bool:
    """Whether one prepared input serves every layer of the group that takes one."""
    taking = [layer for layer in layers if prepared_input_method(layer) is not None]
    return all(taking[0].method.shares_prepared_input(taking[0], other) for other in taking[1:])


def producer_reason(groups, *, need_prepared_input: bool = True) -> str | None:
    """Why a block whose linears read their inputs in ``groups`` is left alone, or None."""
    if need_prepared_input and not any(prepared_input_method(layer) is not None for group in groups for layer in group):
        return "no linear of it takes a prepared input (16-bit, or methods without fused producers)"
    if not all(shares(group) for group in groups):
        return "two linears reading one input need differently prepared inputs (e.g. two static scales)"
    return None


class PreparedInputBlockRewrite(BlockRewrite):
    """A block whose parts are as ``expected`` gets the family's forward (``forward_mixin``) unless
    ``producer_reason`` says otherwise for its ``producer_groups`` (the linears each prepared input
    feeds); ``attach`` then gives the block what its forward uses (kernels) or fuses its parts."""

    mismatch: ClassVar[str] = "its parts are not what this rewrite knows"  # the reason when not ``expected``
    need_prepared_input: ClassVar[bool] = True

    def expected(self, block) -> bool:
        raise NotImplementedError

    def producer_groups(self, block) -> list[list[nn.Module]]:
        raise NotImplementedError

    def attach(self, block, platform) -> None:
        """Prepare an accepted block (nothing by default)."""

    def rewrite(self, block, platform):
        if not self.expected(block):
            return self.mismatch
        reason = producer_reason(self.producer_groups(block), need_prepared_input=self.need_prepared_input)
        if reason is None:
            self.attach(block, platform)
        return reason
