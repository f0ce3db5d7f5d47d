"""The fuzz loop: case ``i`` is a seed, a mutator and a ``random.Random`` all chosen from ``i``, so any
case can be replayed alone (``python -m tests.fuzz.runner --case I``).

Cases run in forked worker processes, each case under ``signal.alarm`` (a blocked open of a FIFO
or a runaway loop becomes a ``hang``) and an address-space limit (a runaway allocation fails
instead of taking the machine). A worker that dies mid-case records that case as ``killed`` and
is replaced.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

from .case import Mutation, load_mutators
from .oracle import FAILURES, run_case
from .seeds import SEEDS, WEIGHTS, build_seeds, read_tensors

MUTATORS = load_mutators()
CASE_TIMEOUT_S = 20
MEMORY_LIMIT = 8 << 30


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in diffgen swallows it."""


def _on_alarm(signum, frame):
    raise CaseTimeout()


def describe_case(index: int, base: str) -> tuple[str, str, random.Random]:
    rng = random.Random(f"{base}:{index}")
    return rng.choice(sorted(SEEDS)), rng.choice(sorted(MUTATORS)), rng


def seed_tensors(seed_dir: Path) -> dict:
    out = {}
    for f in sorted(seed_dir.glob("*.safetensors")):
        out.update(read_tensors(f)[0])
    return out


def run_one(index: int, base: str, seeds: dict[str, Path], scratch: Path, cache: dict) -> dict:
    seed, name, rng = describe_case(index, base)
    klass, mutate = MUTATORS[name]
    where = scratch / f"case-{index}"
    case = where / "transformer"
    shutil.copytree(seeds[seed], case, symlinks=True)
    started = time.monotonic()
    mutation = Mutation("either", what="mutator raised")
    signal.alarm(CASE_TIMEOUT_S)
    try:
        mutation = mutate(rng, case, seed)
        if seed not in cache:
            cache[seed] = seed_tensors(seeds[seed])
        outcome, detail = run_case(case, mutation, cache[seed])
    except CaseTimeout:
        outcome, detail = "hang", f"no end within {CASE_TIMEOUT_S} s"
    finally:
        signal.alarm(0)
        shutil.rmtree(where, ignore_errors=True)
    return {"case": index, "seed": seed, "mutator": name, "class": klass, "expect": mutation.expect,
            "what": mutation.what, "outcome": outcome, "detail": detail, "seconds": round(time.monotonic() - started, 3)}


def _worker(indices: list[int], base: str, seeds: dict, queue) -> None:
    signal.signal(signal.SIGALRM, _on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import torch
    torch.set_num_threads(1)
    cache: dict = {}
    scratch = Path(tempfile.mkdtemp(prefix="diffgen-fuzz-"))
    try:
        for index in indices:
            queue.put(("start", index, None))
            queue.put(("done", index, run_one(index, base, seeds, scratch, cache)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        queue.put(("exit", None, None))


def _prepare_parent() -> None:
    """Import and warm up everything before forking, so that each worker starts at once."""
    # The repository's own format plugin by default; FUZZ_PLUGINS="" loads only the builtins, and
    # unsetting DIFFGEN_PLUGINS through FUZZ_PLUGINS="*" loads every installed plugin.
    plugins = os.environ.get("FUZZ_PLUGINS", "cuda")
    if plugins == "*":
        os.environ.pop("DIFFGEN_PLUGINS", None)
    else:
        os.environ["DIFFGEN_PLUGINS"] = plugins
    from diffgen.plugins import get_plugin_host, reset_plugins

    reset_plugins()
    get_plugin_host()
    import logging
    for name in ("diffgen", "diffusers"):  # their warnings about each hostile config would drown the report
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()


def run_fuzz(count: int, *, seeds_dir: Path, workers: int = 2, base: str = "diffgen-fuzz", start: int = 0) -> dict:
    """Run cases ``start .. start+count-1``; returns counts per outcome, per class, and every failure."""
    _prepare_parent()
    import warnings
    warnings.filterwarnings("ignore")
    seeds = build_seeds(seeds_dir) if not (seeds_dir / "bf16" / WEIGHTS).exists() else \
        {name: seeds_dir / name for name in SEEDS}
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    todo = list(range(start, start + count))
    slices = [todo[i::workers] for i in range(workers)]
    results: dict[int, dict] = {}
    began = time.monotonic()
    running = {}
    for part in slices:
        if part:
            p = context.Process(target=_worker, args=(part, base, seeds, queue), daemon=True)
            p.start()
            running[p] = {"todo": part, "current": None, "since": 0.0}
    while running:
        try:
            kind, index, result = queue.get(timeout=1.0)
            owner = next((p for p, s in running.items() if index in s["todo"] or s["current"] == index), None)
            if kind == "start" and owner is not None:
                running[owner].update(current=index, since=time.monotonic())
            elif kind == "done":
                results[index] = result
                if owner is not None:
                    running[owner]["todo"] = [i for i in running[owner]["todo"] if i != index]
                    running[owner]["current"] = None
        except Exception:  # noqa: BLE001 - queue.Empty: look after the workers
            pass
        for p, state in list(running.items()):
            stuck = state["current"] is not None and time.monotonic() - state["since"] > CASE_TIMEOUT_S + 30
            if p.is_alive() and not stuck:
                continue
            if stuck:
                p.kill()
            p.join()
            del running[p]
            left = [i for i in state["todo"] if i not in results]
            if left and left[0] == state["current"]:  # died or stuck inside this case
                seed, name, _ = describe_case(left[0], base)
                results[left[0]] = {"case": left[0], "seed": seed, "mutator": name, "class": MUTATORS[name][0],
                                    "expect": "?", "what": "", "outcome": "hang" if stuck else "killed",
                                    "detail": f"worker exit code {p.exitcode}", "seconds": None}
                left = left[1:]
            if left:
                q = context.Process(target=_worker, args=(left, base, seeds, queue), daemon=True)
                q.start()
                running[q] = {"todo": left, "current": None, "since": 0.0}
    ordered = [results[i] for i in sorted(results)]
    return summarize(ordered, time.monotonic() - began, workers)


def summarize(results: list[dict], seconds: float, workers: int) -> dict:
    by_class: dict[str, Counter] = {}
    for r in results:
        by_class.setdefault(r["class"], Counter())[r["outcome"]] += 1
    return {"cases": len(results), "seconds": round(seconds, 1), "workers": workers,
            "outcomes": dict(Counter(r["outcome"] for r in results)),
            "by_class": {k: dict(v) for k, v in sorted(by_class.items())},
            "by_mutator": {m: dict(Counter(r["outcome"] for r in results if r["mutator"] == m))
                           for m in sorted({r["mutator"] for r in results})},
            "failures": [r for r in results if r["outcome"] in FAILURES]}


def main() -> None:
    parser = argparse.ArgumentParser(description="diffgen's checkpoint fuzzer")
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--case", type=int, help="replay one case, in this process, with tracebacks shown")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", default=str(Path(tempfile.gettempdir()) / "diffgen-fuzz-seeds"))
    parser.add_argument("--out", help="write the summary JSON here")
    args = parser.parse_args()
    if args.case is not None:
        _prepare_parent()
        seeds_dir = Path(args.seeds)
        seeds = build_seeds(seeds_dir) if not (seeds_dir / "bf16" / WEIGHTS).exists() else \
            {name: seeds_dir / name for name in SEEDS}
        signal.signal(signal.SIGALRM, _on_alarm)
        print(json.dumps(run_one(args.case, "diffgen-fuzz", seeds, Path(tempfile.mkdtemp()), {}), indent=2))
        return
    summary = run_fuzz(args.cases, seeds_dir=Path(args.seeds), workers=args.workers, start=args.start)
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=2))
    print(f"{len(summary['failures'])} failures")


if __name__ == "__main__":
    main()
