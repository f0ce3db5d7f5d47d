"""One guided denoising step on 1 GPU against 2 GPUs: Ulysses, Ring and CFG parallel, FP8.

Run on a machine with two GPUs (H100/H200), one process per GPU:
  torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --family wan --out wan.json
  torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --family flux1 --out flux1.json
A step is what a pipeline with classifier-free guidance runs: the transformer on the conditional
and on the unconditional input, then ``uncond + scale * (cond - uncond)``.

Workloads (real widths, random bf16 weights built on each GPU from the same seed, a stated subset
of the blocks; a full model's step is about the subset's times the block ratio):
  flux1  FLUX.1-dev: 2 of 19 double + 4 of 38 single blocks, hidden 3072 (24 heads x 128),
         1024x1024 (4,096 image tokens) + 512 text tokens, true CFG (two calls per step).
  wan    Wan2.2 A14B (one expert): 2 of 40 blocks, hidden 5120 (40 heads x 128), FFN 13824,
         1280x720 and 81 frames (75,600 tokens) + 512 text tokens, CFG (two calls per step).
FP8: every linear but diffgen's DEFAULT_ONLINE_IGNORES, per-channel weights and per-token
activations (diffgen-cuda's ``Fp8TritonMethod``, what ``--quantization fp8`` runs on Hopper).

Modes: ``1gpu`` (rank 0 alone, no parallelism; the others wait), ``ulysses2``, ``ring2`` (diffusers'
_native_cudnn attention, which returns the log-sum-exp Ring needs; ``1gpu_cudnn`` is the 1-GPU
step on that backend, for a like-for-like Ring speedup) and ``cfg2``, each through
``diffgen.parallel`` exactly as ``diffgen generate --num-gpus 2`` applies it. Every mode's
guided output is compared with the 1-GPU output on rank 0 (cosine, max |diff|): the split changes
only the summation order of the bf16 GEMMs and the attention merge, so expect cosine > 0.999.

Prints JSON on rank 0 (and writes it with --out). The issue's target: >= 1.7x on two GPUs for Wan.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda"), str(ROOT / "benchmarks")]

from diffgen.parallel import ParallelConfig, join  # noqa: E402
from diffgen.parallel.cfg import enable_cfg_parallel  # noqa: E402
from diffgen.parallel.context import enable_context_parallel  # noqa: E402

GUIDANCE = 5.0
MODES = {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2), "cfg2": dict(cfg_parallel_size=2)}


def _flux1(tiny: bool):
    from fp8_step import DEV, inputs

    from diffusers import FluxTransformer2DModel

    config = dict(DEV, num_layers=2, num_single_layers=4)
    if tiny:
        config.update(num_layers=1, num_single_layers=1, num_attention_heads=2, joint_attention_dim=256,
                      pooled_projection_dim=128)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(**config).to(torch.bfloat16).eval().requires_grad_(False)
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.02)
    cond = inputs(model, tiny)
    g = torch.Generator("cuda").manual_seed(2)
    uncond = dict(cond, encoder_hidden_states=torch.randn(cond["encoder_hidden_states"].shape, device="cuda",
                                                          generator=g, dtype=torch.bfloat16),
                  pooled_projections=torch.randn(cond["pooled_projections"].shape, device="cuda", generator=g,
                                                 dtype=torch.bfloat16))
    return model, cond, uncond, {"blocks": "2 of 19 double + 4 of 38 single", "image_tokens": 64 if tiny else 4096}


def _wan(tiny: bool):
    import diffusers
    from family_step import FAMILIES

    spec = FAMILIES["wan"]
    config = dict(spec["config"], **(spec["tiny"] if tiny else {}))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(diffusers, spec["cls"])(**config).to(torch.bfloat16).eval().requires_grad_(False)
    g = torch.Generator("cuda").manual_seed(1)
    cond, tokens, _ = spec["inputs"](config, spec["tiny_size"] if tiny else spec["size"], g)
    uncond = dict(cond, encoder_hidden_states=torch.randn(cond["encoder_hidden_states"].shape, device="cuda",
                                                          generator=g, dtype=torch.bfloat16))
    return model, cond, uncond, {"blocks": "2 of 40", "image_tokens": tokens}


FAMILIES = {"flux1": _flux1, "wan": _wan}


def build(family: str, tiny: bool):
    """The model with FP8 linears (the same weights on every rank and in every mode)."""
    from fp8_step import calibrate, make_fp8, quantized_linears, swap

    from diffgen_cuda.fused import Fp8TritonMethod

    model, cond, uncond, info = FAMILIES[family](tiny)
    linears = quantized_linears(model)
    amax, _ = calibrate(model, linears, cond)
    swap(model, make_fp8(linears, Fp8TritonMethod, False, amax))
    return model, cond, uncond, info


def guided_step(model, cond, uncond):
    with torch.no_grad():
        c = model(**cond)[0]
        u = model(**uncond)[0]
        return (u + GUIDANCE * (c - u)).float()


def time_steps(model, cond, uncond, iters: int, group=None) -> list[float]:
    for _ in range(3):
        guided_step(model, cond, uncond)
    times = []
    for _ in range(iters):
        if group is not None:
            dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        guided_step(model, cond, uncond)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=sorted(FAMILIES), default="wan")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=sorted(MODES))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--out")
    args = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) != 2:
        sys.exit("run with two processes: torchrun --nproc-per-node 2 benchmarks/multi_gpu.py ...")
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank = dist.get_rank()
    torch.backends.cuda.matmul.allow_tf32 = False

    results = {"family": args.family, "gpu": torch.cuda.get_device_name(), "gpus": 2, "torch": torch.__version__,
               "guidance": GUIDANCE, "tiny": args.tiny, "iters": args.iters, "step_ms": {}, "speedup": {},
               "vs_1gpu": {}}
    reference = None
    for backend in ("native", "_native_cudnn"):
        label = "1gpu" if backend == "native" else "1gpu_cudnn"
        if backend == "_native_cudnn" and "ring2" not in args.modes:
            continue
        if rank == 0:  # the 1-GPU baseline: rank 0 alone, no parallelism
            model, cond, uncond, info = build(args.family, args.tiny)
            results.update(info)
            if backend != "native":
                model.set_attention_backend(backend)
            results["step_ms"][label] = statistics.median(time_steps(model, cond, uncond, args.iters))
            out = guided_step(model, cond, uncond)
            if reference is None:
                reference = out
            else:
                results["vs_1gpu"][label] = agreement(out, reference)
            del model
            torch.cuda.empty_cache()
        dist.barrier()
    for mode in args.modes:
        group = join(ParallelConfig(num_gpus=2, **MODES[mode]), "cuda")
        model, cond, uncond, _ = build(args.family, args.tiny)
        enable_context_parallel(model, group)  # Ring switches attention to _native_cudnn
        enable_cfg_parallel(model, group)
        results["step_ms"][mode] = statistics.median(time_steps(model, cond, uncond, args.iters, group))
        out = guided_step(model, cond, uncond)
        if rank == 0:
            base = results["step_ms"]["1gpu_cudnn" if mode == "ring2" else "1gpu"]
            results["speedup"][mode] = base / results["step_ms"][mode]
            results["vs_1gpu"][mode] = agreement(out, reference)
        del model
        torch.cuda.empty_cache()
        dist.barrier()
    if rank == 0:
        text = json.dumps(results, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    dist.destroy_process_group()


def agreement(out: torch.Tensor, reference: torch.Tensor) -> dict:
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0).item()
    return {"cosine": cosine, "max_abs_diff": (out - reference).abs().max().item(),
            "reference_max_abs": reference.abs().max().item()}


if __name__ == "__main__":
    main()
