"""``diffgen repack``: a checkpoint the plugins can load, rewritten in the runtime layout.

The same plan a load makes (``diffgen.plan``), and the same chain of ``repack_checkpoint`` hooks
with a runtime target: the winning claim's plugin first, then the others. What the plugins change
on the way in (SGLang-Diffusion's module names to diffusers', a fused QKV split into its parts,
per-shard scales spread over their rows) is written out once, so later loads read the runtime
layout directly; tensors keep their stored dtypes. config.json and the sidecar JSON files are
copied as they are (the format is unchanged, only its layout).

Written to a temporary directory beside the destination, re-read and checked (every tensor as
written; the written checkpoint planned again expects exactly these tensors, in these shapes),
then renamed into place. This module never imports the generation pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from ..checkpoint import open_checkpoint
from ..checkpoint_writer import atomic_directory, check_manifest, finish_layout, refuse_existing, write_shards
from ..errors import DiffgenError, LoadError
from ..hub import resolve_transformer, resolve_weights
from ..loader import fit_shape
from ..plan import LoadPlan, plan
from ..platform import resolve
from ..plugins import PluginHost, get_plugin_host

SHARD_BYTES = 4 << 30


def _runtime_plan(source, host: PluginHost) -> LoadPlan:
    # The runtime layout does not depend on the machine; plan where every format has a method.
    platform, dtype = resolve("cpu", torch.bfloat16)
    return plan(source, platform=platform, dtype=dtype, host=host)


def _to_runtime_layout(stream, planned: LoadPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """The repacked stream, checked against the plan as the loader checks it: no unknown or repeated
    names, shapes as expected (singleton dimensions aside), nothing the model needs left out."""
    expected = planned.target("runtime").expected
    seen = set()
    for name, tensor in stream:
        where = str(planned.source.file_of(name)) if name in planned.source.tensors else planned.source.describe()
        if name not in expected:
            raise LoadError(f"tensor {name!r} from {where} is not a parameter of {planned.model_class} after "
                            "repacking; a checkpoint of another model, or a format whose plugin is not installed?")
        if name in seen:
            raise LoadError(f"tensor {name!r} arrives twice (second time from {where})")
        seen.add(name)
        yield name, fit_shape(name, tensor, expected[name][0], where)
    meta = {name for name, t in planned.expected().items() if t.device.type == "meta"}
    missing = sorted(meta - seen)
    if missing:
        raise LoadError(f"the checkpoint does not fit {planned.model_class}: {len(missing)} tensors missing after "
                        f"repacking (e.g. {', '.join(missing[:8])}; {planned.source.describe()})")


def _verify(out: Path, manifest: dict, host: PluginHost) -> None:
    written = open_checkpoint(out)
    check_manifest(written, manifest)
    again = _runtime_plan(written, host)
    expected = again.target("runtime").expected
    wrong = [n for n, (_, shape, _) in manifest.items() if n not in expected or tuple(expected[n][0]) != shape]
    if wrong:
        raise DiffgenError(f"verification failed: planned again, {out} does not expect {', '.join(wrong[:8])} "
                           "as written")


def repack(src, dst, *, weights_path=None, allow_pickle: bool = False, overwrite: bool = False) -> dict:
    """Write the checkpoint at ``src`` (a component directory, weights file or index; ``weights_path``
    as in ``load_transformer``) to ``dst`` in the runtime layout. Returns what was written and which
    plugins' repack hooks ran."""
    host = get_plugin_host()
    dst = Path(dst)
    refuse_existing(dst, overwrite)
    source = open_checkpoint(resolve_transformer(src), allow_pickle=allow_pickle,
                             weights_path=None if weights_path is None else resolve_weights(weights_path))
    planned = _runtime_plan(source, host)
    stream = host.repack_checkpoint(planned.config, planned.source.iter_tensors(), planned.target("runtime"),
                                    first=planned.claim.plugin if planned.claim else None)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        manifest, files = write_shards(_to_runtime_layout(stream, planned), tmp, shard_bytes=SHARD_BYTES)
        finish_layout(tmp, manifest, files)
        (tmp / "config.json").write_text(json.dumps(source.config, indent=2))
        for name, sidecar in source.sidecars.items():
            (tmp / name).write_text(json.dumps(sidecar, indent=2))
        _verify(tmp, manifest, host)
    renamed = sorted(set(manifest) - set(source.tensors))
    return {"output": str(dst), "format": planned.config.family if planned.config else "16-bit",
            "claimed_by": planned.claim.plugin if planned.claim else None, "tensors": len(manifest),
            "renamed_or_new_tensors": len(renamed), "shards": len(files)}
