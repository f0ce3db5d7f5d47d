"""What the 4-bit dequantize passes (kernels/w4_gemm.py) compile to on Hopper, without a GPU: the
interleaving pass ("tiles", shipped) and the pair pass ("pairs", PTX byte decode) compiled for
sm_90a by Triton as the NVFP4 methods call them (a per-row factor: the global scale per row for
bf16, global / row scale for FP8), specialized as the JIT would at FLUX.1's shapes (16-byte aligned pointers, sizes
and strides divisible by 16), assembled and disassembled by the tools that ship with Triton (see
sass_tools.py). Per pass, output type and tile: registers, spills, shared memory, the kernel's
instructions per weight it writes (the kernel has no loop: each thread's instructions over its
weights), and the opcode mix.

Static: it says what each pass asks of the SM's instruction issue (the passes write 2.6 bytes per
weight into bf16, so at 4.8 TB/s an H200 SM must retire a weight every ~0.1 ns), not how fast it
runs; benchmarks/w4_dequant.py times them on a GPU. Needs Triton with its NVIDIA backend (pip
install triton==3.6.0, the device's version), no GPU. Prints JSON (and writes it with --out).

    python benchmarks/w4_sass.py --out docs/benchmarks/w4_dequant_sass_sm90.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda"), str(ROOT / "benchmarks")]

from sass_tools import assemble, emit, nvidia_tools, opcodes, programs_per_sm  # noqa: E402

# (pass, output, rows, weights per row, warps); the first of each pass is what w4_dequantize runs
CASES = [("tiles", "bf16", 64, 256, 4), ("tiles", "fp8", 64, 256, 4),
         ("pairs", "bf16", 64, 256, 4), ("pairs", "fp8", 64, 256, 4), ("pairs", "bf16", 32, 512, 4),
         ("pairs", "bf16", 64, 512, 4), ("pairs", "bf16", 128, 256, 8), ("lowrank", "fp8", 64, 256, 4)]
COUNTED = ("FMUL", "LOP3", "IMAD", "PRMT", "SHF", "HADD2", "F2FP", "F2F", "LDG", "STG", "STS", "LDS", "LDSM", "BAR")


def compile_case(kind: str, out: str, block_n: int, block_k: int, warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffgen_cuda.kernels import w4_gemm

    if kind == "lowrank":  # the tiles pass plus a rank-32 product (nvfp4-triton-w4a8-lowrank), FP8 only
        kernel = w4_gemm._w4_dequant_lowrank_kernel
        signature = {"w_ptr": "*u8", "s_ptr": "*u8", "r_ptr": "*fp32", "b_ptr": "*bf16", "a_ptr": "*bf16",
                     "y_ptr": "*fp8e4nv", "N": "i32", "K": "i32", "KP": "i32", "stride_wn": "i32", "stride_sn": "i32",
                     "stride_yn": "i32", "stride_bn": "i32", "stride_ar": "i32"}
        constants = dict(CODES=w4_gemm.E2M1, SCALES=w4_gemm.E4M3, GROUP=16, RANK=32, OUT_MAX=448.0,
                         BLOCK_N=block_n, BLOCK_K=block_k)
        signature.update({name: "constexpr" for name in constants})
        attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]]
                 for arg in signature if signature[arg] != "constexpr"}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    if kind == "tiles":
        kernel = w4_gemm._w4_dequant_kernel
        y = "*fp8e4nv" if out == "fp8" else "*bf16"
        sizes = ("N", "K", "KP")
        constants = {}
    else:
        kernel = w4_gemm._w4_dequant_pairs_kernel
        y = "*i16" if out == "fp8" else "*i32"  # the output viewed as words of a byte's two values
        sizes = ("N", "HALF_K", "KP")
        constants = {"OUT": 2 if out == "fp8" else 0, "USE_PTX": True}
    signature = {"w_ptr": "*u8", "s_ptr": "*u8", "g_ptr": "*fp32", "r_ptr": "*fp32", "y_ptr": y,
                 **{size: "i32" for size in sizes}, "stride_wn": "i32", "stride_sn": "i32", "stride_yn": "i32"}
    constants.update(CODES=w4_gemm.E2M1, SCALES=w4_gemm.E4M3, GROUP=16, PER_ROW=True, BLOCK_N=block_n,
                     BLOCK_K=block_k)
    signature.update({name: "constexpr" for name in constants})
    attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]]
             for arg in signature if signature[arg] != "constexpr"}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    import triton

    tools, rows = nvidia_tools(), {}
    with tempfile.TemporaryDirectory(prefix="diffgen-w4-sass-") as work:
        for kind, out, block_n, block_k, warps in CASES:
            name = f"{kind}_{out}_{block_n}x{block_k}_w{warps}"
            built = assemble(compile_case(kind, out, block_n, block_k, warps), name, tools, Path(work))
            ops = collections.Counter(opcodes(built["sass"]))
            weights = block_n * block_k // (32 * warps)
            rows[name] = {**built["summary"], "programs_per_sm_by_registers": programs_per_sm(
                              built["summary"]["registers"], warps),
                          "weights_per_thread": weights, "instructions": sum(ops.values()),
                          "instructions_per_weight": round(sum(ops.values()) / weights, 2),
                          "opcodes": {op: ops[op] for op in COUNTED if ops[op]}}
            print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
    result = {"benchmark": "w4_sass", "target": "sm_90a", "triton": triton.__version__,
              "format": "NVFP4: E2M1 codes, E4M3 scales per 16, a per-row factor (the global scale for bf16, "
                        "global / row scale onto an FP8 grid), as both NVFP4 methods call the pass",
              "specialization": "pointers 16-byte aligned; sizes and strides divisible by 16 (FLUX.1's shapes)",
              "passes": rows}
    emit(result, args.out)


if __name__ == "__main__":
    main()
