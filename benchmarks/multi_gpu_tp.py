"""One guided FLUX.1 denoising step on 1 GPU against tensor parallel 2 (``--tp-size 2``), FP8.

Run on a machine with two GPUs, one process per GPU:
  torchrun --nproc-per-node 2 benchmarks/multi_gpu_tp.py --out flux1_tp.json
  torchrun --nproc-per-node 2 benchmarks/multi_gpu_tp.py --tiny          # smoke test, seconds

The workload, weights and FP8 method are benchmarks/multi_gpu.py's FLUX.1 case (2 of 19 double + 4
of 38 single blocks at 1024x1024, diffgen-cuda's Fp8TritonMethod, per-channel weights, per-token
activations); ``tp2`` splits it with ``diffgen.parallel.tp_runtime`` as ``diffgen generate
--num-gpus 2 --tp-size 2`` does (after the load, no block rewrites). The guided output is compared
with the 1-GPU output on rank 0: a row-parallel FP8 layer quantizes each rank's half of a token
with its own scale, so expect FP8-level agreement (cosine > 0.999), not bitwise.

Prints JSON on rank 0 (and writes it with --out): step_ms for 1gpu and tp2, the speedup, and the
agreement.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from multi_gpu import agreement, build, guided_step, time_steps  # noqa: E402

from diffgen.parallel import ParallelConfig, join  # noqa: E402
from diffgen.parallel.tp_runtime import enable_tensor_parallel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--out")
    args = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) != 2:
        sys.exit("run with two processes: torchrun --nproc-per-node 2 benchmarks/multi_gpu_tp.py ...")
    group = join(ParallelConfig(num_gpus=2, tp_size=2), "cuda")
    rank = dist.get_rank()
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"family": "flux1", "gpu": torch.cuda.get_device_name(), "gpus": 2, "torch": torch.__version__,
               "tiny": args.tiny, "iters": args.iters, "step_ms": {}}
    reference = None
    if rank == 0:  # the 1-GPU baseline: rank 0 alone
        model, cond, uncond, info = build("flux1", args.tiny)
        results.update(info)
        results["step_ms"]["1gpu"] = statistics.median(time_steps(model, cond, uncond, args.iters))
        reference = guided_step(model, cond, uncond)
        del model
        torch.cuda.empty_cache()
    dist.barrier()
    model, cond, uncond, _ = build("flux1", args.tiny)
    enable_tensor_parallel(model, group)
    results["per_rank_weight_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    results["step_ms"]["tp2"] = statistics.median(time_steps(model, cond, uncond, args.iters, group))
    out = guided_step(model, cond, uncond)
    if rank == 0:
        results["speedup"] = results["step_ms"]["1gpu"] / results["step_ms"]["tp2"]
        results["vs_1gpu"] = agreement(out, reference)
        text = json.dumps(results, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
