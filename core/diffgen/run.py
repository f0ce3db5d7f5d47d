"""Run a loaded pipeline once: the sampling arguments, stage timings, compile, and the written output."""

from __future__ import annotations

import inspect as pyinspect
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .offload import apply_offload
from .pipeline import transformer_names
from .platform import Platform

log = logging.getLogger("diffgen")


# Pipelines whose `image` argument defaults to None although they cannot run without one.
IMAGE_INPUT_PIPELINES = ("ImageToVideo", "Edit", "Img2Img", "Inpaint", "Kontext")


@dataclass
class SamplingArgs:
    prompt: str
    negative_prompt: str | None = None
    image_path: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0


@dataclass
class StageTimer:
    """Wall time of text encoding, each denoising step and VAE decode, synchronised on CUDA."""

    device: str
    text_encoding_s: float = 0.0
    step_ends: list[float] = field(default_factory=list)
    steps_start: float | None = None
    vae_decode_s: float = 0.0
    on_step: Callable[[int, int | None, float], None] | None = None  # (step, steps in all, its seconds)
    profiler: "StepProfiler | None" = None  # runs from the end of text encoding to the VAE decode

    def now(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, obj: Any, attr: str, stage: str) -> None:
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            if stage == "vae_decode_s" and self.profiler:
                self.profiler.stop()
            start = self.now()
            try:
                return original(*args, **kwargs)
            finally:
                setattr(self, stage, getattr(self, stage) + self.now() - start)
                if stage == "text_encoding_s":
                    self.steps_start = self.now()
                    if self.profiler:
                        self.profiler.start()

        setattr(obj, attr, timed)

    @contextmanager
    def installed(self, pipe) -> Iterator["StageTimer"]:
        """Wrap ``encode_prompt`` and ``vae.decode`` for one run; put the originals back after."""
        targets = [(pipe, "encode_prompt", "text_encoding_s")] if hasattr(pipe, "encode_prompt") else []
        if getattr(pipe, "vae", None) is not None:
            targets.append((pipe.vae, "decode", "vae_decode_s"))
        saved = [(obj, attr, vars(obj).get(attr)) for obj, attr, _ in targets]
        for obj, attr, stage in targets:
            self.wrap(obj, attr, stage)
        if self.profiler and not hasattr(pipe, "encode_prompt"):
            self.profiler.start()
        try:
            yield self
        finally:
            if self.profiler:
                self.profiler.stop()
            for obj, attr, own in saved:
                if own is None:
                    delattr(obj, attr)  # the class's method shows through again
                else:
                    setattr(obj, attr, own)

    def on_step_end(self, pipe, step, timestep, callback_kwargs):
        self.step_ends.append(self.now())
        if self.on_step is not None:
            self.on_step(len(self.step_ends), getattr(pipe, "num_timesteps", None), self.steps()[-1])
        return callback_kwargs

    def steps(self) -> list[float]:
        marks = [self.steps_start if self.steps_start is not None else self.step_ends[0]] + self.step_ends
        return [b - a for a, b in zip(marks, marks[1:])]


class StepProfiler:
    """A torch.profiler trace of the denoising steps (SGLang-Diffusion's validation flow reads one):
    started when text encoding ends, stopped when the VAE decode starts."""

    def __init__(self, directory: Path, platform: Platform):
        from torch.profiler import ProfilerActivity, profile

        self.directory = directory
        self.device = platform.device_kind in ("cuda", "rocm")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device else [])
        self._profile = profile(activities=activities)
        self.state = "new"

    def start(self) -> None:
        if self.state == "new":
            self._profile.start()
            self.state = "running"

    def stop(self) -> None:
        if self.state == "running":
            self._profile.stop()
            self.state = "stopped"

    def finish(self, top: int = 3) -> str:
        """Write the trace; one line naming it and the ``top`` kernels (operators on the CPU) by self time."""
        self.stop()
        if self.state != "stopped":
            return "profile: nothing was profiled (the pipeline ran no denoising step)"
        path = self.directory / "trace.json"
        self._profile.export_chrome_trace(str(path))
        key = "self_device_time_total" if self.device else "self_cpu_time_total"
        events = sorted(self._profile.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
        total = sum(getattr(e, key, 0) for e in events) or 1
        what = "kernels" if self.device else "operators (CPU)"
        parts = [f"{e.key[:60]} {getattr(e, key) / 1e3:.1f} ms ({100 * getattr(e, key) / total:.0f}%)"
                 for e in events[:top]]
        return f"profile: wrote {path}; top {what} by self time: " + "; ".join(parts)


def call_arguments(pipe, args: SamplingArgs, timer: StageTimer | None) -> dict:
    """The subset of ``args`` this pipeline's ``__call__`` takes (families differ)."""
    accepted = pyinspect.signature(type(pipe).__call__).parameters
    kwargs: dict[str, Any] = {"prompt": args.prompt,
                              "generator": torch.Generator("cpu").manual_seed(args.seed)}
    optional = {"negative_prompt": args.negative_prompt, "height": args.height, "width": args.width,
                "num_frames": args.num_frames, "num_inference_steps": args.num_inference_steps,
                "guidance_scale": args.guidance_scale}
    kwargs.update({k: v for k, v in optional.items() if v is not None and k in accepted})
    if args.image_path:
        from PIL import Image

        if "image" not in accepted:
            raise ValueError(f"{type(pipe).__name__} takes no input image; drop --image-path")
        kwargs["image"] = Image.open(args.image_path).convert("RGB")
    elif "image" in accepted and (accepted["image"].default is pyinspect.Parameter.empty
                                  or any(k in type(pipe).__name__ for k in IMAGE_INPUT_PIPELINES)):
        raise ValueError(f"{type(pipe).__name__} needs an input image: pass --image-path")
    if timer is not None and "callback_on_step_end" in accepted:
        kwargs["callback_on_step_end"] = timer.on_step_end
    return kwargs


def default_file_name(prompt: str, seed: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:48] or "output"
    return f"{slug}_seed{seed}"


def save_result(result, output_dir: Path, stem: str, fps: int = 16) -> Path:
    """PNG for images, MP4 (imageio-ffmpeg) for videos; returns the written path. Without an MP4
    writer the frames are kept as numbered PNGs in ``<stem>_frames/``, with a warning: a video
    that took minutes to make is never lost to a missing package."""
    import importlib.util

    output_dir.mkdir(parents=True, exist_ok=True)
    frames = getattr(result, "frames", None)
    if frames is not None:
        import imageio.v2 as imageio
        import numpy as np

        video = frames[0]
        arrays = [np.asarray(f) for f in video] if isinstance(video, list) else list(np.asarray(video))
        arrays = [(a * 255).round().clip(0, 255).astype("uint8") if a.dtype != np.uint8 else a for a in arrays]
        if importlib.util.find_spec("imageio_ffmpeg") is None:
            folder = output_dir / f"{stem}_frames"
            folder.mkdir(exist_ok=True)
            for i, a in enumerate(arrays):
                imageio.imwrite(folder / f"{i:05d}.png", a)
            log.warning("imageio-ffmpeg is not installed, so no MP4: wrote the %d frames as PNGs in %s "
                        "(pip install imageio-ffmpeg)", len(arrays), folder)
            return folder
        path = output_dir / f"{stem}.mp4"
        # Tiny test frames are not multiples of 16; let ffmpeg keep the size as it is.
        imageio.mimwrite(path, arrays, fps=fps, macro_block_size=1)
        return path
    image = result.images[0]
    path = output_dir / f"{stem}.png"
    image.save(path)
    return path


def apply_run_options(pipe, platform: Platform, *, dit_cpu_offload: bool = False, pipeline_cpu_offload: bool = False,
                      dit_layerwise_offload: bool = False, compile: bool = False) -> None:
    """Offload and compile the loaded pipeline, the same way for generate and bench."""
    apply_offload(pipe, platform, dit_cpu_offload=dit_cpu_offload, pipeline_cpu_offload=pipeline_cpu_offload,
                  dit_layerwise_offload=dit_layerwise_offload)
    if compile:
        for name in transformer_names(pipe):
            pipe.components[name].compile()
