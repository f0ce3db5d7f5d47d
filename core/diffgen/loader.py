"""Load one diffusers transformer through the plugins: plan, stream the weights in, rewrite.

The plan (``diffgen.plan``) builds the model on the meta device with the planned linears in place;
buffers computed at init (rotary tables) stay real. Tensors then stream shard by shard through
``repack_checkpoint`` onto the target device, and each quantized layer is processed (converted, or
quantized online) as soon as its last tensor arrives, so the full 16-bit model never sits on the
device. Last, the plugins' rewrites (``diffgen.rewrites``) are offered every module.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from .checkpoint import open_checkpoint
from .errors import LoadError
from .finite import FiniteChecks
from .linear import QuantLinear
from .plan import LoadPlan, plan
from .platform import Platform, resolve
from .plugins import PluginHost, get_plugin_host
from .quant import layer_group, quant_request
from .readahead import read_ahead
from .rewrites import apply_rewrites
from .safetensors_header import checked_reads, pinned_reads

log = logging.getLogger("diffgen")
Progress = Callable[[int, int, int, int], None]  # (bytes loaded, bytes in total, shard, shards)
# How far the reads (and the plugins' repacks) may run ahead of the copies to the device, in bytes;
# 0 reads and copies in turn on one thread.
READ_AHEAD_BYTES = 512 << 20


def warn_fallbacks(planned: LoadPlan) -> None:
    """One line per (method, reason) when quantized layers do not run natively."""
    seen: dict[str, list[str]] = {}
    for d in planned.decisions:
        if d.action == "quantize" and d.method.kind != "native":
            seen.setdefault(d.reason, []).append(layer_group(d.layer.name))
    for reason, groups in seen.items():
        log.warning("%d quantized layers run %s; expect them to be slower than 16-bit, not faster",
                    len(groups), reason)


def fit_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """``tensor`` in ``shape``; singleton dimensions carry no meaning ([] vs [1], [N] vs [N, 1])."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    same = tensor.numel() == _numel(shape) and [s for s in tensor.shape if s != 1] == [s for s in shape if s != 1]
    if not same:
        raise LoadError(f"tensor {name!r} in {where} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(shape)}")
    return tensor.reshape(shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _fit(name: str, tensor: torch.Tensor, want: torch.Tensor, where: str) -> torch.Tensor:
    tensor = fit_shape(name, tensor, tuple(want.shape), where)
    if tensor.dtype != want.dtype:
        floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        if tensor.dtype in floats and want.dtype in floats:
            return tensor.to(want.dtype)
        raise LoadError(f"tensor {name!r} in {where} is {tensor.dtype}, but the model expects {want.dtype} "
                        "there (is the layer quantized in the checkpoint but kept 16-bit by the plan, or the "
                        "other way round? see `diffgen inspect`)")
    return tensor


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def _built_from(planned: LoadPlan) -> str:
    """Where the model's config came from: a misfit is the weights' fault or the config's."""
    root = getattr(planned.source, "root", None)
    return f"the model is built from {root / 'config.json' if root else 'its config.json'}"


def load_weights(planned: LoadPlan, *, host: PluginHost | None = None, progress: Progress | None = None,
                 check_weights: bool = True, split=None) -> None:
    """Fill ``planned.model`` from its source on ``planned.platform``'s device. ``check_weights``:
    refuse a tensor holding NaN or infinity (checked on the device, after the copy). ``split``
    (``diffgen.parallel.tp_load.SplitLoad``): the model was shrunk to one tensor-parallel rank's
    part; each arriving tensor is cut to that part before it is placed."""
    host = host or get_plugin_host()
    model, source, device = planned.model, planned.source, planned.platform.device
    expected = planned.expected() if split is None else split.full
    # The header already says which tensors the model has no place for: refuse before reading any
    # (a stray multi-GB tensor would otherwise be read first). The source is in the model's names
    # (diffgen.layout); repacks at load time reshape or add tensors, they do not rename.
    stray = [n for n in source.tensors if n not in expected]
    if stray:
        raise LoadError(f"the checkpoint does not fit {planned.model_class}: {len(stray)} unexpected (e.g. "
                        f"{', '.join(stray[:8])}). A checkpoint for another model, or a format whose plugin is not "
                        f"installed? ({source.describe()}; {_built_from(planned)})")
    tensors, target = (source.iter_tensors(), planned.target("runtime")) if split is None else \
        (split.stream(source), split.target)
    last_read: list[str] = []
    stream = _naming_the_file(host.repack_checkpoint(planned.config, _noting(tensors, last_read), target,
                                                     first=planned.claim.plugin if planned.claim else None),
                              last_read, source)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    checks = FiniteChecks(check_weights, device)
    # Onto a CUDA device, reads land in pinned memory and copies are DMAs that overlap the next read.
    cuda = torch.device(device).type == "cuda" and READ_AHEAD_BYTES > 0
    try:
        with pinned_reads(cuda), checked_reads(checks.enabled and not checks.on_device), checks.deferring():
            _stream_in(planned, read_ahead(stream, READ_AHEAD_BYTES), expected, quant, checks, progress, split)
        checks.finish()
    finally:
        checks.close()
        if cuda:
            torch.cuda.synchronize(device)
            empty = getattr(torch._C, "_host_emptyCache", None)  # frees the pinned blocks torch's host
            if empty is not None:                                 # allocator kept after the reads
                empty()
    for module in model.modules():  # buffers made at init (rotary tables) follow the weights
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != torch.device(device):
                module._buffers[key] = buf.to(device)


def _noting(tensors, last_read: list[str]):
    """The stream, each tensor's name noted as it is read."""
    for name, tensor in tensors:
        last_read[:] = [name]
        yield name, tensor


def _naming_the_file(stream, last_read: list[str], source):
    """A repack's stream whose LoadErrors (they name a tensor) also name the file being read."""
    it = iter(stream)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except LoadError as exc:
            if last_read and last_read[0] in source.tensors and str(source.file_of(last_read[0])) not in str(exc):
                raise LoadError(f"{exc} (file {source.file_of(last_read[0])})") from exc
            raise
        yield item


def _stream_in(planned: LoadPlan, stream, expected: dict, quant: dict, checks: FiniteChecks,
               progress: Progress | None, split=None) -> None:
    model, source, device = planned.model, planned.source, planned.platform.device
    pending = {n: {k for k in expected if k.rpartition(".")[0] == n} for n in quant}
    total = sum(i.nbytes for i in source.tensors.values())
    shard_of = {path: i + 1 for i, path in enumerate(source.files)}
    done, loaded, unexpected, shard = 0, set(), [], 1
    for name, tensor in stream:
        where = str(source.file_of(name)) if name in source.tensors else source.describe()
        if name in source.tensors:
            shard = shard_of.get(source.file_of(name), shard)
        if name not in expected:
            unexpected.append(name)
            continue
        if name in loaded:
            raise LoadError(f"tensor {name!r} arrives twice (second time from {where})")
        if split is None:
            placed = _fit(name, tensor, expected[name], where).to(device, non_blocking=True)
        else:  # the rank's slice first: only its bytes are read, converted and copied
            part = split.take(name, fit_shape(name, tensor, tuple(expected[name].shape), where))
            placed = _fit(name, part, split.expected[name], where).to(device, non_blocking=True)
        checks.submit(name, placed, where)
        _assign(model, name, placed)
        loaded.add(name)
        done += tensor.numel() * tensor.element_size()
        if progress:
            progress(done, total, shard, len(source.files))
        owner = name.rpartition(".")[0]
        if owner in pending:
            pending[owner].discard(name)
            if not pending[owner]:
                checks.before_processing()
                checks.where = where
                try:
                    quant[owner].method.process_weights_after_loading(quant[owner])
                except Exception as exc:
                    checks.finish()  # a NaN that arrived is the cause to name, if there is one
                    if isinstance(exc, LoadError):  # the method checked what arrived: say where it came from
                        raise LoadError(f"{exc} ({where})") from exc
                    raise
                del pending[owner]
    missing = [k for k, v in expected.items() if k not in loaded and v.device.type == "meta"]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:8])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:8])})")
        raise LoadError(f"the checkpoint does not fit {planned.model_class}: {'; '.join(parts)}. A checkpoint "
                        f"for another model, or a format whose plugin is not installed? ({source.describe()}; "
                        f"{_built_from(planned)})")


def _pin_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """diffusers reads ``model.dtype`` from the first float parameter, which may now be FP8."""
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"dtype": property(lambda self: dtype),
                                                  "__module__": cls.__module__})
    model.is_quantized = True  # diffusers then refuses .to(dtype), which would ruin FP8 weights


def load_transformer(path, *, weights_path=None, quantization: str | None = None,
                     quantization_ignored_layers=(), quantize_all_layers: bool = False,
                     quant_backend: str | None = None, device: str | Platform | None = None, dtype: str | torch.dtype = "auto",
                     allow_pickle: bool = False, progress: Progress | None = None,
                     rewrites: bool = True, check_weights: bool = True, enable_svdquant: bool = False,
                     quantization_precision: str | None = None, quantization_rank: int | None = None,
                     attention: str | None = None, tensor_parallel: tuple[int, int] | None = None) -> nn.Module:
    """Load one diffusers transformer through the plugins.

    ``path`` is a component directory (config.json + weights), a weights file or index, or an
    already-open source: anything with the :class:`~diffgen.checkpoint.CheckpointSource`
    interface (a benchmark serves tensors built in memory this way). ``path`` and ``weights_path``
    may be Hugging Face repo IDs (``owner/name/transformer``; see ``diffgen.hub``). ``device``: a
    device string (default: the first accelerator, else the CPU) or a Platform; ``dtype``: the compute dtype,
    ``"auto"`` for bf16 on accelerators and fp32 on the CPU. ``rewrites`` offers the model to the
    installed plugins' rewrites (fused Q/K/V, blocks that hand quantized linears their input
    ready-made; ``model.diffgen_rewrites`` names what was rewritten); False leaves the model as
    diffusers builds it. ``check_weights`` refuses tensors holding NaN or infinity (one pass on the
    device per tensor; False skips it). ``attention`` names an attention backend a plugin publishes
    (``diffgen.attention``: ``"fp8"`` from diffgen-cuda; None or ``"sdpa"``: diffusers' own); one
    that cannot run here is an error before any weight is read (``model.diffgen_attention``).
    ``tensor_parallel`` = (rank, size) loads only that tensor-parallel rank's part of each linear
    the model's plan splits (``diffgen.parallel.tp_load``; a layer that cannot split is refused
    before any weight is read); ``model.diffgen_tp_load`` says what was read.
    """
    from .attention import install_attention, resolve_attention_backend
    from .hub import resolve_component, resolve_weights

    if not hasattr(path, "iter_tensors"):
        path = resolve_component(path, weights=weights_path is None)
    if weights_path is not None:
        weights_path = resolve_weights(weights_path)
    platform, dtype = resolve(device, dtype)
    host = get_plugin_host()
    attention_backend = resolve_attention_backend(attention, platform)
    source = path if hasattr(path, "iter_tensors") else \
        open_checkpoint(path, weights_path=weights_path, allow_pickle=allow_pickle)
    request = quant_request(quantization, quantization_ignored_layers, quantize_all_layers=quantize_all_layers,
                            enable_svdquant=enable_svdquant, precision=quantization_precision, rank=quantization_rank)
    planned = plan(source, platform=platform, dtype=dtype, request=request, quant_backend=quant_backend, host=host)
    warn_fallbacks(planned)
    split = None
    if tensor_parallel is not None and tensor_parallel[1] > 1:
        from .parallel.tp_load import prepare

        split = prepare(planned, *tensor_parallel)
    load_weights(planned, host=host, progress=progress, check_weights=check_weights, split=split)
    model = planned.model
    if split is not None:
        model.diffgen_tp_load = {"rank": split.rank, "size": split.size, "bytes_read": split.bytes_read,
                                 "mapped": split.mapped}
    if planned.quantized():
        _pin_compute_dtype(model, dtype)
    model.eval().requires_grad_(False)
    model.diffgen_plan = planned
    model.diffgen_rewrites = apply_rewrites(model, host.rewrites(), platform, on_error=host.rewrite_failed) \
        if rewrites else {}
    install_attention(model, attention_backend, platform)
    return model
