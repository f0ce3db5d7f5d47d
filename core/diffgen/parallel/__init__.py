"""Several processes on one pipeline: SGLang-Diffusion's flags on diffusers' and PyTorch's engine.

- ``config``: ``ParallelConfig`` (``--num-gpus``, ``--sp-degree``, ``--ulysses-degree``,
  ``--ring-degree``, ``--cfg-parallel-size``, ``--tp-size``), every check in one place.
- ``context``: the process group and device mesh ``(cfg, ring, ulysses)``; context parallelism
  through diffusers' ``_cp_plan`` hooks and templated Ulysses / Ring attention.
- ``cfg``: CFG parallelism, one mesh slice per guidance branch.
- ``launch``: ``diffgen ... --num-gpus N`` starts its own workers with torch's elastic launcher.
- ``tensor`` / ``tp_load`` / ``tp_runtime``: tensor parallelism (``--tp-size``, FLUX.1 and Wan): the plan,
  each method's split of its weights and scales, the per-rank read of the checkpoint, and the
  all-reduces of the split model.

Context and CFG parallelism load the whole pipeline on every process and keep linears whole, so
every linear method works; tensor parallelism reads each rank's slices of the planned linears
(methods that cannot split refuse before any weight is read).
"""

from __future__ import annotations

from .cfg import check_guidance, enable_cfg_parallel, guard_pipeline_call
from .config import ParallelConfig, ParallelError, check_model, check_sequence
from .context import Group, enable_context_parallel, join, launched, rank, rank_device

__all__ = ["ParallelConfig", "ParallelError", "Group", "check_guidance", "check_model", "check_sequence",
           "join", "launched", "parallel_config", "rank", "rank_device", "parallelize"]


def parallel_config(args) -> ParallelConfig:
    """The ParallelConfig of parsed command-line flags (``diffgen.cli.common.add_parallel_flags``)."""
    return ParallelConfig(num_gpus=args.num_gpus, sp_degree=args.sp_degree, ulysses_degree=args.ulysses_degree,
                          ring_degree=args.ring_degree, cfg_parallel_size=args.cfg_parallel_size,
                          tp_size=args.tp_size)


def parallelize(pipe, group: Group, models: list) -> None:
    """Tensor, context and CFG parallelism on ``models``, the transformer components of ``pipe``."""
    from .tp_runtime import enable_tensor_parallel

    for model in models:
        enable_tensor_parallel(model, group)
        enable_context_parallel(model, group)
        enable_cfg_parallel(model, group)
    if group.parallel.cfg_parallel_size > 1:
        guard_pipeline_call(pipe, models)
    pipe._diffgen_parallel = group
