"""Per-rank reads under tensor parallelism: one rank's load time, bytes read and peak memory, reading
only its slices (``load_transformer(..., tensor_parallel=(rank, 2))``) against reading the whole
checkpoint and splitting after the load (``tp_runtime.shard_model``, what ``--tp-size`` did before).

The checkpoint is benchmarks/load.py's: a FluxTransformer2DModel at FLUX.1's widths with random
weights, in shards with an index; CPU mode bf16 of ``--size-gb`` GB (double blocks only), CUDA mode
FLUX.1-dev's full config (19 + 38 blocks) with the blocks' linears FP8 (per-tensor scales). Each
(variant, rank) runs in a fresh subprocess, so its peak RSS (VmHWM) is its own; ranks run one after
the other (a real run loads them at once, each on its own GPU). The files are in the page cache
(just written), so both variants read from memory alike. No process group is needed: the load and
the split only cut tensors.

Per run: seconds, bytes copied out of the checkpoint (``model.diffgen_tp_load``; the whole load
reads every byte), the bytes the rank's model holds, peak host RSS, and (CUDA) peak GPU memory.
Prints JSON and writes it with --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import FLUX_DEV, _status_bytes, cpu_config, write_checkpoint  # noqa: E402

SIZE = 2
VARIANTS = ("split", "whole")


def run(variant: str, rank: int, ckpt: Path, device: str) -> dict:
    import torch

    from diffgen.loader import load_transformer
    from diffgen.parallel.tp_runtime import shard_model
    from diffgen.plugins import get_plugin_host

    get_plugin_host()  # plugin discovery before the clock
    if device == "cuda":
        torch.cuda.init()
    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    tp = (rank, SIZE) if variant == "split" else None
    model = load_transformer(ckpt, device=device, dtype=torch.bfloat16, rewrites=False, tensor_parallel=tp)
    shard_model(model, rank, SIZE, None)  # the split (whole), or the all-reduce hooks and heads (split)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    out = {"variant": variant, "rank": rank, "seconds": round(seconds, 3), "held_bytes": held,
           "bytes_read": getattr(model, "diffgen_tp_load", {}).get("bytes_read"),
           "rss_baseline": base, "rss_peak": _status_bytes("VmHWM")}
    if device == "cuda":
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size-gb", type=float, default=2.0, help="CPU mode: checkpoint size in GB (default 2)")
    p.add_argument("--shard-gb", type=float, default=1.0)
    p.add_argument("--dir", default="/tmp/diffgen-tp-load-bench")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # variant rank
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run(args.child[0], int(args.child[1]), Path(args.ckpt), args.device)))
        return
    import torch

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    ckpt = root / "transformer"
    if args.device == "cuda":
        config, fp8 = FLUX_DEV, True
    else:
        config, fp8 = cpu_config(int(args.size_gb * 1e9)), False
    info = write_checkpoint(ckpt, config, fp8=fp8, shard_bytes=int(args.shard_gb * 1e9), device=args.device)
    results = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "torch": torch.__version__, "checkpoint": {**info, "fp8": fp8, "double_blocks": config["num_layers"],
                                                           "single_blocks": config["num_single_layers"]},
               "tp_size": SIZE, "runs": []}
    try:
        for variant in VARIANTS:
            for rank in range(SIZE):
                proc = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", variant, str(rank),
                                       "--ckpt", str(ckpt)], capture_output=True, text=True, check=False)
                if proc.returncode:
                    sys.exit(f"{variant} rank {rank} failed:\n{proc.stderr[-4000:]}")
                results["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    by = {(r["variant"], r["rank"]): r for r in results["runs"]}
    results["summary"] = {
        f"rank{rank}": {
            "same_held_bytes": by["split", rank]["held_bytes"] == by["whole", rank]["held_bytes"],
            "held_fraction": round(by["split", rank]["held_bytes"] / info["bytes"], 3),
            "read_fraction": round(by["split", rank]["bytes_read"] / info["bytes"], 3),
            "rss_growth_split_gib": round((by["split", rank]["rss_peak"] - by["split", rank]["rss_baseline"]) / 2**30, 2),
            "rss_growth_whole_gib": round((by["whole", rank]["rss_peak"] - by["whole", rank]["rss_baseline"]) / 2**30, 2),
            "seconds_split": by["split", rank]["seconds"], "seconds_whole": by["whole", rank]["seconds"]}
        for rank in range(SIZE)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
