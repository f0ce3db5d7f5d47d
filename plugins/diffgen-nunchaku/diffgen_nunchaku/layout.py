"""A nunchaku SVDQuant checkpoint, streamed into diffusers' names and diffgen's plain layouts.

Runs as a layout repack (every target kind, the planner's meta pass included; ``config`` is
None there): the names become diffusers' (``names.py``), tile-packed tensors become plain
(``packing.py``), fused linears are split, FLUX single blocks' two ``proj_out`` halves are merged
back into one linear of two input parts, and AWQ modulation rows are put back in diffusers' order
with the folded "+1" of ``(1 + scale)`` taken out of the bias. Per SVDQ linear it yields:
  qweight uint8 [N, K/2], wscales [N, K/G], smooth_factor [K], proj_down [r, K], proj_up [N, r],
  bias [N] (when the diffusers linear has one), and for fp4 wcscales [P, N], wtscale [P]
  (P = input parts: 2 for FLUX single blocks' proj_out, else 1);
per AWQ linear: qweight uint8 [N, K/2] (unsigned codes), wscales [N, K/64], wzeros [N, K/64], bias.
diffusers' ``nunchaku_lite`` stores the same packed tensors per diffusers linear (no renaming,
splitting or reordering; AWQ told by its int32 ``qweight``). A module's bias and scales wait for
its ``qweight`` (or 16-bit ``weight``), which says how they are packed. The halves of a merged
``proj_out`` wait for each other.
"""

from __future__ import annotations

from typing import Iterator

import torch

from diffgen.errors import LoadError
from diffgen.quant import RepackTarget, TensorStream

from . import packing
from .detect import lite_config
from .names import Rule, match, split_name

_ROW_LEAVES = ("qweight", "wscales", "wzeros", "proj_up", "bias", "weight")  # cut along output rows
# Leaves whose unpacking depends on the module's kind (SVDQ, AWQ, 16-bit), which its qweight or
# weight says: they wait for it (small tensors; the order of a file's tensors is the writer's).
WAIT_FOR_KIND = ("bias", "wscales", "wzeros")


def _unpack_svdq(leaf: str, t: torch.Tensor) -> torch.Tensor | None:
    """One SVDQ W4A4 tensor in the plain layout; None for a leaf that is dropped."""
    if leaf == "smooth_factor_orig":
        return None  # the calibration's original smoothing; the kernels use smooth_factor
    if leaf == "qweight":
        return t if t.dtype == torch.uint8 else packing.unpack_qweight(t)
    if leaf == "wscales":
        return packing.unpack_fp4_scales(t) if t.dtype == torch.float8_e4m3fn else packing.unpack_scales(t)
    if leaf in ("proj_down", "proj_up"):
        return packing.unpack_lowrank(t, down=leaf == "proj_down")
    if leaf in ("smooth_factor", "bias"):
        return packing.unpack_vector(t)
    if leaf == "wcscales":
        return packing.unpack_vector(t).reshape(1, -1)
    if leaf == "wtscale":
        return t.reshape(1).to(torch.float32)
    return t


def _interleaved_to_chunks(t: torch.Tensor, chunks: int) -> torch.Tensor:
    """Rows stored d * chunks + c -> diffusers' c * dim + d."""
    dim = t.shape[0] // chunks
    return t.reshape(dim, chunks, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _unpack_awq(leaf: str, t: torch.Tensor, rule: Rule | None, in_features: int | None) -> torch.Tensor:
    """One AWQ tensor in the plain layout. Without a ``rule`` (a linear under its diffusers name, as
    diffusers' nunchaku_lite stores them) its rows are in diffusers' order and the bias as it is."""
    chunks = rule.chunks if rule is not None else 1
    if leaf == "qweight":
        return _interleaved_to_chunks(packing.unpack_awq_qweight(t), chunks)
    if leaf in ("wscales", "wzeros"):
        groups = in_features // 64 if in_features else t.shape[0]
        # deepcompressor pads the group count to a multiple of 16, nunchaku's loaders do not: accept both
        return _interleaved_to_chunks(t[:groups].t().contiguous(), chunks)
    if leaf == "bias" and rule is not None:
        bias = _interleaved_to_chunks(t.float(), chunks)
        dim = bias.shape[0] // chunks
        for c in {1, chunks - 2}:  # the scale chunks: nunchaku folds the "1 +" of (1 + scale) into them
            bias[c * dim:(c + 1) * dim] -= 1
        return bias
    return t


def _merge_parts(leaf: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Two SVDQ linears on consecutive input slices whose outputs add -> one linear."""
    a, b = parts
    if leaf in ("qweight", "wscales", "proj_up", "weight"):
        return torch.cat([a, b], dim=1)
    if leaf == "smooth_factor":
        return torch.cat([a, b])
    if leaf == "proj_down":  # block diagonal: each half's rank reads only its own inputs
        down = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1] + b.shape[1])
        down[: a.shape[0], : a.shape[1]] = a
        down[a.shape[0]:, a.shape[1]:] = b
        return down
    if leaf == "bias":
        return a.float() + b.float()
    if leaf in ("wcscales", "wtscale"):
        return torch.cat([a, b])
    raise LoadError(f"SVDQuant: cannot merge {leaf!r} of the two proj_out halves")


class NunchakuToDiffusers:
    def __init__(self, target: RepackTarget):
        self.target = target
        self.kind: dict[str, str] = {}  # raw module -> "svdq" | "awq" once its qweight is seen
        self.held: dict[str, dict[str, torch.Tensor]] = {}  # module -> leaves waiting for its kind
        self.halves: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        self.seen: dict[str, dict[str, tuple]] = {}  # raw module -> leaf -> (rows, dtype, device)
        # diffusers' nunchaku_lite names every tensor by its diffusers linear: no nunchaku name rules
        # (FLUX's norm1.linear is a name in both, with rows in another order in nunchaku's files)
        self.lite = lite_config(target.model_config.get("quantization_config")) is not None

    def match(self, module: str):
        return None if self.lite else match(self.target.model_class, module)

    def fp4_defaults(self) -> Iterator[tuple[str, torch.Tensor]]:
        """nunchaku's Python loaders default an nvfp4 layer's missing wcscales to ones and wtscale to
        1.0 (they may be absent from Qwen-Image and Z-Image files); do the same."""
        for module, leaves in self.seen.items():
            scales, qweight = leaves.get("wscales"), leaves.get("qweight")
            if scales is None or qweight is None or scales[1] != torch.float8_e4m3fn:
                continue
            n, _, device = qweight
            if "wcscales" not in leaves:
                yield from self.convert(module, "wcscales", torch.ones(n, device=device))
            if "wtscale" not in leaves:
                yield from self.convert(module, "wtscale", torch.ones(1, device=device))

    def in_features(self, module: str) -> int | None:
        shape = self.target.expected.get(f"{module}.weight")
        return shape[0][1] if shape else None

    def stream(self, tensors: TensorStream) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            module, leaf = split_name(name)
            # only what fp4_defaults needs: holding the tensors would keep the whole checkpoint alive
            rows = tensor.shape[0] if tensor.dim() else 1  # per-tensor scales of other formats are 0-d
            self.seen.setdefault(module, {})[leaf] = (rows, tensor.dtype, tensor.device)
            if leaf == "qweight":
                found = self.match(module)
                # AWQ by nunchaku's module name, or (diffusers' names) by its int32 words
                awq = (found[0].kind == "awq") if found else tensor.dtype == torch.int32
                self.kind[module] = "awq" if awq else "svdq"
            elif leaf == "weight":
                self.kind.setdefault(module, "plain")
            if leaf in WAIT_FOR_KIND and module not in self.kind:
                self.held.setdefault(module, {})[leaf] = tensor
                continue
            yield from self.convert(module, leaf, tensor)
            if module in self.held and module in self.kind:
                for held_leaf, held in self.held.pop(module).items():
                    yield from self.convert(module, held_leaf, held)
        for module, leaves in self.held.items():  # neither weight nor qweight came
            for leaf, tensor in leaves.items():
                yield from self.convert(module, leaf, tensor)
        yield from self.fp4_defaults()
        if self.halves:
            names = ", ".join(f"{m}.{leaf}" for m, leaf in self.halves)
            raise LoadError(f"SVDQuant: half of a FLUX single block's proj_out is missing ({names})")

    def convert(self, module: str, leaf: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        found = self.match(module)
        kind = self.kind.get(module)
        rule = found[0] if found else None
        if kind == "awq" or (rule is not None and rule.kind == "awq" and leaf in ("qweight", "wscales", "wzeros")):
            t = _unpack_awq(leaf, t, rule, self.in_features(module))
        elif kind == "svdq" or leaf in ("smooth_factor", "smooth_factor_orig", "proj_down", "proj_up",
                                         "wcscales", "wtscale", "wscales"):
            t = _unpack_svdq(leaf, t)
            if t is None:
                return
        if found is None:
            yield from self.place(module, leaf, t)
            return
        rule, targets = found
        if rule.kind == "split":
            yield from self.split(module, leaf, t, targets)
        elif rule.kind == "part":
            held = self.halves.setdefault((targets[0], leaf), {})
            held[rule.part] = t
            if len(held) == 2:
                del self.halves[(targets[0], leaf)]
                yield from self.place(targets[0], leaf, _merge_parts(leaf, [held[0], held[1]]))
        else:
            yield from self.place(targets[0], leaf, t)

    def split(self, module: str, leaf: str, t: torch.Tensor, targets: list[str]):
        if leaf not in _ROW_LEAVES and leaf != "wcscales":
            for name in targets:  # the input side is shared: smoothing, proj_down, wtscale
                yield from self.place(name, leaf, t)
            return
        dim = 1 if leaf == "wcscales" else 0
        rows = t.shape[dim]
        widths = [self.target.expected.get(f"{n}.weight", ((None,),))[0][0] for n in targets]
        if None in widths:
            widths = [rows // len(targets)] * len(targets)
        if sum(widths) != rows:
            raise LoadError(f"SVDQuant tensor {module}.{leaf} {tuple(t.shape)} does not split into "
                            f"{', '.join(targets)} (rows {widths})")
        for name, piece in zip(targets, torch.split(t, widths, dim=dim)):
            yield from self.place(name, leaf, piece.contiguous())

    def place(self, module: str, leaf: str, t: torch.Tensor):
        name = f"{module}.{leaf}" if module else leaf
        expected = self.target.expected
        if leaf == "bias" and expected and f"{module}.weight" in expected and name not in expected:
            # nunchaku writes zeros for a linear without bias (Z-Image); anything else would be lost
            if t.device.type != "meta" and bool(t.ne(0).any()):
                raise LoadError(f"SVDQuant tensor {name} is not zero, but {self.target.model_class}'s "
                                f"{module} has no bias")
            return
        yield name, t


def nunchaku_to_diffusers(tensors: TensorStream, target: RepackTarget) -> TensorStream:
    return NunchakuToDiffusers(target).stream(tensors)
