"""How a run is split over several processes: SGLang-Diffusion's degrees, checked in one place.

``num_gpus = sp_degree * cfg_parallel_size * tp_size`` and ``sp_degree = ulysses_degree *
ring_degree``, as SGLang-Diffusion defines them. Context parallelism (Ulysses / Ring) and CFG
parallelism leave every linear whole, so they work with every linear method; tensor parallelism
shards the planned linears (FLUX.1 and Wan, with CFG parallel but not yet with Ulysses or Ring).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import DiffgenError

# Attention backends of diffusers 0.42 whose context-parallel path returns the log-sum-exp that
# Ring attention merges partial results with; diffusers' default ("native" SDPA) does not.
RING_BACKENDS = ("flash", "flash_hub", "_flash_3_hub", "_native_cudnn", "_native_flash", "sage")


class ParallelError(DiffgenError, ValueError):
    """Degrees that do not fit each other, the model, the sequence or the sampling."""


@dataclass(frozen=True)
class ParallelConfig:
    """SGLang-Diffusion's parallel flags. Leave a degree None to derive it from the others:
    ``sp_degree`` defaults to what ``num_gpus`` leaves after CFG and TP, ``ulysses_degree`` to
    ``sp_degree / ring_degree``."""

    num_gpus: int = 1
    sp_degree: int | None = None
    ulysses_degree: int | None = None
    ring_degree: int | None = None
    cfg_parallel_size: int = 1
    tp_size: int = 1

    def resolved(self) -> "ParallelConfig":
        """Every degree filled in and checked against the others; raises ParallelError."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ParallelError(f"--{f.name.replace('_', '-')} must be a positive integer, not {value!r}")
        if self.cfg_parallel_size not in (1, 2):
            raise ParallelError(f"--cfg-parallel-size is 1 or 2 (one process group per guidance branch: the "
                                f"conditional and the unconditional), not {self.cfg_parallel_size}")
        others = self.cfg_parallel_size * self.tp_size
        ulysses, ring, sp = self.ulysses_degree, self.ring_degree, self.sp_degree
        if sp is None:
            if ulysses is not None and ring is not None:
                sp = ulysses * ring
            elif self.num_gpus % others:
                raise ParallelError(f"--num-gpus {self.num_gpus} is not a multiple of --cfg-parallel-size x --tp-size "
                                    f"= {others}")
            else:
                sp = self.num_gpus // others
        if ulysses is None:
            ring = ring or 1
            if sp % ring:
                raise ParallelError(f"--ring-degree {ring} does not divide --sp-degree {sp}")
            ulysses = sp // ring
        elif ring is None:
            if sp % ulysses:
                raise ParallelError(f"--ulysses-degree {ulysses} does not divide --sp-degree {sp}")
            ring = sp // ulysses
        if ulysses * ring != sp:
            raise ParallelError(f"--sp-degree {sp} must equal --ulysses-degree x --ring-degree = {ulysses} x {ring}")
        if sp * others != self.num_gpus:
            raise ParallelError(f"the degrees use {sp * others} processes (sp {sp} x cfg {self.cfg_parallel_size} x "
                                f"tp {self.tp_size}) but --num-gpus is {self.num_gpus}; they must multiply to it")
        if self.tp_size > 1 and sp > 1:
            raise ParallelError(f"--tp-size {self.tp_size} with --sp-degree {sp}: diffgen does not combine tensor "
                                "parallelism with Ulysses or Ring attention yet (the attention would exchange the heads "
                                "of a split model); combine --tp-size with --cfg-parallel-size only")
        return ParallelConfig(self.num_gpus, sp, ulysses, ring, self.cfg_parallel_size, self.tp_size)

    @property
    def enabled(self) -> bool:
        return self.num_gpus > 1


def check_model(parallel: ParallelConfig, config: dict, where: str) -> None:
    """Refuse, before any weight is read, a degree the transformer's config cannot take: Ulysses
    exchanges whole attention heads, so its degree must divide the head count; context parallelism
    needs the model class to carry diffusers' ``_cp_plan`` (which inputs to split, which output to
    gather)."""
    import diffusers

    r = parallel.resolved()
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if r.tp_size > 1:
        check_tp_model(r.tp_size, name, config, where)
    if r.sp_degree == 1:
        return
    if cls is not None and getattr(cls, "_cp_plan", None) is None:
        raise ParallelError(f"{name} has no context-parallel plan in diffusers {diffusers.__version__} (_cp_plan), so "
                            f"--sp-degree {r.sp_degree} cannot split it ({where}); use --cfg-parallel-size 2")
    heads = config.get("num_attention_heads", config.get("n_heads"))
    if isinstance(heads, int) and heads % r.ulysses_degree:
        raise ParallelError(f"--ulysses-degree {r.ulysses_degree} does not divide the {heads} attention heads of "
                            f"{name} ({where}): Ulysses gives each process whole heads; pick a divisor of {heads}, "
                            f"or use --ring-degree for the rest")


# Transformer classes diffgen splits with tensor parallelism (diffgen.parallel.tp_load / tp_runtime).
TP_CLASSES = ("FluxTransformer2DModel", "WanTransformer3DModel")


def check_tp_model(size: int, name, config: dict, where: str) -> None:
    """Tensor parallelism runs on FLUX.1 and Wan, with whole attention heads per rank."""
    if name not in TP_CLASSES:
        raise ParallelError(f"--tp-size {size}: tensor parallelism is built for {', '.join(TP_CLASSES)} "
                            f"(FLUX.1, Wan) only, not {name} ({where}); use --ulysses-degree, --ring-degree or "
                            "--cfg-parallel-size, which keep every linear whole")
    heads = config.get("num_attention_heads")
    if isinstance(heads, int) and heads % size:
        raise ParallelError(f"--tp-size {size} does not divide the {heads} attention heads of {name} ({where}): "
                            "each rank computes whole heads")


def check_sequence(parallel: ParallelConfig, tokens: int, what: str) -> None:
    """Context parallelism gives each process an equal slice of every split sequence."""
    sp = parallel.resolved().sp_degree
    if sp > 1 and tokens % sp:
        raise ParallelError(f"--sp-degree {sp} does not divide the {tokens} tokens of {what}; choose a height, width "
                            f"or frame count that makes it a multiple of {sp}, or a smaller degree")
