"""``diffgen bench``: a baseline and a candidate that differ only in checkpoint or quantization,
timed stage by stage.

Each side is loaded, run ``warmup_runs`` times unmeasured (torch.compile, kernel autotuning, the
allocator's first growth), run ``runs`` times measured, and dropped before the other side loads, so
each side's memory numbers are its own. A measured run times text encoding, every denoising step
and VAE decode with ``run.StageTimer``, whose ``callback_on_step_end`` is the only callback on
the call; CUDA is synchronised at every stage boundary. A step's time runs from the end of the
previous step (step 0: from the end of text encoding, so it includes preparing latents).
Reported per stage: median, min, max and spread = (max - min) / median over the measured runs,
and the same per step index; the device's peak allocated bytes over the measured runs (resident
weights included); bytes allocated after loading; weight bytes per component as diffgen counts them.

Only ``BenchConfig.pipeline`` may differ between the sides: a difference in sampling (prompt, size,
frames, steps, guidance, seed), device, dtype, offload or compile is refused with
``ConfigMismatchError``, since the numbers would no longer measure the checkpoint.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, fields

import torch

from ..errors import DiffgenError
from ..pipeline import transformer_names
from ..platform import Platform, resolve
from ..report import peak_host_bytes, pipeline_report
from ..run import SamplingArgs, StageTimer, apply_run_options
from .sides import (Side, describe_side, free_device_memory, open_side, sampling_call_arguments,
                    versions)


class ConfigMismatchError(DiffgenError, ValueError):
    """Baseline and candidate differ in more than checkpoint or quantization."""


@dataclass(frozen=True)
class BenchConfig:
    """One side of a benchmark. ``pipeline`` (a PipelineConfig, PipelineFactory or pipeline) and
    ``label`` may differ between the sides; every field in MUST_MATCH must not."""

    pipeline: Side
    sampling: SamplingArgs
    device: str | None = None
    dtype: str | torch.dtype = "auto"
    dit_cpu_offload: bool = False
    pipeline_cpu_offload: bool = False
    dit_layerwise_offload: bool = False
    compile: bool = False
    label: str = ""


MUST_MATCH = ("sampling", "device", "dtype", "dit_cpu_offload", "pipeline_cpu_offload", "dit_layerwise_offload",
              "compile")


def check_comparable(baseline: BenchConfig, candidate: BenchConfig) -> None:
    """Raise ConfigMismatchError naming every field, other than the pipeline, that differs."""
    differences = []
    for name in MUST_MATCH:
        a, b = getattr(baseline, name), getattr(candidate, name)
        if name == "sampling":
            differences += [f"{f.name} ({getattr(a, f.name)!r} vs {getattr(b, f.name)!r})" for f in fields(SamplingArgs)
                            if getattr(a, f.name) != getattr(b, f.name)]
        elif name == "device":
            if resolve(a)[0].device != resolve(b)[0].device:
                differences.append(f"device ({a!r} vs {b!r})")
        elif name == "dtype":
            if resolve(baseline.device, a)[1] != resolve(candidate.device, b)[1]:
                differences.append(f"dtype ({a!r} vs {b!r})")
        elif a != b:
            differences.append(f"{name} ({a!r} vs {b!r})")
    if differences:
        raise ConfigMismatchError(
            "bench measures a checkpoint or quantization against another and nothing else, but baseline and "
            f"candidate also differ in: {', '.join(differences)}. Give both sides the same sampling, device, "
            "dtype, offload and compile settings")


def bench(baseline: BenchConfig, candidate: BenchConfig, *, warmup_runs: int = 1, runs: int = 3,
          call_kwargs: dict | None = None) -> dict:
    """Benchmark ``baseline`` then ``candidate``; a JSON-ready dict (see the module docstring).

    ``call_kwargs`` go unchanged to every pipeline call of both sides (e.g. ``prompt_embeds``).
    """
    if runs < 1 or warmup_runs < 0:
        raise ValueError(f"bench needs runs >= 1 and warmup_runs >= 0, not runs={runs}, warmup_runs={warmup_runs}")
    check_comparable(baseline, candidate)
    platform, dtype = resolve(baseline.device, baseline.dtype)
    sides = {"baseline": bench_side(baseline, platform, dtype, warmup_runs, runs, call_kwargs),
             "candidate": bench_side(candidate, platform, dtype, warmup_runs, runs, call_kwargs)}
    return {
        "tool": "diffgen bench",
        "versions": versions(),
        "platform": platform.to_dict(),
        "sampling": asdict(baseline.sampling),
        "run_options": {"dtype": str(dtype).removeprefix("torch."),
                        "dit_cpu_offload": baseline.dit_cpu_offload,
                        "pipeline_cpu_offload": baseline.pipeline_cpu_offload,
                        "dit_layerwise_offload": baseline.dit_layerwise_offload, "compile": baseline.compile},
        "extra_call_arguments": sorted(call_kwargs or {}),
        "warmup_runs": warmup_runs, "runs": runs,
        **sides,
        "speedup": _speedup(sides["baseline"], sides["candidate"]),
        "notes": ["sides run one after the other in one process: baseline (load, warm-up, measured runs, drop), "
                  "then candidate",
                  "speedup = baseline median / candidate median; above 1 means the candidate is faster",
                  "peak_host_memory_bytes is the process's high-water mark so far, so the candidate's includes "
                  "the baseline's"],
    }


def bench_side(config: BenchConfig, platform: Platform, dtype: torch.dtype, warmup_runs: int, runs: int,
               call_kwargs: dict | None) -> dict:
    cuda = platform.device.startswith("cuda")
    started = time.perf_counter()
    pipe, owned = open_side(config.pipeline, platform, dtype)
    load_s = time.perf_counter() - started
    try:
        apply_run_options(pipe, platform, dit_cpu_offload=config.dit_cpu_offload,
                          pipeline_cpu_offload=config.pipeline_cpu_offload,
                          dit_layerwise_offload=config.dit_layerwise_offload, compile=config.compile)
        pipe.set_progress_bar_config(disable=True)
        allocated = torch.cuda.memory_allocated(platform.device) if cuda else None
        for _ in range(warmup_runs):
            timed_run(pipe, config, platform, call_kwargs)
        if cuda:
            torch.cuda.reset_peak_memory_stats(platform.device)
        measured = [timed_run(pipe, config, platform, call_kwargs) for _ in range(runs)]
        loaded = pipeline_report(pipe)
        info = {
            "label": config.label, "source": describe_side(config.pipeline), "pipeline": type(pipe).__name__,
            "load_s": load_s, **loaded,
            "transformer_weight_bytes": sum(loaded["weight_bytes"].get(n, 0) for n in transformer_names(pipe)),
            "memory": {
                "device_allocated_after_load_bytes": allocated,
                "peak_device_allocated_bytes": torch.cuda.max_memory_allocated(platform.device) if cuda else None,
                "peak_device_reserved_bytes": torch.cuda.max_memory_reserved(platform.device) if cuda else None,
                "peak_host_memory_bytes": peak_host_bytes()},
            "stages": summarize(measured),
            "measured_runs": measured,
        }
    finally:
        if owned:
            pipe = None  # the only reference: the side's memory is free once this returns
    free_device_memory()
    return info


def timed_run(pipe, config: BenchConfig, platform: Platform, call_kwargs: dict | None) -> dict:
    with StageTimer(platform.device).installed(pipe) as timer:
        kwargs = sampling_call_arguments(pipe, config.sampling, call_kwargs, timer)
        if "callback_on_step_end" not in kwargs:
            raise DiffgenError(f"{type(pipe).__name__} takes no callback_on_step_end; bench cannot time its steps")
        started = timer.now()
        with torch.inference_mode():
            pipe(**kwargs)
        total_s = timer.now() - started
    steps = timer.steps()
    return {"total_s": total_s, "text_encoding_s": timer.text_encoding_s, "denoising_s": sum(steps),
            "denoising_steps_s": steps, "vae_decode_s": timer.vae_decode_s}


def spread(values: list[float]) -> dict:
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / median if median > 0 else None}


def summarize(measured: list[dict]) -> dict:
    """Per stage and per step index: median, min, max and spread over the measured runs."""
    out = {stage: spread([r[stage] for r in measured])
           for stage in ("total_s", "text_encoding_s", "denoising_s", "vae_decode_s")}
    out["step_median_s"] = spread([statistics.median(r["denoising_steps_s"]) for r in measured])
    per_step = zip(*(r["denoising_steps_s"] for r in measured))
    out["denoising_steps_s"] = [spread(list(times)) for times in per_step]
    return out


def _speedup(baseline: dict, candidate: dict) -> dict:
    out = {}
    for stage in ("total_s", "denoising_s", "step_median_s", "text_encoding_s", "vae_decode_s"):
        b, c = baseline["stages"][stage]["median"], candidate["stages"][stage]["median"]
        out[stage] = b / c if c > 0 else None
    b, c = baseline["transformer_weight_bytes"], candidate["transformer_weight_bytes"]
    out["transformer_weight_bytes_ratio"] = c / b if b else None
    return out


def format_table(result: dict) -> str:
    """Stage medians with their spread, side by side, then memory."""
    base, cand, speedup = result["baseline"], result["candidate"], result["speedup"]

    def ms(s: dict) -> str:
        tail = f" ±{s['spread'] * 50:.0f}%" if s["spread"] is not None else ""  # half the range, as ±
        return f"{s['median'] * 1e3:.1f} ms{tail}"

    def x(v) -> str:
        return f"{v:.2f}x" if v is not None else "-"

    rows = [("stage", f"baseline ({_short(base)})", f"candidate ({_short(cand)})", "speedup")]
    names = {"text_encoding_s": "text encoding", "step_median_s": "denoising step (median)",
             "denoising_s": "denoising (all steps)", "vae_decode_s": "VAE decode", "total_s": "total"}
    for stage, name in names.items():
        rows.append((name, ms(base["stages"][stage]), ms(cand["stages"][stage]), x(speedup.get(stage))))
    for i, (b, c) in enumerate(zip(base["stages"]["denoising_steps_s"], cand["stages"]["denoising_steps_s"])):
        rows.append((f"  step {i}", ms(b), ms(c), x(b["median"] / c["median"] if c["median"] > 0 else None)))
    peak_b, peak_c = base["memory"]["peak_device_allocated_bytes"], cand["memory"]["peak_device_allocated_bytes"]
    if peak_b is not None and peak_c is not None:
        rows.append(("peak device memory", _gib(peak_b), _gib(peak_c), f"{peak_c / peak_b:.2f}x size"))
    rows.append(("transformer weights", _gib(base["transformer_weight_bytes"]), _gib(cand["transformer_weight_bytes"]),
                 f"{speedup['transformer_weight_bytes_ratio']:.2f}x size"
                 if speedup["transformer_weight_bytes_ratio"] is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{result['runs']} measured runs after {result['warmup_runs']} warm-up; ± is half the min-max range")
    return "\n".join(lines)


def _short(side: dict) -> str:
    if side["label"]:
        return side["label"]
    source = side["source"]
    return source.get("quantization") or ("unquantized" if source.get("kind") == "config" else source.get("kind", "?"))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
