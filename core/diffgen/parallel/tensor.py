"""Tensor parallelism, the part that exists: which linear splits how, and what each rank holds.

A tensor-parallel plan maps linear names (``fnmatch`` patterns) to a style: "colwise" splits the
output features N (Q, K, V, the first MLP projection: each rank owns whole heads), "rowwise" the
input features K (the attention output and second MLP projection: partial sums, all-reduced).
diffusers 0.42 ships such a ``_tp_plan`` for FLUX.1 (and shards with DTensor, which takes only
``nn.Linear``); for Wan it has none, so ``WAN_TP_PLAN`` below is the same split for its blocks.
Each linear method says how its tensors follow (``LinearMethod.tp_shards``) or refuses.

A tensor-parallel load (``--tp-size N``) reads only each rank's slices (``tp_load``, through the
loader), then ``tp_runtime`` adds the row-parallel all-reduces; ``tp_runtime.shard_model`` also
splits a model loaded whole. ``read_shard`` reads one slice of one tensor by itself.
``diffgen inspect --tp-size N`` shows what each rank holds.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from ..linear import QuantLinear, ShardError, TensorShard

WAN_TP_PLAN = {
    **{f"blocks.*.{attn}.{p}": "colwise" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")},
    # Wan 2.1 I2V's image branch of the cross-attention: keys and values per head, as to_k / to_v
    "blocks.*.attn2.add_k_proj": "colwise",
    "blocks.*.attn2.add_v_proj": "colwise",
    "blocks.*.attn1.to_out.0": "rowwise",
    "blocks.*.attn2.to_out.0": "rowwise",
    "blocks.*.ffn.net.0.proj": "colwise",
    "blocks.*.ffn.net.2": "rowwise",
}
PLANS = {"WanTransformer3DModel": WAN_TP_PLAN}


def tp_plan(model: nn.Module) -> dict[str, str]:
    """pattern -> "colwise" / "rowwise" for ``model``'s class (diffusers' own plan first)."""
    plan = getattr(type(model), "_tp_plan", None) or PLANS.get(type(model).__name__)
    if not plan:
        raise ShardError(f"{type(model).__name__} has no tensor-parallel plan (diffusers' _tp_plan or diffgen's); "
                         "use --ulysses-degree, --ring-degree or --cfg-parallel-size")
    # diffusers' PackedRowwiseParallel (FLUX.1's single-block proj_out over cat([attention, MLP])) splits
    # K in two runs, each by rank: per rank the same bytes as a plain row-wise split.
    return {k: v if isinstance(v, str) else "rowwise" for k, v in plan.items()}


def style_of(plan: dict[str, str], name: str) -> str | None:
    return next((style for pattern, style in plan.items() if fnmatch(name, pattern)), None)


def shard_slices(shape: tuple[int, ...], shard: TensorShard | None, rank: int, size: int,
                 where: str) -> tuple[slice, ...]:
    """The index of rank ``rank``'s part of a tensor of ``shape`` (everything when not split)."""
    full = tuple(slice(None) for _ in shape)
    if shard is None or size == 1 or not shape:
        return full
    length = shape[shard.axis]
    part = length // size
    if length % size or part % shard.granule:
        block = f" in whole blocks of {shard.granule}" if shard.granule > 1 else ""
        raise ShardError(f"{where}: dim {shard.axis} of size {length} does not split into {size} equal parts{block}")
    index = list(full)
    index[shard.axis] = slice(rank * part, (rank + 1) * part)
    return tuple(index)


def layer_shards(module: nn.Module, name: str, style: str, size: int) -> dict[str, TensorShard]:
    """The split of each tensor of one planned linear (quantized: its method decides; 16-bit: plain)."""
    if isinstance(module, QuantLinear):
        return module.method.tp_shards(style, size)
    if style == "colwise":
        return {"weight": TensorShard(0), "bias": TensorShard(0)}
    return {"weight": TensorShard(1)}


def read_shard(file, name: str, shard: TensorShard | None, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s part of tensor ``name`` of a safetensors file, reading only that part
    (safetensors maps the file; slicing touches only the bytes of the slice)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        view = f.get_slice(name)
        return view[shard_slices(tuple(view.get_shape()), shard, rank, size, f"{file} tensor {name!r}")]


def per_rank_bytes(model: nn.Module, size: int, expected: dict[str, torch.Tensor]) -> dict:
    """What each of ``size`` tensor-parallel ranks holds of ``model`` (a planned meta model), in
    bytes, and the linears that refuse to split (name -> reason)."""
    plan = tp_plan(model)
    refused: dict[str, str] = {}
    split_bytes = 0
    split_names: set[str] = set()
    for name, module in model.named_modules():
        style = style_of(plan, name)
        if style is None or not isinstance(module, (nn.Linear, QuantLinear)):
            continue
        try:
            shards = layer_shards(module, name, style, size)
            layer_bytes = 0
            for tensor_name, tensor in list(module.named_parameters(recurse=False)):
                shard = shards.get(tensor_name)
                index = shard_slices(tuple(tensor.shape), shard, 0, size, f"{name}.{tensor_name}")
                numel = torch.empty(tensor.shape, device="meta")[index].numel()
                itemsize = expected[f"{name}.{tensor_name}"].element_size() \
                    if f"{name}.{tensor_name}" in expected else tensor.element_size()
                if isinstance(module, QuantLinear) and tensor_name == "weight" and module.method.config.online:
                    itemsize = 1  # online FP8 is planned as a 16-bit weight; it is held quantized
                layer_bytes += numel * itemsize
        except ShardError as exc:
            refused[name] = str(exc)
            continue
        split_bytes += layer_bytes
        split_names.update(f"{name}.{t}" for t, _ in module.named_parameters(recurse=False))
    whole = sum(t.numel() * t.element_size() for n, t in expected.items() if n not in split_names)
    return {"tp_size": size, "per_rank_bytes": whole + split_bytes, "replicated_bytes": whole,
            "split_layers": len({n.rpartition(".")[0] for n in split_names}), "refused": refused}
