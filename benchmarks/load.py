"""Load time and peak host memory: diffgen's loader against a raw safetensors read of the same files.

CPU mode (default): a FluxTransformer2DModel-shaped checkpoint of ``--size-gb`` GB of random bf16
weights (FLUX.1's hidden size 3072, as many double blocks as the size allows), written in shards of
``--shard-gb`` GB with an index. Variants, each in a fresh subprocess so that its peak RSS (VmHWM)
is its own:
  raw      every tensor of every shard read with safetensors' safe_open and copied into memory the
           process owns, all kept (what any loader must at least do)
  diffgen  diffgen.load_transformer(dir, device="cpu", dtype=bf16), weight checks on
  diffgen_no_check  the same with check_weights=False (what the NaN/inf check costs)
Targets (issue 24): diffgen's time <= 1.3x raw; diffgen's host memory beyond the loaded model
(peak RSS minus the model's bytes, the process's own baseline included) <= largest shard + 2 GiB.

CUDA mode (``--device cuda``): FLUX.1-dev's full config (19 + 38 blocks) with random weights,
written twice: as a builtin fp8 per-tensor checkpoint (every linear of the blocks FP8 with a scalar
weight_scale, the rest bf16) and as a bf16 copy. Variants:
  raw_fp8            safetensors' safe_open(device="cuda").get_tensor of every tensor of the FP8 files
  diffgen_fp8        diffgen.load_transformer(fp8 dir, device="cuda", dtype=bf16)
  diffgen_fp8_no_check  the same with check_weights=False
  diffgen_fp8_serial    the same with reads and copies in turn (READ_AHEAD_BYTES = 0: no read-ahead
                     thread, pageable reads), what the loader did before
  diffgen_fp8_profile   (with --profile) diffgen_fp8 under cProfile: its top functions by cumulative time
  diffusers_bf16     FluxTransformer2DModel.from_pretrained(bf16 dir, torch_dtype=bf16, device_map="cuda")
Peak host RSS and peak GPU memory are reported for each. Imports (torch, diffusers and the model
class, diffgen and its plugin discovery) happen before each variant's clock starts. The files are written on the GPU's random
numbers and stay in the page cache, so every variant reads from memory alike.

Prints JSON and writes it with --out. Files go under --dir (default /tmp/diffgen-load-bench) and are
removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _meta_model(config: dict):
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def cpu_config(size_bytes: int) -> dict:
    """FLUX.1's widths with as many double blocks as fit ``size_bytes`` of bf16 (at least one)."""
    one = sum(p.numel() for p in _meta_model({**FLUX_DEV, "num_layers": 1, "num_single_layers": 0}).parameters())
    two = sum(p.numel() for p in _meta_model({**FLUX_DEV, "num_layers": 2, "num_single_layers": 0}).parameters())
    per_block, base = two - one, one - (two - one)
    layers = max(1, round((size_bytes / 2 - base) / per_block))
    return {**FLUX_DEV, "num_layers": layers, "num_single_layers": 0}


def write_checkpoint(out: Path, config: dict, *, fp8: bool, shard_bytes: int, device: str) -> dict:
    """Random weights for ``config``'s FluxTransformer2DModel, written shard by shard (diffusers' names,
    an index). ``fp8``: linears of the blocks as float8_e4m3fn with a scalar weight_scale."""
    import torch
    from safetensors.torch import save_file

    model = _meta_model(config)
    out.mkdir(parents=True)
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic"} if fp8 else None
    model.register_to_config(**({"quantization_config": qc} if qc else {}))
    model.save_config(out)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    gen = torch.Generator(device).manual_seed(0)
    shard: dict = {}
    shards: list[dict] = []

    def flush():
        if shard:
            shards.append(dict(shard))
            name = f"part-{len(shards)}.safetensors"
            save_file(shard, out / name)
            shard.clear()

    total = 0
    for name, p in model.state_dict().items():
        module = name.rpartition(".")[0]
        if fp8 and name.endswith(".weight") and module in linears:
            # e4m3 codes with the NaN pattern (S.1111.111) excluded
            codes = torch.randint(0, 0x7E, tuple(p.shape), generator=gen, device=device, dtype=torch.uint8)
            sign = torch.randint(0, 2, tuple(p.shape), generator=gen, device=device, dtype=torch.uint8) << 7
            tensors = {name: (codes | sign).view(torch.float8_e4m3fn).cpu(),
                       f"{module}.weight_scale": torch.tensor(0.02 / 448 * 8, dtype=torch.float32)}
        else:
            t = torch.randn(tuple(p.shape), generator=gen, device=device, dtype=torch.float32) * 0.02
            tensors = {name: t.to(torch.bfloat16).cpu()}
        for k, t in tensors.items():
            shard[k] = t
            total += t.numel() * t.element_size()
        if sum(t.numel() * t.element_size() for t in shard.values()) >= shard_bytes:
            flush()
    flush()
    count = len(shards)
    weight_map, sizes = {}, []
    for i, tensors in enumerate(shards, 1):
        final = f"diffusion_pytorch_model-{i:05d}-of-{count:05d}.safetensors"
        (out / f"part-{i}.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(tensors, final))
        sizes.append((out / final).stat().st_size)
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"bytes": total, "shards": count, "largest_shard": max(sizes)}


# -- one variant, in its own process ------------------------------------------------------------
def run_variant(variant: str, ckpt: Path, device: str) -> dict:
    import torch

    # Imports are not load time: every variant imports what it needs before the clock starts
    # (diffusers resolves model classes lazily, so the class is touched too).
    import diffusers
    from safetensors import safe_open

    import diffgen.loader  # noqa: F401
    from diffgen.plugins import get_plugin_host

    diffusers.FluxTransformer2DModel  # noqa: B018
    get_plugin_host()  # plugin discovery, once per process
    baseline = _status_bytes("VmRSS")
    files = sorted(ckpt.glob("*.safetensors"))
    cuda = device == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if variant.startswith("raw"):
        # Every tensor in memory the process owns (on the CPU, safetensors hands out views of its
        # mmap; clone() makes the read real, as a loader's copy into its parameters is).
        held = []
        for f in files:
            with safe_open(str(f), "pt", device=device) as sf:
                held.append({k: sf.get_tensor(k) if cuda else sf.get_tensor(k).clone() for k in sf.keys()})
        model_bytes = sum(t.numel() * t.element_size() for d in held for t in d.values())
    elif variant.startswith("diffgen"):
        import diffgen

        if "serial" in variant:  # reads and copies in turn, from pageable memory (before read-ahead)
            diffgen.loader.READ_AHEAD_BYTES = 0
        profiler = None
        if "profile" in variant:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        held = diffgen.load_transformer(ckpt, device=device, dtype=torch.bfloat16,
                                        check_weights="no_check" not in variant)
        if profiler is not None:
            if cuda:
                torch.cuda.synchronize()
            profiler.disable()
            profile = _top_functions(profiler, 30)
        model_bytes = sum(t.numel() * t.element_size() for t in [*held.parameters(), *held.buffers()])
    else:  # diffusers' own fast path: weights placed on the device as they are read
        from diffusers import FluxTransformer2DModel

        held = FluxTransformer2DModel.from_pretrained(ckpt, torch_dtype=torch.bfloat16, device_map=device)
        model_bytes = sum(t.numel() * t.element_size() for t in [*held.parameters(), *held.buffers()])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    resident = 0 if cuda else model_bytes  # on the CPU the loaded model itself lives in host memory
    extra = {"profile_cumulative": profile} if variant.startswith("diffgen") and "profile" in variant else {}
    return {**extra, "variant": variant, "seconds": round(seconds, 3), "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
            "model_bytes": model_bytes, "host_beyond_model_bytes": peak - resident,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def _top_functions(profiler, n: int) -> list[list]:
    """The ``n`` functions with the most cumulative time: [seconds, calls, "file:line(name)"]."""
    import pstats

    stats = pstats.Stats(profiler).stats
    rows = sorted(((v[3], v[1], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.items()), reverse=True)
    return [[round(t, 3), calls, where] for t, calls, where in rows[:n]]


def measure(variant: str, ckpt: Path, device: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", variant, "--ckpt", str(ckpt), "--device", device],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _best(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "seconds_all": [r["seconds"] for r in runs], "seconds_median": statistics.median(
        r["seconds"] for r in runs), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size-gb", type=float, default=4.0, help="CPU mode: checkpoint size in GB (default 4)")
    p.add_argument("--shard-gb", type=float, default=None, help="shard size in GB (default: 1 on CPU, 5 on CUDA)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per variant, each in a fresh process; the best is reported (default: 2 on CPU, 1 on CUDA)")
    p.add_argument("--dir", default="/tmp/diffgen-load-bench")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    p.add_argument("--out")
    p.add_argument("--fp8-only", action="store_true",
                   help="CUDA mode: raw_fp8, diffgen_fp8 and diffgen_fp8_no_check only (the issue's target)")
    p.add_argument("--profile", action="store_true",
                   help="CUDA mode: one more diffgen run under cProfile; its top functions go in the JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, Path(args.ckpt), args.device)))
        return

    import torch

    repeats = args.repeats or (2 if args.device == "cpu" else 1)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    shard_bytes = int((args.shard_gb or (1 if args.device == "cpu" else 5)) * 1e9)
    began = time.perf_counter()
    report: dict = {"device": args.device, "torch": torch.__version__}
    try:
        if args.device == "cpu":
            config = cpu_config(int(args.size_gb * 1e9))
            info = write_checkpoint(root / "bf16", config, fp8=False, shard_bytes=shard_bytes, device="cpu")
            report["checkpoint"] = {**info, "num_layers": config["num_layers"], "dtype": "bf16"}
            report["write_seconds"] = round(time.perf_counter() - began, 1)
            pairs = [("raw", root / "bf16"), ("diffgen", root / "bf16"), ("diffgen_no_check", root / "bf16")]
        else:
            report["gpu"] = torch.cuda.get_device_name()
            fp8 = write_checkpoint(root / "fp8", FLUX_DEV, fp8=True, shard_bytes=shard_bytes, device="cuda")
            bf16 = write_checkpoint(root / "bf16", FLUX_DEV, fp8=False, shard_bytes=shard_bytes, device="cuda") \
                if not args.fp8_only else None
            report["checkpoint"] = {"fp8": fp8, "bf16": bf16, "config": "FLUX.1-dev (19 + 38 blocks)"}
            report["write_seconds"] = round(time.perf_counter() - began, 1)
            pairs = [("raw_fp8", root / "fp8"), ("diffgen_fp8", root / "fp8"), ("diffgen_fp8_no_check", root / "fp8"),
                     ("diffgen_fp8_serial", root / "fp8"), ("diffusers_bf16", root / "bf16")]
            if args.fp8_only:  # the target's variants only: no bf16 copy to write, no serial loader
                pairs = pairs[:3]
            if args.profile:
                pairs.append(("diffgen_fp8_profile", root / "fp8"))
        runs: dict[str, list] = {v: [] for v, _ in pairs}
        for _ in range(repeats):  # interleaved, so that drift in the machine's state hits all alike
            for variant, ckpt in pairs:
                runs[variant].append(measure(variant, ckpt, args.device))
        results = {v: _best(r) for v, r in runs.items()}
        report["results"] = results
        if args.device == "cpu":
            largest = report["checkpoint"]["largest_shard"]
            d, raw = results["diffgen"], results["raw"]
            report["targets"] = {
                "time_ratio_vs_raw": round(d["seconds"] / raw["seconds"], 3), "time_ratio_target": 1.3,
                "time_ratio_no_check_vs_raw": round(results["diffgen_no_check"]["seconds"] / raw["seconds"], 3),
                "host_beyond_model_gib": round(d["host_beyond_model_bytes"] / GIB, 3),
                "host_target_gib": round((largest + 2 * GIB) / GIB, 3),
                "time_ok": d["seconds"] <= 1.3 * raw["seconds"],
                "memory_ok": d["host_beyond_model_bytes"] <= largest + 2 * GIB}
        else:
            largest = report["checkpoint"]["fp8"]["largest_shard"]
            d, raw, ref = results["diffgen_fp8"], results["raw_fp8"], results.get("diffusers_bf16")
            report["targets"] = {
                "time_ratio_vs_raw_fp8": round(d["seconds"] / raw["seconds"], 3), "time_ratio_target": 1.3,
                "time_ratio_no_check_vs_raw_fp8": round(results["diffgen_fp8_no_check"]["seconds"] / raw["seconds"], 3),
                "time_ratio_vs_diffusers_bf16": round(d["seconds"] / ref["seconds"], 3) if ref else None,
                "time_ok": d["seconds"] <= 1.3 * raw["seconds"],
                "diffgen_peak_rss_gib": round(d["peak_rss_bytes"] / GIB, 3),
                "host_target_gib": round((largest + 2 * GIB) / GIB, 3),
                "memory_ok": d["peak_rss_bytes"] <= largest + 2 * GIB}
        report["total_seconds"] = round(time.perf_counter() - began, 1)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
