"""Run one mutated checkpoint through diffgen and judge the outcome against an independent decode.

The decode is written here from the formats' definitions: tensors read by the safetensors library,
FP8 e4m3 times its per-tensor, per-row, per-shard or block scale, NVFP4 as E2M1 codes (low nibble
first) times the e4m3 block scale per 16 and the global ``weight_scale_2``. A load that succeeds
must give every tensor the decoded value, every scale finite and positive, and every quantized
layer an output close to ``x @ W^T + b`` with W decoded this way.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from .case import BENIGN, ERROR, Mutation

FAILURES = ("traceback", "unnamed-error", "silent", "refused-benign", "inconsistent", "hang", "killed")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
SCALE_LEAVES = ("weight_scale", "weight_scale_inv", "input_scale", "weight_scale_2")
# The reference methods quantize activations too (NVFP4: to E2M1 per 16; FP8 blocks: per 1x128);
# against the exact product with the decoded weight that costs up to ~15% of the output's norm on
# random inputs. A layer read with wrong scales or shifted bytes is off by far more.
LAYER_TOLERANCE = 0.3


def decode_files(files: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for path in files:
        if path.suffix != ".safetensors":  # a pickle: torch's restricted unpickler, the usual nesting
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            out.update({k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)})
            continue
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def dequantize(prefix: str, tensors: dict, block: tuple[int, int], per_shard: bool) -> torch.Tensor | str:
    """The 16-bit weight a quantized layer's tensors define, or why they define none."""
    weight = tensors.get(f"{prefix}.weight")
    if weight is None:
        return "no weight"
    if weight.dtype == torch.float8_e4m3fn:
        w = weight.float()
        n, k = w.shape
        if f"{prefix}.weight_scale_inv" in tensors:
            s = tensors[f"{prefix}.weight_scale_inv"].float()
            bn, bk = block
            grid = (-(-n // bn), -(-k // bk))
            if [d for d in s.shape if d != 1] != [d for d in grid if d != 1]:  # [1] and [1, 1] are one grid
                return f"block scale {tuple(s.shape)} is not the {block} grid of {n}x{k}"
            s = s.reshape(grid)
            return w * s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        s = tensors.get(f"{prefix}.weight_scale")
        s = torch.ones(()) if s is None else s.float().reshape(-1)
        if s.numel() == 1:
            return w * s.reshape(())
        if s.numel() == n:
            return w * s[:, None]
        if per_shard and s.numel() and n % s.numel() == 0:
            return w * s.repeat_interleave(n // s.numel())[:, None]
        return f"{s.numel()} weight scales for {n} rows"
    if weight.dtype == torch.uint8:
        scale, scale_2 = tensors.get(f"{prefix}.weight_scale"), tensors.get(f"{prefix}.weight_scale_2")
        if scale is None or scale_2 is None or scale.dtype != torch.float8_e4m3fn or scale_2.numel() != 1:
            return "NVFP4 weight without an e4m3 weight_scale and a single weight_scale_2"
        codes = torch.stack([weight & 0x0F, weight >> 4], dim=-1).reshape(weight.shape[0], -1).long()
        values = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
        if scale.shape[0] != values.shape[0] or scale.shape[1] * 16 != values.shape[1]:
            return f"block scale {tuple(scale.shape)} does not cover {tuple(values.shape)} codes per 16"
        return values * scale.float().repeat_interleave(16, 1) * scale_2.float().reshape(())
    return f"a quantized layer's weight is {weight.dtype}"


def _named(message: str, mutation: Mutation, seed_tensors: dict) -> bool:
    """The message names the place: what the mutation touched (its hints), or a tensor, a config key
    or a file of the checkpoint."""
    if not mutation.hints or any(h and h in message for h in mutation.hints):
        return True
    return any(f"{name}" in message for name in seed_tensors) or any(
        f in message for f in ("config.json", ".safetensors", "index.json"))


def run_case(case: Path, mutation: Mutation, seed_tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(outcome, detail): outcome is ``refused``, ``loaded`` or one of FAILURES."""
    import diffgen
    from diffgen.errors import DiffgenError

    path = mutation.path or str(case)
    kwargs = {"weights_path": mutation.weights_path, "device": "cpu",
              "allow_pickle": mutation.extra.get("allow_pickle", False)}
    inspect_error = None
    try:
        diffgen.inspect(path, **kwargs)
    except DiffgenError as exc:
        inspect_error = str(exc)
    except Exception:  # noqa: BLE001 - any other exception is what the fuzzer hunts
        return "traceback", "inspect: " + traceback.format_exc(limit=-3)
    try:
        # Without rewrites: a fused Q/K/V holds tensors no file names; the rewrites have their own tests.
        model = diffgen.load_transformer(path, rewrites=False, **kwargs)
    except DiffgenError as exc:
        message = str(exc)
        if not _named(message, mutation, seed_tensors):
            return "unnamed-error", f"{type(exc).__name__}: {message[:300]}"
        if mutation.expect == BENIGN:
            return "refused-benign", f"{type(exc).__name__}: {message[:300]}"
        return "refused", type(exc).__name__
    except Exception:  # noqa: BLE001
        return "traceback", "load: " + traceback.format_exc(limit=-3)
    if inspect_error is not None:
        return "inconsistent", f"inspect refused ({inspect_error[:200]}) but the load succeeded"
    if mutation.expect == ERROR:
        return "silent", "loaded, but the mutation makes the checkpoint invalid"
    problem = check_loaded(model, case, mutation, seed_tensors)
    return ("silent", problem) if problem else ("loaded", "")


def check_loaded(model, case: Path, mutation: Mutation, seed_tensors: dict) -> str | None:
    """What is wrong with a successful load, or None."""
    from diffgen.linear import QuantLinear

    files = [Path(f) for f in model.diffgen_plan.source.files]
    if not mutation.outside and any(not f.resolve().is_relative_to(case.resolve()) for f in files):
        return f"read files outside the checkpoint: {files}"
    try:
        decoded = decode_files(files)
    except Exception as exc:  # noqa: BLE001 - the safetensors library refuses what diffgen read
        return f"the safetensors library refuses a file diffgen loaded: {exc}"
    if mutation.expect == BENIGN:
        if decoded.keys() != seed_tensors.keys():
            return "a benign rewrite changed the set of tensors"
        for name, tensor in seed_tensors.items():
            if not torch.equal(decoded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)):
                return f"a benign rewrite changed {name}"
    config = model.diffgen_plan.config
    per_shard = config is not None and config.param("checkpoint_format") == "modelopt"
    state = model.state_dict()
    for name, got in state.items():
        want = decoded.get(name)
        if want is None:
            if name.endswith(".weight_scale") and torch.equal(got.float(), torch.ones_like(got, dtype=torch.float)):
                continue  # an FP8 weight stored without a scale has a scale of one
            return f"{name} was not in the files but holds a value"
        if got.numel() != want.numel() and per_shard and want.numel() and name.endswith(("weight_scale", "input_scale")):
            # ModelOpt's one scale per fused shard: weight scales spread over each shard's rows, the
            # input scale is the largest (modelopt.py's format description)
            want = want.float().max() if name.endswith("input_scale") else \
                want.float().reshape(-1).repeat_interleave(max(got.numel() // want.numel(), 1))
        if got.numel() != want.numel():
            return f"{name} has {got.numel()} elements, the file {want.numel()}"
        if got.is_floating_point() and want.is_floating_point() and got.element_size() > 1 and want.element_size() > 1:
            if not torch.equal(got.reshape(-1), want.reshape(-1).to(got.dtype)):
                return f"{name} differs from the file's value"
            if not bool(torch.isfinite(got).all()):
                return f"{name} holds NaN or infinity"
        elif not torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).contiguous().view(torch.uint8)):
            return f"{name} differs from the file's bytes"
        if name.rsplit(".", 1)[-1] in SCALE_LEAVES:
            values = got.float()
            block = got.dtype == torch.float8_e4m3fn
            if not bool(torch.isfinite(values).all()) or bool((values < 0).any() if block else (values <= 0).any()):
                return f"scale {name} is not finite and positive: {values.reshape(-1)[:4].tolist()}"
            if not math.isfinite(float(values.max()) * 448 * 6):
                return f"scale {name} overflows float32 times the largest code"
    block = (128, 128)
    if config is not None and config.param("block"):
        block = tuple(config.param("block"))
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        w = dequantize(name, decoded, block, per_shard)
        if isinstance(w, str):
            return f"layer {name} loaded, but its tensors define no weight: {w}"
        w = w[:, :module.in_features]
        x = torch.randn(2, module.in_features, generator=generator)
        input_scale = decoded.get(f"{name}.input_scale")
        if input_scale is not None:  # a static scale clips inputs beyond the calibrated amax: stay inside
            amax = float(input_scale.float().max()) * (448 * 6 if decoded[f"{name}.weight"].dtype == torch.uint8 else 448)
            x = x * (0.5 * amax / float(x.abs().max()))
        with torch.no_grad():
            y = module(x).float()
        ref = F.linear(x, w, None if module.bias is None else module.bias.float())
        y, ref = y.double(), ref.double()  # a huge static input scale makes huge inputs: no fp32 overflow here
        err = float((y - ref).norm() / ref.norm().clamp_min(1e-300))
        if not err <= LAYER_TOLERANCE:
            return f"layer {name} computes something else than its tensors define (relative error {err:.3g})"
    return None
