"""Which quantized linears cost a model its accuracy, and which to keep 16-bit to pass a gate.

Inputs: the reference transformer (16-bit ``nn.Linear`` layers), the candidate's quantized modules
by dotted name (``QuantLinear``s taken from the candidate transformer, loaded without rewrites so
that names match one to one), and the transformer calls to replay (positional and keyword
arguments, as a pipeline made them; ``capture_calls`` records them). Nothing is copied: the
candidate's modules are swapped into the reference model one layer group at a time
(``quant.layer_group``: ``transformer_blocks.*.attn.to_q``) and swapped back.

Measured (y: the reference transformer's output, y': the output under test, per call; a metric
over the calls is the worst one, the lowest cosine and the highest relative L2):
- per layer, its own error: forward hooks in one reference run hand each linear's input to its
  quantized module as well; cosine and relative L2 ``|q - o| / |o|`` of the quantized output q
  against the 16-bit output o, summed over all calls (error of that layer alone, on exact inputs);
- per group, ``alone``: only that group quantized, the rest 16-bit;
- ``all_quantized``: every candidate layer quantized (what the candidate runs);
- per group, ``kept``: everything quantized but that group, and ``impact`` = kept cosine minus
  the all-quantized cosine (what keeping the group 16-bit buys); groups are sorted by it;
- a suggestion: groups taken greedily in order of impact and kept 16-bit until the whole-model
  cosine reaches ``min_cosine``; each step is measured, not estimated. The suggestion is given as
  glob patterns (checkpoint ignore lists, ``DEFAULT_ONLINE_IGNORES``) and as the
  ``--quantization-ignored-layers`` patterns that select exactly the group's layers (a containment
  pattern where one does, else the glob, which that flag also takes).
Cost per replayed call: 2 + 2 G model passes, and up to G more for the suggestion (G groups);
memory: the reference and the candidate's quantized weights, nothing more.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..linear import QuantLinear, replace_module
from ..quant import layer_group, matches_user_pattern

Call = tuple[tuple, dict]


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def capture_calls(module: nn.Module, run: Callable[[], Any]) -> list[Call]:
    """The (args, kwargs) of every call of ``module`` while ``run()`` runs, cloned to the CPU."""
    calls: list[Call] = []

    def hook(_module, args, kwargs):
        calls.append(_map_tensors((tuple(args), dict(kwargs)), lambda t: t.detach().to("cpu", copy=True)))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return calls


def spread(calls: list[Call], count: int | None) -> list[Call]:
    """``count`` calls evenly spread over ``calls`` (first and last included); all when None."""
    if count is None or count >= len(calls):
        return list(calls)
    if count <= 1:
        return calls[:max(count, 0)]
    return [calls[round(i * (len(calls) - 1) / (count - 1))] for i in range(count)]


def quantized_modules(reference: nn.Module, candidate: nn.Module) -> dict[str, nn.Module]:
    """The candidate's quantized linears whose name is a 16-bit ``nn.Linear`` in the reference."""
    plain = {n for n, m in reference.named_modules() if type(m) is nn.Linear}
    return {n: m for n, m in candidate.named_modules() if isinstance(m, QuantLinear) and n in plain}


def _output_tensor(out: Any) -> torch.Tensor:
    """Every tensor of a transformer's output, flattened into one float32 CPU vector."""
    if hasattr(out, "sample"):
        out = out.sample
    tensors: list[torch.Tensor] = []
    _map_tensors(out, lambda t: tensors.append(t.detach().flatten().to("cpu", torch.float32)) or t)
    return torch.cat(tensors)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_calls(model: nn.Module, calls: list[Call]) -> list[torch.Tensor]:
    device = _device(model)
    outputs = []
    with torch.inference_mode():
        for args, kwargs in calls:
            args, kwargs = _map_tensors((args, kwargs), lambda t: t.to(device))
            outputs.append(_output_tensor(model(*args, **kwargs)))
    return outputs


class _Stats:
    """Running <o, q>, |o|^2, |q|^2 and |q - o|^2 in float64."""

    def __init__(self):
        self.oq = self.oo = self.qq = self.dd = 0.0

    def add(self, o: torch.Tensor, q: torch.Tensor) -> None:
        o, q = o.detach().flatten().double(), q.detach().flatten().double()
        d = q - o
        self.oq += float(o @ q)
        self.oo += float(o @ o)
        self.qq += float(q @ q)
        self.dd += float(d @ d)

    def cosine(self) -> float:
        if self.oo == 0.0 and self.qq == 0.0:
            return 1.0
        if self.oo == 0.0 or self.qq == 0.0:
            return 0.0
        return self.oq / math.sqrt(self.oo * self.qq)

    def rel_l2(self) -> float:
        return math.sqrt(self.dd / self.oo) if self.oo else (0.0 if self.dd == 0.0 else math.inf)


def agreement(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> dict[str, float]:
    """Cosine (lowest and mean over calls) and relative L2 (highest) of ``outputs`` against ``reference``."""
    per_call = []
    for o, q in zip(reference, outputs):
        stats = _Stats()
        stats.add(o, q)
        per_call.append(stats)
    cosines = [s.cosine() for s in per_call]
    return {"cosine": min(cosines), "mean_cosine": sum(cosines) / len(cosines),
            "rel_l2": max(s.rel_l2() for s in per_call)}


class _Swapped:
    """Within ``with``: the named modules of ``model`` replaced by ``modules``; restored after."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]):
        self.model, self.modules, self.saved = model, modules, {}

    def __enter__(self):
        for name, module in self.modules.items():
            self.saved[name] = self.model.get_submodule(name)
            replace_module(self.model, name, module)
        return self

    def __exit__(self, *exc):
        for name, module in self.saved.items():
            replace_module(self.model, name, module)


def layer_errors(model: nn.Module, candidates: dict[str, nn.Module], calls: list[Call]
                 ) -> tuple[list[torch.Tensor], dict[str, _Stats]]:
    """One reference run: its outputs, and each candidate layer's error on the reference's own inputs."""
    stats = {name: _Stats() for name in candidates}
    handles = []
    for name, quantized in candidates.items():
        def hook(_module, args, output, name=name, quantized=quantized):
            stats[name].add(output, quantized(args[0]))
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        outputs = run_calls(model, calls)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, stats


def cli_patterns(group_layers: list[str], all_layers: Iterable[str]) -> list[str] | None:
    """``--quantization-ignored-layers`` patterns that select exactly ``group_layers`` among
    ``all_layers``: the shortest dotted suffix the names share (containment), else the group's glob
    (``layer_group``: a wildcard makes the pattern a glob on the full name), else the full names one
    by one; None if none does."""
    group, everyone = set(group_layers), set(all_layers) | set(group_layers)

    def selects(pattern: str) -> set[str]:
        return {n for n in everyone if matches_user_pattern(pattern, n)}

    parts = group_layers[0].split(".")
    for start in range(len(parts) - 1, -1, -1):
        pattern = ".".join(parts[start:])
        if all(name.endswith("." + pattern) or name == pattern for name in group) and selects(pattern) == group:
            return [pattern]
    globs = sorted({layer_group(name) for name in group_layers})
    if set().union(*(selects(g) for g in globs)) == group:
        return globs
    if all(selects(name) <= group for name in group_layers):
        return sorted(group_layers)
    return None


def sensitivity(model: nn.Module, candidates: dict[str, nn.Module], calls: list[Call], *,
                min_cosine: float | None = None, method_names: dict[str, str] | None = None) -> dict:
    """The per-layer and per-group report described in the module docstring, JSON-ready.

    ``model``: the reference (16-bit linears at the candidates' names; left as it was found);
    ``candidates``: dotted name -> quantized module; ``calls``: transformer calls to replay;
    ``min_cosine``: the gate the suggestion must reach (None: no suggestion).
    """
    if not candidates:
        raise ValueError("the candidate quantizes no linear layer of the reference: nothing to rank")
    if not calls:
        raise ValueError("no transformer calls to replay")
    reference, stats = layer_errors(model, candidates, calls)
    groups: dict[str, list[str]] = {}
    for name in candidates:
        groups.setdefault(layer_group(name), []).append(name)

    def measure(names: Iterable[str]) -> dict[str, float]:
        with _Swapped(model, {n: candidates[n] for n in names}):
            return agreement(reference, run_calls(model, calls))

    whole = measure(candidates)
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    rows = []
    for group, names in groups.items():
        alone = measure(names)
        kept = measure(n for n in candidates if layer_group(n) != group)
        worst = min(names, key=lambda n: stats[n].cosine())
        rows.append({"group": group, "layers": len(names), "impact": kept["cosine"] - whole["cosine"],
                     "kept_cosine": kept["cosine"], "alone_cosine": alone["cosine"],
                     "alone_rel_l2": alone["rel_l2"], "worst_layer": worst,
                     "worst_layer_cosine": stats[worst].cosine(),
                     "cli_patterns": cli_patterns(names, linears)})
    rows.sort(key=lambda r: (-r["impact"], r["alone_cosine"]))
    layers = sorted(({"name": n, "group": layer_group(n), "cosine": s.cosine(), "rel_l2": s.rel_l2(),
                      **({"method": method_names[n]} if method_names and n in method_names else {})}
                     for n, s in stats.items()), key=lambda r: (r["cosine"], -r["rel_l2"]))
    return {"tool": "diffgen sensitivity", "model_class": type(model).__name__, "calls": len(calls),
            "quantized_layers": len(candidates),
            "metric": "cosine of the transformer output against the reference's, lowest over the calls",
            "all_quantized": whole, "groups": rows, "layers": layers,
            "suggestion": None if min_cosine is None else suggest(rows, groups, whole, measure, min_cosine)}


def suggest(rows: list[dict], groups: dict[str, list[str]], whole: dict, measure, min_cosine: float) -> dict:
    """Keep groups 16-bit in order of impact until the measured cosine reaches ``min_cosine``."""
    kept: list[str] = []
    cosine, steps = whole["cosine"], []
    for row in rows:
        if cosine >= min_cosine:
            break
        kept.append(row["group"])
        held = {n for g in kept for n in groups[g]}
        cosine = measure(n for g, names in groups.items() for n in names if n not in held)["cosine"]
        steps.append({"keep": row["group"], "cosine": cosine})
    patterns = [row["cli_patterns"] for row in rows if row["group"] in kept]
    return {"min_cosine": min_cosine, "passed": cosine >= min_cosine, "cosine": cosine, "ignore": kept,
            "steps": steps, "quantization_ignored_layers":
                None if any(p is None for p in patterns) else [p for ps in patterns for p in ps],
            "layers_kept": sum(len(groups[g]) for g in kept)}


def format_report(result: dict, top: int = 20) -> str:
    """The groups by impact, the worst layers, and the suggestion, as a table."""
    whole = result["all_quantized"]
    lines = [f"{result['model_class']}: {result['quantized_layers']} quantized linears in {len(result['groups'])} "
             f"groups, {result['calls']} transformer calls; all quantized: cosine {whole['cosine']:.6f}, "
             f"rel L2 {whole['rel_l2']:.4g}",
             "impact: the cosine gained by keeping the group 16-bit (kept: all else quantized); alone: only "
             "the group quantized; worst layer: its layer with the largest own error",
             f"{'layer group':<48} {'n':>3} {'impact':>10} {'kept cos':>10} {'alone cos':>10} "
             f"{'worst layer cos':>16}"]
    for r in result["groups"][:top]:
        lines.append(f"{r['group']:<48} {r['layers']:>3} {r['impact']:>10.3g} {r['kept_cosine']:>10.6f} "
                     f"{r['alone_cosine']:>10.6f} {r['worst_layer_cosine']:>16.6f}")
    lines.append(f"{'layer (own error on the reference inputs)':<48} {'cosine':>10} {'rel L2':>10}")
    for r in result["layers"][:top]:
        lines.append(f"{r['name']:<48} {r['cosine']:>10.6f} {r['rel_l2']:>10.4g}")
    s = result["suggestion"]
    if s is not None:
        state = "reaches" if s["passed"] else "does NOT reach"
        lines.append(f"suggested 16-bit groups ({s['layers_kept']} layers): {' '.join(s['ignore']) or '(none)'}; "
                     f"cosine {s['cosine']:.6f} {state} {s['min_cosine']}")
        if s["ignore"]:
            flag = s["quantization_ignored_layers"]
            lines.append("  --quantization-ignored-layers " + " ".join(flag) if flag else
                         "  (no pattern selects exactly these groups; use the globs in an ignore list)")
    return "\n".join(lines)
