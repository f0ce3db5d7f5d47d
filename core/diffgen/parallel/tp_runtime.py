"""Tensor parallelism at run time: split a transformer's planned linears over the ``tp`` ranks.

A tensor-parallel load reads only this rank's part of each linear (``tp_load``); a model loaded
whole is cut here instead. Either way ``enable_tensor_parallel`` leaves this rank's part of each
linear the model's plan names (``tensor.tp_plan``):

- column-parallel (Q, K, V and the added Q, K, V; the first MLP projection; FLUX.1's single-block
  ``proj_mlp``): the rank keeps rows ``[r N/tp, (r+1) N/tp)`` of the weight, of the bias and of
  each scale the linear method says follows the rows (``LinearMethod.tp_shards``); its output is
  this rank's heads / this rank's slice of the MLP hidden features;
- row-parallel (attention output, second MLP projection): the rank keeps the matching input
  columns; its output is a partial sum, all-reduced over the ``tp`` group by a forward hook, and
  the bias is added once, after the reduction. FLUX.1's single-block ``proj_out`` reads
  ``cat([attention, MLP])``, so its input columns are two runs (diffusers' PackedRowwiseParallel):
  the rank's columns of the attention part, then those of the MLP part.

Attention modules keep ``heads // tp`` heads (diffusers' FLUX.1 attention processor reshapes by
``head_dim``, Wan's by ``heads``: both follow). A query / key norm over all heads (Wan's
``rms_norm_across_heads``) becomes ``tp_norm.HeadSplitRMSNorm``: the rank's slice of its weight,
the mean square all-reduced. The modulation and norm linears, the
embedders and the final projection stay whole on every rank. Quantized methods slice what they
declare; a method that declares nothing refuses with its name (``ShardError``).

Runs after the plugins' rewrites would have fused Q/K/V; a tensor-parallel load skips them
(``load_pipeline`` passes ``rewrites=False``).
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatch

import torch
from torch import nn

from ..linear import QuantLinear, ShardError, TensorShard
from .tensor import layer_shards, shard_slices, style_of, tp_plan
from .tp_norm import HeadSplitRMSNorm, across_heads_norms


def enable_tensor_parallel(model: nn.Module, group) -> None:
    """Shard ``model`` over the group's ``tp`` mesh dimension (a no-op when tp_size is 1)."""
    size = group.parallel.tp_size
    if size == 1:
        return
    mesh = group.mesh["tp"]
    shard_model(model, mesh.get_local_rank(), size, mesh.get_group())


def shard_model(model: nn.Module, rank: int, size: int, process_group) -> list[str]:
    """Keep rank ``rank``'s part of every planned linear of ``model``; returns the split names.
    Every refusal (a method that cannot split, a dimension that does not divide) is raised before
    any layer is changed, so a refused model stays whole."""
    plan = tp_plan(model)
    raw = getattr(type(model), "_tp_plan", None) or {}
    presplit = getattr(model, "diffgen_tp_split", None)
    if presplit is not None and presplit != (rank, size):
        raise ShardError(f"the model was loaded as tensor-parallel rank {presplit[0]} of {presplit[1]}, "
                         f"not rank {rank} of {size}")
    todo = []
    for name, module in model.named_modules():
        style = style_of(plan, name)
        if style is None or not isinstance(module, (nn.Linear, QuantLinear)):
            continue
        if presplit:  # the loader read this rank's slices (tp_load): nothing left to cut
            todo.append((name, module, style, None))
            continue
        shards = layer_shards(module, name, style, size)
        runs = packed_runs(model, name, module, raw) if style == "rowwise" else None
        new = {key: rank_part(tensor, shards.get(key), rank, size, f"{name}.{key}", runs)
               for key, tensor in own_tensors(module)}
        todo.append((name, module, style, new))
    attention = [m for m in model.modules() if hasattr(m, "heads") and hasattr(m, "to_q")]
    for m in attention:
        if m.heads % size:
            raise ShardError(f"--tp-size {size} does not divide the {m.heads} attention heads of "
                             f"{type(model).__name__}; each rank computes whole heads")
    norms = across_heads_norms(attention, size)
    for name, module, style, new in todo:
        if new is not None:
            replace_tensors(module, new)
        if style == "rowwise":
            _reduce_after(module, process_group)
    for m, attr, norm in norms:
        setattr(m, attr, HeadSplitRMSNorm(norm, rank, size, process_group))
    for m in attention:
        m.heads //= size
        for attr in ("inner_dim", "kv_inner_dim"):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, getattr(m, attr) // size)
    return [name for name, *_ in todo]


def own_tensors(module: nn.Module):
    yield from module.named_parameters(recurse=False)
    yield from module.named_buffers(recurse=False)


def rank_part(t: torch.Tensor | None, shard: TensorShard | None, rank: int, size: int, where: str,
              runs: list[int] | None) -> torch.Tensor | None:
    """Rank ``rank``'s slice of ``t``; along a packed axis, its slice of each run, concatenated."""
    if t is None or shard is None or not t.shape:
        return t
    if runs is None or shard.axis != t.ndim - 1:
        return t[shard_slices(tuple(t.shape), shard, rank, size, where)].clone().contiguous()
    length, total = t.shape[shard.axis], sum(runs)
    if any(length * r % total for r in runs):
        raise ShardError(f"{where}: dim {shard.axis} of size {length} does not split into runs {runs}")
    parts, start = [], 0
    for r in runs:
        piece = t.narrow(shard.axis, start, length * r // total)
        parts.append(piece[shard_slices(tuple(piece.shape), shard, rank, size, where)])
        start += piece.shape[shard.axis]
    return torch.cat(parts, dim=shard.axis).contiguous()


def packed_runs(model: nn.Module, name: str, module: nn.Module, raw: dict) -> list[int] | None:
    """The input-column runs of a packed row-parallel linear (proportions), or None for a plain one.
    diffusers stores them on the nn.Linear; a QuantLinear that replaced it is asked of its block."""
    style = next((s for pattern, s in raw.items() if fnmatch(name, pattern)), None)
    if style is None or isinstance(style, str):
        return None
    blocks = getattr(style, "blocks", None) or getattr(module, "_tp_packed_row_blocks", None)
    if blocks:
        return list(blocks)
    parent = model.get_submodule(name.rpartition(".")[0])
    attn, mlp = getattr(parent, "attn", None), getattr(parent, "mlp_hidden_dim", None)
    if attn is not None and mlp is not None and attn.inner_dim + mlp == module.in_features:
        return [attn.inner_dim, mlp]
    raise ShardError(f"{name}: a packed row-parallel linear whose input runs diffgen cannot tell")


def replace_tensors(module: nn.Module, new: dict[str, torch.Tensor | None]) -> None:
    """Swap in the slices; N and K shrink as the weight's rows and columns did (a packed 4-bit
    weight holds K/2 columns: the proportion is what carries over)."""
    rows, cols = module.weight.shape
    for key, tensor in new.items():
        if key in module._parameters:
            setattr(module, key, None if tensor is None else nn.Parameter(tensor, requires_grad=False))
        else:
            setattr(module, key, tensor)
    module.out_features = module.out_features * module.weight.shape[0] // rows
    module.in_features = module.in_features * module.weight.shape[1] // cols
    if isinstance(module, QuantLinear):
        module.method.layer = dataclasses.replace(module.method.layer, in_features=module.in_features,
                                                  out_features=module.out_features)


def _reduce_after(module: nn.Module, process_group) -> None:
    """All-reduce the partial sums of a row-parallel linear, then add its bias (once)."""
    import torch.distributed as dist

    bias = module.bias
    module.bias = None
    module.register_buffer("tp_bias", None if bias is None else bias.data, persistent=False)

    def reduce(mod, args, out):
        dist.all_reduce(out, group=process_group)
        return out if mod.tp_bias is None else out + mod.tp_bias.to(out.dtype)

    module.register_forward_hook(reduce)
