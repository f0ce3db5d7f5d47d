"""CFG parallelism: the conditional and the unconditional branch of each step on different processes.

diffusers 0.42 has no CFG parallel of its own (its ``_modeling_parallel`` lists it as to do), so
diffgen wraps the transformer's forward. The pipelines of FLUX.1 (true CFG) and Wan call the
transformer twice per step, conditional first, and read the first result only after the second
call returns. So on the first call of a pair the branch-0 processes compute the conditional output
while the branch-1 processes hand back an empty tensor; on the second call branch 1 computes the
unconditional output, the two are all-gathered over the ``cfg`` mesh dimension, and branch 1 fills
the tensor it handed back in place. Every process then holds both branches, bit-identical.
"""

from __future__ import annotations

import functools
import inspect as pyinspect

import torch
from torch import nn

from .config import ParallelError
from .context import Group


def check_guidance(pipe, kwargs: dict) -> None:
    """CFG parallel needs a pipeline that runs a negative branch at every step."""
    name = type(pipe).__name__
    params = pyinspect.signature(type(pipe).__call__).parameters

    def value(key):
        return kwargs.get(key, params[key].default if key in params else None)

    if "true_cfg_scale" in params:  # FLUX.1, Qwen-Image: true CFG needs a negative prompt and a scale > 1
        scale = value("true_cfg_scale")
        if not (kwargs.get("negative_prompt") or kwargs.get("negative_prompt_embeds") is not None) or not scale \
                or scale <= 1:
            raise ParallelError(f"--cfg-parallel-size 2: {name} runs a negative branch only with a negative prompt "
                                f"and true_cfg_scale > 1 (got true_cfg_scale={scale!r}, negative prompt "
                                f"{'given' if kwargs.get('negative_prompt') else 'missing'})")
        return
    if "guidance_scale" in params and "negative_prompt" in params:  # Wan: CFG when guidance_scale > 1
        scales = {k: value(k) for k in ("guidance_scale", "guidance_scale_2") if k in params}
        scales = {k: v for k, v in scales.items() if v is not None}
        low = {k: v for k, v in scales.items() if v <= 1}
        if low:
            raise ParallelError(f"--cfg-parallel-size 2: {name} runs no negative branch with "
                                f"{', '.join(f'{k}={v}' for k, v in low.items())}; it needs > 1")
        return
    raise ParallelError(f"--cfg-parallel-size 2: {name} has no classifier-free guidance with a negative branch "
                        "that diffgen can split")


def enable_cfg_parallel(model: nn.Module, group: Group) -> None:
    """Wrap ``model.forward`` so each pair of calls (conditional, unconditional) is split."""
    if group.parallel.cfg_parallel_size == 1:
        return
    original = model.forward
    cfg_group = group.mesh["cfg"].get_group()
    branch = group.cfg_branch
    state = {"pending": None}

    def forward(*args, **kwargs):
        import torch.distributed as dist

        if kwargs.get("return_dict", True):
            raise ParallelError(f"--cfg-parallel-size 2: {type(model).__name__} was called with return_dict=True; "
                                "the split needs the pipelines' return_dict=False")
        if state["pending"] is None:  # the conditional call
            if branch == 0:
                out = original(*args, **kwargs)
                state["pending"] = out[0]
                return out
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            state["pending"] = torch.empty(0, dtype=hidden.dtype, device=hidden.device)
            return (state["pending"],)
        pending, state["pending"] = state["pending"], None
        local = pending if branch == 0 else original(*args, **kwargs)[0]
        local = local.contiguous()
        gathered = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(gathered, local, group=cfg_group)
        cond, uncond = gathered
        if branch == 1:
            if cond.dtype != pending.dtype:
                raise ParallelError(f"--cfg-parallel-size 2: {type(model).__name__} returned {cond.dtype}, not the "
                                    f"dtype of its input ({pending.dtype})")
            pending.resize_(cond.shape).copy_(cond)
        return (uncond,)

    model.forward = forward
    model._diffgen_cfg_state = state


def guard_pipeline_call(pipe, models: list[nn.Module]) -> None:
    """Check the guidance at every call of ``pipe`` (whoever calls it: generate, compare, bench,
    a notebook), before any transformer call, and start each call with no half-finished pair.
    The pipeline's class becomes a subclass of the same name whose ``__call__`` keeps the original
    signature (``inspect.signature`` follows ``__wrapped__``), so callers that read it still can."""
    cls = type(pipe)
    call = cls.__call__

    @functools.wraps(call)
    def checked_call(self, *args, **kwargs):
        check_guidance(self, kwargs)
        for model in models:
            model._diffgen_cfg_state["pending"] = None
        return call(self, *args, **kwargs)

    pipe.__class__ = type(cls.__name__, (cls,), {"__call__": checked_call, "__module__": cls.__module__,
                                                 "__qualname__": cls.__qualname__})
