"""Helpers for the static sm_90a surveys (attention_sass.py, w4_sass.py): a kernel compiled ahead
of time by Triton is assembled by the ptxas that ships with Triton and disassembled by its
cuobjdump, no GPU needed."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

SM_REGISTERS, SM_SHARED = 65536, 233472  # Hopper, per SM


def nvidia_tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def assemble(compiled, tag: str, tools: Path, work: Path) -> dict:
    """{"sass": the disassembly, "summary": registers, spills, shared memory and ptxas's wgmma
    serialization warning} for a ``triton.compile`` result."""
    ptx, cubin = work / f"{tag}.ptx", work / f"{tag}.cubin"
    ptx.write_text(compiled.asm["ptx"])
    report = subprocess.run([str(tools / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                            capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    serialized = re.search(r"wgmma.mma_async instructions are serialized due to ([^\n.]*)", report)
    sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    return {"sass": sass,
            "summary": {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
                        "spill_store_bytes": int(spills.group(1)), "spill_load_bytes": int(spills.group(2)),
                        "wgmma_serialized": serialized.group(1).strip() if serialized else None,
                        "shared_bytes": compiled.metadata.shared}}


def programs_per_sm(registers: int, warps: int) -> int:
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp in units of 256
    return SM_REGISTERS // (per_warp * warps)


def opcodes(sass: str) -> list[str]:
    """Every instruction's opcode (without modifiers or predicate), in order."""
    return [m.group(1).split(".")[0] for m in re.finditer(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)",
                                                             sass, re.M)]


def emit(result: dict, out: str | None) -> None:
    """Prints the survey's JSON, and writes it to ``out`` where given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
