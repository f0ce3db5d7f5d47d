"""Context parallelism on diffusers' own engine, and the process group it runs in.

Every process holds the whole transformer (linears stay whole, so every linear method works);
diffusers' ``_cp_plan`` hooks split the sequence across ``ulysses x ring`` processes before the
blocks and gather it after ``proj_out``, and its templated attention exchanges heads (Ulysses,
``all_to_all_single``) or key/value slices (Ring, ``all_gather``). The device mesh is
``(cfg, ring, ulysses)``: each CFG branch has its own context-parallel group.
"""

from __future__ import annotations

import inspect as pyinspect
import logging
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .config import RING_BACKENDS, ParallelConfig, ParallelError, check_sequence

log = logging.getLogger("diffgen")
MESH_DIMS = ("cfg", "ring", "ulysses")


@dataclass
class Group:
    """This process's place in the run: its rank, the device mesh and the resolved degrees."""

    parallel: ParallelConfig
    rank: int
    local_rank: int
    mesh: object  # torch.distributed.device_mesh.DeviceMesh of MESH_DIMS

    def tp_rank(self) -> tuple[int, int] | None:
        """(this process's rank in its tensor-parallel group, tp_size), or None without TP."""
        size = self.parallel.tp_size
        return None if size == 1 else (self.mesh["tp"].get_local_rank(), size)

    @property
    def cfg_branch(self) -> int:
        """0: this process computes the conditional branch; 1: the unconditional one."""
        return self.mesh["cfg"].get_local_rank() if self.parallel.cfg_parallel_size > 1 else 0


def launched() -> bool:
    """Whether this process is one of several started by torchrun or ``diffgen --num-gpus``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def rank_device(device: str | None) -> str | None:
    """Each process drives the GPU of its local rank; a CPU run stays on the CPU."""
    if not launched():
        return device
    if device is None and not torch.cuda.is_available():
        return None
    if device is None or device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def join(parallel: ParallelConfig, device_kind: str) -> Group:
    """Join (or create) the default process group: NCCL on CUDA, gloo on the CPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    r = parallel.resolved()
    if not launched():
        raise ParallelError(f"--num-gpus {r.num_gpus} needs {r.num_gpus} processes: run `diffgen generate --num-gpus "
                            f"{r.num_gpus} ...` (which starts them) or `torchrun --nproc-per-node {r.num_gpus} -m "
                            "diffgen generate ...`")
    world = int(os.environ["WORLD_SIZE"])
    if world != r.num_gpus:
        raise ParallelError(f"--num-gpus {r.num_gpus}, but this run has {world} processes (WORLD_SIZE)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    mesh_device = "cuda" if device_kind == "cuda" else "cpu"
    if r.tp_size > 1:  # tensor parallelism does not combine with ring / ulysses (ParallelConfig refuses)
        mesh = init_device_mesh(mesh_device, (r.cfg_parallel_size, r.tp_size), mesh_dim_names=("cfg", "tp"))
    else:
        mesh = init_device_mesh(mesh_device, (r.cfg_parallel_size, r.ring_degree, r.ulysses_degree),
                                mesh_dim_names=MESH_DIMS)
    return Group(r, dist.get_rank(), local_rank, mesh)


def enable_context_parallel(model: nn.Module, group: Group) -> None:
    """Split ``model``'s sequence over the group's ring x ulysses processes (diffusers' mechanism)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    r = group.parallel
    if r.sp_degree == 1:
        return
    if r.ring_degree > 1:
        backend = attention_backend(model)
        on_gpu = next(model.parameters()).device.type == "cuda"
        if backend == "native" and on_gpu:
            # Ring merges partial attention by its log-sum-exp, which diffusers' default SDPA backend
            # does not return; cuDNN attention (through PyTorch) does, on every CUDA GPU diffgen runs.
            log.info("--ring-degree %d: attention of %s runs on diffusers' _native_cudnn backend",
                     r.ring_degree, type(model).__name__)
            model.set_attention_backend("_native_cudnn")
        elif backend not in RING_BACKENDS:
            raise ParallelError(f"--ring-degree {r.ring_degree} needs an attention backend that returns the "
                                f"log-sum-exp Ring attention merges with (diffusers' {', '.join(RING_BACKENDS)}; all "
                                f"need a CUDA GPU); {type(model).__name__} uses {backend!r}"
                                f"{' on the CPU' if not on_gpu else ''}: use --ulysses-degree instead")
    _check_splits(model, r)
    # diffusers 0.42 logs a warning per call for an input whose rank its plan does not split (Wan's
    # 1-D timestep) and calls a functional collective that torch deprecates: neither asks the user anything.
    logging.getLogger("diffusers.hooks.context_parallel").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)
    config = ContextParallelConfig(ring_degree=r.ring_degree, ulysses_degree=r.ulysses_degree,
                                   mesh=group.mesh)
    if torch.accelerator.device_count() > 0:
        # diffusers warns at every call that the API is experimental; diffgen pins the version it runs
        quiet = logging.getLogger("diffusers.models.modeling_utils")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            model.enable_parallelism(config=config)
        finally:
            quiet.setLevel(level)
    else:
        _enable_on_cpu(model, config, group)


def attention_backend(model: nn.Module) -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend
            if backend is not None:
                return str(getattr(backend, "value", backend))
            break
    return _AttentionBackendRegistry.get_active_backend()[0].value


def _enable_on_cpu(model: nn.Module, config, group: Group) -> None:
    """What ``ModelMixin.enable_parallelism`` does, without its device lookup: diffusers 0.42
    computes ``rank % torch.accelerator.device_count()``, a ZeroDivisionError where torch sees no
    accelerator. The same config object, processors and ``_cp_plan`` hooks as on a GPU."""
    import torch.distributed as dist
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig as DiffusersParallelConfig

    if getattr(model, "_parallel_config", None) is not None:
        raise ParallelError(f"context parallelism is already enabled on this {type(model).__name__}")
    parallel = DiffusersParallelConfig(context_parallel_config=config)
    parallel.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=group.mesh)
    model._parallel_config = parallel
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = parallel
    apply_context_parallel(model, config, model._cp_plan)


def _check_splits(model: nn.Module, parallel: ParallelConfig) -> None:
    """Before each forward, check that every tensor the ``_cp_plan`` splits divides by the
    sequence degree, so a bad size is refused with the reason on every rank alike (all ranks see
    the same inputs), not as a shape error inside a collective. Outputs the plan splits (rotary
    tables) span the same sequence as a checked input."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    model_name = type(model).__name__
    for module_name, entries in model._cp_plan.items():
        if not isinstance(entries, dict):
            continue
        module = model.get_submodule(module_name) if module_name else model
        inputs = {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, ContextParallelInput)}
        where = f"{model_name}.{module_name}" if module_name else model_name

        def check(name, tensor, split, where=where):
            if isinstance(tensor, torch.Tensor) and split.split_dim < tensor.ndim and (
                    split.expected_dims is None or tensor.ndim == split.expected_dims):
                check_sequence(parallel, tensor.shape[split.split_dim], f"{where} {name} (dim {split.split_dim})")

        if inputs:
            names = list(pyinspect.signature(module.forward).parameters)

            def pre_hook(module, args, kwargs, inputs=inputs, check=check, names=names):
                given = {**dict(zip(names, args)), **kwargs}
                for name, split in inputs.items():
                    check(name, given.get(name), split)
            module.register_forward_pre_hook(pre_hook, with_kwargs=True)
