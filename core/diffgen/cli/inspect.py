"""``diffgen inspect``: the claims, the plan per layer group and the planned weight bytes of a
checkpoint (each transformer of a pipeline directory), without reading tensor data. It plans with
the device and dtype ``generate`` would use here, so it shows what ``generate`` will run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_quant_flags, print_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a transformer directory, a pipeline directory, a .safetensors file, or a Hugging "
                                "Face repo ID of either (owner/name[@revision][/folder])")
    p.add_argument("--weights-path", help="weights override for a transformer directory")
    add_quant_flags(p)
    p.add_argument("--tp-size", type=int, default=1, metavar="N",
                   help="also show the bytes each of N tensor-parallel ranks would hold, and the layers that cannot split")
    p.add_argument("--json", action="store_true")


def _targets(spec: str, weights: str | None) -> list[tuple[str, Path, str | None]]:
    from ..hub import NotAPipelineError, parse_repo_spec, resolve_component, resolve_pipeline
    from ..pipeline import is_transformer_component, pipeline_components, read_model_index

    path = Path(spec)
    if not path.exists() and parse_repo_spec(spec) is not None:  # a repo: its transformers, else one component
        try:
            path = resolve_pipeline(spec, only=lambda n, e: is_transformer_component(n, tuple(e)),
                                    skip_weights={"transformer"} if weights else ())
        except NotAPipelineError:
            path = resolve_component(spec, weights=weights is None)
    if (path / "model_index.json").is_file():
        components = pipeline_components(read_model_index(path))
        return [(n, path / n, weights if n == "transformer" else None)
                for n, e in components.items() if is_transformer_component(n, e)]
    return [(path.name, path, weights)]


def _brief(params: dict) -> dict:
    """Params for the text report: a per-layer list (hundreds of names at full size) by its length;
    ``--json`` keeps them whole."""
    return {k: f"<{len(v)} layers>" if isinstance(v, (list, tuple)) and len(v) > 4 else v for k, v in params.items()}


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..api import inspect
    from ..platform import resolve

    platform, dtype = resolve(args.device, args.dtype)
    reports = {name: inspect(path, weights_path=weights, quantization=args.quantization,
                             quantization_ignored_layers=args.quantization_ignored_layers,
                             quantize_all_layers=args.quantize_all_layers,
                             quant_backend=args.quant_backend, device=platform, dtype=dtype,
                             allow_pickle=args.trust_pickle, enable_svdquant=args.enable_svdquant,
                             quantization_precision=args.quantization_precision,
                             quantization_rank=args.quantization_rank, tp_size=args.tp_size,
                             attention=args.attention)
               for name, path, weights in _targets(args.path, args.weights_path)}
    if args.json:
        print(json.dumps(reports, indent=2, default=str))
        return 0
    for name, r in reports.items():
        print(f"== {name}: {r['model_class']} from {r['source']}")
        print(f"platform: {r['platform']['device_kind']} {r['platform']['device_name']}, dtype {r['dtype']}")
        if not r["claims"]:
            print("claims: none (16-bit checkpoint)")
        for c in r["claims"]:
            won = "*" if r["winner"] and c["plugin"] == r["winner"]["plugin"] else " "
            print(f"claim {won} {c['plugin']} (specificity {c['specificity']}): {c['evidence']}")
        if r["winner"]:
            cfg = r["winner"]["config"]
            print(f"config: family={cfg['family']} scheme={cfg['scheme']} online={cfg['online']} "
                  f"params={_brief(cfg['params'])}")
        rows = [[g["pattern"], g["layers"], g["action"], g["method"] or "16-bit", g["reason"]] for g in r["groups"]]
        print_table(rows, ["layers", "n", "action", "method", "why"])
        wb = r["weight_bytes"]
        print(f"weights: {wb['16bit'] / 2**20:.2f} MiB in 16-bit -> {wb['planned'] / 2**20:.2f} MiB planned "
              f"({wb['planned'] / max(wb['16bit'], 1):.2f}x)")
        tp = r.get("tensor_parallel")
        if tp:
            print(f"tensor parallel {tp['tp_size']}: {tp['per_rank_bytes'] / 2**20:.2f} MiB per rank "
                  f"({tp['split_layers']} linears split, {tp['replicated_bytes'] / 2**20:.2f} MiB on every rank)")
            for layer, reason in list(tp["refused"].items())[:5]:
                print(f"  not split: {layer}: {reason}")
            if len(tp["refused"]) > 5:
                print(f"  ... and {len(tp['refused']) - 5} more not split")
        att = r["attention"]
        for b in att["backends"]:
            chosen = "*" if b["name"] == att["requested"] else " "
            state = "available" if b["available"] else f"unavailable: {b['reason']}"
            variant = f"; runs {b['variant']}" if b.get("variant") else ""
            print(f"attention {chosen} {b['name']}: {b['description']} ({state}{variant})")
        if att["requested"] == "sdpa":
            print("attention: sdpa (diffusers' dispatch); --attention NAME routes it to a backend above")
        for rw in r["rewrites"]:
            print(f"rewrite offered: {rw['rewrite']} for {rw['modules']} {rw['block_class']} (decided after loading)")
        for f in r["plugin_failures"]:
            print(f"plugin failure: {f['plugin']} at {f['stage']}: {f['reason']}")
    return 0
