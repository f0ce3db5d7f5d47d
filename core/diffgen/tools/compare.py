"""``diffgen compare``: how far a candidate's denoising trajectory and output are from a reference's.

Both sides run the same ``SamplingArgs`` (same prompt, size, steps, guidance and seed, so the same
initial noise) and the same extra call arguments, one after the other. A ``callback_on_step_end``
with ``callback_on_step_end_tensor_inputs=["latents"]`` copies the latents after every denoising
step to the CPU as float32; the output is decoded with ``output_type="np"`` and rounded to 8-bit
RGB exactly as diffusers rounds a saved PNG. Reported:
- per step: ``metrics.tensor_metrics`` (cosine similarity, MAE, MSE, RMSE, max abs) and the timestep;
- the output: ``metrics.image_metrics`` (PSNR, SSIM, MAE, ...) for an image; for a video the
  same for the first frame, the middle frame and all frames (``metrics.video_metrics``).
Gates (optional): ``min_cosine`` holds for the lowest per-step cosine, ``min_psnr`` for the
image's PSNR (all frames of a video). The result says which gate failed; the CLI then exits 1.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DiffgenError
from ..platform import Platform, resolve
from ..report import pipeline_report
from ..run import SamplingArgs
from .metrics import image_metrics, tensor_metrics, video_metrics
from .sides import Side, describe_side, free_device_memory, open_side, sampling_call_arguments, versions


@dataclass
class SideRun:
    """What one side left behind: everything on the CPU, the pipeline already dropped."""

    latents: list[torch.Tensor]  # after each denoising step, float32
    timesteps: list[float]
    frames: np.ndarray  # [F, H, W, 3] uint8; F = 1 for an image
    video: bool
    info: dict


def frames_uint8(result) -> tuple[np.ndarray, bool]:
    """The first output of a pipeline result as [F, H, W, 3] uint8, and whether it is a video."""
    video = getattr(result, "frames", None) is not None
    first = result.frames[0] if video else result.images[0]
    if isinstance(first, list):  # PIL frames
        array = np.stack([np.asarray(f.convert("RGB")) for f in first])
    elif hasattr(first, "convert"):  # one PIL image
        array = np.asarray(first.convert("RGB"))
    else:
        array = first.float().cpu().numpy() if isinstance(first, torch.Tensor) else np.asarray(first)
    if array.dtype != np.uint8:  # diffusers' numpy_to_pil: (x * 255).round()
        array = (array * 255).round().clip(0, 255).astype(np.uint8)
    return (array if video else array[None]), video


def run_side(side: Side, sampling: SamplingArgs, *, platform: Platform, dtype: torch.dtype,
             call_kwargs: dict | None = None) -> SideRun:
    """Run one side once, capturing its latents after every step and its decoded output."""
    pipe, owned = open_side(side, platform, dtype)
    try:
        accepted = pyinspect.signature(type(pipe).__call__).parameters
        if "callback_on_step_end" not in accepted or "latents" not in getattr(pipe, "_callback_tensor_inputs", ()):
            raise DiffgenError(f"{type(pipe).__name__} does not pass its latents to callback_on_step_end, "
                               "so compare cannot follow its denoising trajectory")
        latents: list[torch.Tensor] = []
        timesteps: list[float] = []

        def capture(_pipe, _step, timestep, callback_kwargs):
            latents.append(callback_kwargs["latents"].detach().to("cpu", torch.float32, copy=True))
            timesteps.append(float(torch.as_tensor(timestep).flatten()[0]))
            return callback_kwargs

        if owned:
            pipe.set_progress_bar_config(disable=True)
        kwargs = sampling_call_arguments(pipe, sampling, call_kwargs)
        kwargs.update(callback_on_step_end=capture, callback_on_step_end_tensor_inputs=["latents"])
        if "output_type" in accepted:
            kwargs["output_type"] = "np"
        started = time.perf_counter()
        with torch.inference_mode():
            result = pipe(**kwargs)
        generation_s = time.perf_counter() - started
        frames, video = frames_uint8(result)
        info = {"source": describe_side(side), "pipeline": type(pipe).__name__, "generation_s": generation_s,
                **pipeline_report(pipe)}
    finally:
        if owned:
            pipe = result = None  # the only references: the pipeline's memory is free once this returns
    free_device_memory()
    return SideRun(latents, timesteps, frames, video, info)


def compare(reference: Side, candidate: Side, sampling: SamplingArgs, *, device: str | Platform | None = None,
            dtype: str | torch.dtype = "auto", call_kwargs: dict | None = None,
            min_cosine: float | None = None, min_psnr: float | None = None) -> dict:
    """Run ``reference`` then ``candidate`` with identical sampling; per-step latent metrics,
    output metrics and gates as a JSON-ready dict (PSNR of identical outputs is ``math.inf``).

    ``reference`` / ``candidate``: a ``PipelineConfig`` (loaded with ``device`` and ``dtype``), a
    ``PipelineFactory``, a pipeline, or a callable returning one. ``call_kwargs`` go to both
    pipeline calls unchanged (e.g. ``prompt_embeds`` and ``pooled_prompt_embeds``).
    """
    platform, dtype = resolve(device, dtype)
    ref = run_side(reference, sampling, platform=platform, dtype=dtype, call_kwargs=call_kwargs)
    cand = run_side(candidate, sampling, platform=platform, dtype=dtype, call_kwargs=call_kwargs)
    if len(ref.latents) != len(cand.latents):
        raise DiffgenError(f"the reference ran {len(ref.latents)} denoising steps and the candidate "
                           f"{len(cand.latents)}; with identical sampling they must match")
    if ref.frames.shape != cand.frames.shape:
        raise DiffgenError(f"the outputs differ in shape: reference {ref.frames.shape}, candidate {cand.frames.shape}")
    pairs = zip(ref.latents, cand.latents, ref.timesteps, cand.timesteps)
    trajectory = [{"step": i, "timestep": t_ref, "candidate_timestep": t_cand, **tensor_metrics(a, b)}
                  for i, (a, b, t_ref, t_cand) in enumerate(pairs)]
    if ref.video:
        output = {"kind": "video", "frames": int(ref.frames.shape[0]), **video_metrics(ref.frames, cand.frames)}
        headline = output["all_frames"]
    else:
        output = {"kind": "image", "image": image_metrics(ref.frames[0], cand.frames[0])}
        headline = output["image"]
    output["height"], output["width"] = int(ref.frames.shape[1]), int(ref.frames.shape[2])
    cosines = [s["cosine_similarity"] for s in trajectory]
    summary = {"steps": len(trajectory), "final_step_cosine": cosines[-1] if cosines else None,
               "min_step_cosine": min(cosines) if cosines else None,
               "psnr_db": headline["psnr_db"], "ssim": headline["ssim"], "mae": headline["mae"]}
    return {
        "tool": "diffgen compare",
        "versions": versions(),
        "device": platform.describe(), "dtype": str(dtype).removeprefix("torch."),
        "sampling": asdict(sampling),
        "extra_call_arguments": sorted(call_kwargs or {}),
        "reference": ref.info, "candidate": cand.info,
        "trajectory": trajectory, "output": output, "summary": summary,
        "gates": check_gates(summary, trajectory, min_cosine, min_psnr),
    }


def check_gates(summary: dict, trajectory: list[dict], min_cosine: float | None, min_psnr: float | None) -> dict:
    violations = []
    if min_cosine is not None and summary["min_step_cosine"] is not None and summary["min_step_cosine"] < min_cosine:
        worst = min(trajectory, key=lambda s: s["cosine_similarity"])
        violations.append(f"latent cosine {worst['cosine_similarity']:.6f} at step {worst['step']} is below "
                          f"--min-cosine {min_cosine}")
    if min_psnr is not None and not summary["psnr_db"] >= min_psnr:  # NaN fails too
        violations.append(f"output PSNR {summary['psnr_db']:.2f} dB is below --min-psnr {min_psnr}")
    return {"min_cosine": min_cosine, "min_psnr": min_psnr, "passed": not violations, "violations": violations}


def json_safe(value: Any) -> Any:
    """Strict JSON has no infinity or NaN: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")


def format_report(result: dict) -> str:
    """The human summary: per-step cosine and errors, output metrics, gates."""
    lines = [f"reference: {_label(result['reference'], result['dtype'])}",
             f"candidate: {_label(result['candidate'], result['dtype'])}",
             f"{'step':>4}  {'timestep':>9}  {'cosine':>10}  {'mae':>10}  {'rmse':>10}  {'max_abs':>10}"]
    for s in result["trajectory"]:
        lines.append(f"{s['step']:>4}  {s['timestep']:>9.2f}  {s['cosine_similarity']:>10.6f}  {s['mae']:>10.4g}  "
                     f"{s['rmse']:>10.4g}  {s['max_abs']:>10.4g}")
    out = result["output"]
    parts = {"image": out.get("image")} if out["kind"] == "image" else {
        "first frame": out["first_frame"], "middle frame": out["middle_frame"], "all frames": out["all_frames"]}
    for name, m in parts.items():
        lines.append(f"{name}: PSNR {m['psnr_db']:.2f} dB, SSIM {m['ssim']:.4f}, MAE {m['mae']:.3f} (8-bit)")
    gates = result["gates"]
    if gates["min_cosine"] is not None or gates["min_psnr"] is not None:
        lines.append("gates: passed" if gates["passed"] else "gates: FAILED: " + "; ".join(gates["violations"]))
    return "\n".join(lines)


def _label(info: dict, dtype: str) -> str:
    source = info["source"]
    if source.get("kind") != "config":
        return f"{info['pipeline']} ({source.get('label') or source.get('kind')})"
    changed = [f"{k}={v}" for k, v in source.items()
               if k not in ("kind", "model_path", "allow_pickle") and v is not False and v not in (None, {}, [], ())]
    # Unquantized means the compute dtype, which is float32 on the CPU: not "16-bit" there.
    return f"{info['pipeline']} from {source['model_path']}" + (f" ({', '.join(changed)})" if changed else
                                                               f" (unquantized, {dtype})")
