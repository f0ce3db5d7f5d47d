"""Query / key norms over all heads, under tensor parallelism.

Wan's attention normalizes the whole projected query and key, all heads at once
(``qk_norm="rms_norm_across_heads"``: ``torch.nn.RMSNorm(heads * head_dim)`` as ``norm_q``,
``norm_k`` and, with an image branch, ``norm_added_k``), before splitting them into heads:

  y = x / sqrt(mean_j x_j^2 + eps) * weight,   j over all heads * head_dim features.

A tensor-parallel rank holds only its heads' features of x (a column-parallel slice), so it sums
the squares of its slice, all-reduces the sum over the ``tp`` group, divides by the whole width,
and multiplies by its slice of ``weight``. FLUX.1's norms act on one head at a time
(``RMSNorm(head_dim)``) and need nothing. The sum is taken in float32; one process's
``F.rms_norm`` sums in its own order, so the two differ by float32 rounding only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..linear import ShardError

NORM_NAMES = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


class HeadSplitRMSNorm(nn.Module):
    """This rank's slice of an RMSNorm over ``width`` features, its mean square all-reduced."""

    def __init__(self, norm: nn.RMSNorm, rank: int, size: int, process_group):
        super().__init__()
        self.width = norm.normalized_shape[-1]
        part = self.width // size
        self.eps = norm.eps
        self.process_group = process_group
        weight = None if norm.weight is None else norm.weight.data[rank * part:(rank + 1) * part].clone()
        self.weight = None if weight is None else nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        xf = x.float()
        squares = xf.square().sum(dim=-1, keepdim=True)
        dist.all_reduce(squares, group=self.process_group)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        y = xf * torch.rsqrt(squares / self.width + eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0] if self.weight is not None else '?'} of {self.width}, eps={self.eps}"


def across_heads_norms(attention: list[nn.Module], size: int) -> list[tuple[nn.Module, str, nn.Module]]:
    """(attention module, attribute, norm) of every query / key norm that spans all heads; raises
    ShardError for one diffgen cannot split (not an RMSNorm over the last dim, or a width that
    does not divide). Called before anything is changed."""
    found = []
    for m in attention:
        width = getattr(m, "inner_dim", None)
        for attr in NORM_NAMES:
            norm = getattr(m, attr, None)
            if norm is None or width is None or m.heads == 1:
                continue
            shape = getattr(norm, "normalized_shape", None) or (getattr(norm, "dim", None),)
            if shape[-1] != width:  # one head at a time (FLUX.1): a split leaves it alone
                continue
            if not isinstance(norm, nn.RMSNorm) or len(norm.normalized_shape) != 1:
                raise ShardError(f"{type(m).__name__}.{attr} ({type(norm).__name__}) normalizes all heads together; "
                                 "diffgen splits such a norm only when it is a torch.nn.RMSNorm over the last dim")
            if width % size:
                raise ShardError(f"{type(m).__name__}.{attr} spans {width} features, which do not split into {size}")
            found.append((m, attr, norm))
    return found
