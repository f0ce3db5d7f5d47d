"""What the FP8 attention kernel's launch configs compile to on Hopper, without a GPU: each config
(the Triton kernel's, and the -gluon ones' Gluon kernel) is compiled for sm_90a by Triton (ahead of
time, specialized as the JIT would at Wan's shapes: 16-byte aligned pointers, lengths and strides
divisible by 16), assembled by the ptxas that ships with Triton, and disassembled by its cuobjdump.
Per config: registers per thread and spills (ptxas -v), shared memory, how many programs fit on an
SM by registers and by shared memory, and the instruction mix of the main key loop (the longest
backward branch in the SASS): the MMAs, the MUFU exp2s, the FP32 ALU work, and where the loop waits
for its wgmma (WARPGROUP.DEPBAR).

This is static: it cannot say how fast a config runs, only what it asks of the SM (e.g. that
``ex2.approx.f16x2`` becomes two MUFU.EX2.F16 on sm_90, not one; that a program of 237 registers
is alone on its SM; or that ptxas serializes the wgmmas, which it reports and this records). The
loop counts include every branch of the loop body (the Gluon kernel's two copies of the softmax).
Needs Triton with its NVIDIA backend (pip install triton==3.6.0, the device's version), no GPU.
Prints JSON (and writes it with --out).

    python benchmarks/attention_sass.py --out docs/benchmarks/attention_sass_sm90.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda"), str(ROOT / "benchmarks")]

from diffgen_cuda.attention_fp8 import CONFIGS, launch_config  # noqa: E402
from sass_tools import SM_SHARED, assemble, emit, nvidia_tools, programs_per_sm  # noqa: E402

COUNTED = ("IGMMA", "QGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "F2FP", "HADD2", "IADD3", "IMAD", "LDGSTS",
           "SHFL", "BAR", "LDL", "STL")
_DIVISIBLE = ("q_ptr", "k_ptr", "v_ptr", "sk_ptr", "sv_ptr", "o_ptr", "Lq", "Lk", "LK_PAD", "stride_qb",
              "stride_qh", "stride_ql", "stride_ob", "stride_oh", "stride_ol")


def compile_config(name: str, head_dim: int):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffgen_cuda.kernels import attention_fp8 as kernels

    cfg = launch_config(name)
    signature = {"q_ptr": "*bf16", "k_ptr": "*i8", "v_ptr": "*fp8e4nv",
                 "sk_ptr": "*fp32", "sv_ptr": "*fp32", "o_ptr": "*bf16", "q_factor": "fp32", "Lq": "i32", "Lk": "i32",
                 "FULL_BLOCKS": "i32", "H": "i32", "LK_PAD": "i32", "stride_qb": "i32", "stride_qh": "i32",
                 "stride_ql": "i32", "stride_ob": "i32", "stride_oh": "i32", "stride_ol": "i32"}
    if cfg["gluon"]:
        from triton.experimental.gluon._runtime import GluonASTSource

        from diffgen_cuda.kernels import attention_gluon

        kernel, make_source = attention_gluon.attention_gluon_kernel, GluonASTSource
        signature = {("N_BLOCKS" if arg == "FULL_BLOCKS" else arg): kind for arg, kind in signature.items()}
        constants = dict(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], D=head_dim, STAGES=cfg["num_stages"],
                         num_warps=cfg["num_warps"])
    else:
        kernel, make_source = kernels._attention_fp8_kernel, ASTSource
        constants = dict(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], D=head_dim, P_DTYPE=tl.float8e4nv,
                         MAGIC_I2F=cfg["magic_i2f"], FOLD_I2F=cfg["fold_i2f"])
    signature.update({name: "constexpr" for name in constants})
    attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in _DIVISIBLE}
    source = make_source(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if cfg["maxnreg"] is not None:
        options["maxnreg"] = cfg["maxnreg"]
    return cfg, triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def main_loop(sass: str) -> tuple[int, collections.Counter, list[str]]:
    """(instructions, their opcodes, the MMA/wait/exp2 sequence) of the longest backward branch."""
    instructions = [(int(m.group(1), 16), m.group(2).strip())
                    for m in re.finditer(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;", sass, re.M)]
    loop = None
    for address, text in instructions:
        target = re.search(r"BRA (?:!?U?P\d, )?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            if loop is None or address - start > loop[1] - loop[0]:
                loop = (start, address)
    if loop is None:
        return 0, collections.Counter(), []
    body = [re.sub(r"^@!?U?P\w+\s+", "", text) for address, text in instructions if loop[0] <= address <= loop[1]]
    opcodes = collections.Counter(text.split()[0].split(".")[0] for text in body)
    order = []  # the loop's schedule in brief: MMA groups, waits, exp2 runs
    for text in body:
        kind = ("MMA" if "GMMA" in text else "WAIT" if text.startswith("WARPGROUP.DEPBAR") else
                "EX2" if text.startswith("MUFU.EX2") else "BAR" if text.startswith("BAR.SYNC") else None)
        if kind and (not order or order[-1] != kind):
            order.append(kind)
    return len(body), opcodes, order


def survey(name: str, head_dim: int, tools: Path, work: Path) -> dict:
    cfg, compiled = compile_config(name, head_dim)
    built = assemble(compiled, name, tools, work)
    count, opcodes, order = main_loop(built["sass"])
    return {**built["summary"], "programs_per_sm_by_registers": programs_per_sm(built["summary"]["registers"],
                                                                                cfg["num_warps"]),
            "programs_per_sm_by_shared": SM_SHARED // built["summary"]["shared_bytes"] or None,
            "threads": 32 * cfg["num_warps"], "loop_instructions": count,
            "loop_opcodes": {op: opcodes[op] for op in COUNTED if opcodes[op]}, "loop_schedule": " ".join(order)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="CONFIG")
    parser.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    import triton

    tools = nvidia_tools()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="diffgen-attention-sass-") as work:
        for name in args.configs:
            try:
                rows[name] = survey(name, args.head_dim, tools, Path(work))
            except Exception as exc:  # a config that does not compile says why, and the survey goes on
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"}
            print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
    result = {"benchmark": "attention_sass", "target": "sm_90a", "triton": triton.__version__, "head_dim": args.head_dim,
              "specialization": "pointers 16-byte aligned; Lq, Lk, LK_PAD and strides divisible by 16 (Wan 720p)",
              "configs": rows}
    emit(result, args.out)


if __name__ == "__main__":
    main()
