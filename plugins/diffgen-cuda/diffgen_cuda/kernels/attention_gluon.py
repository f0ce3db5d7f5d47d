"""The FP8 attention kernel of ``kernels.attention_fp8`` (INT8 Q.K^T with the folded conversion, FP8
P.V, the same math to the bit as its ``-fold`` configs) written in Triton's Gluon, so that the
tensor cores and the softmax overlap within a warpgroup, as FlashAttention-3 schedules them:

  per key block j:  issue S_{j+1} = q8 . k8_{j+1}^T          (async wgmma, INT8)
                    softmax of S_j -> P_j (fp32, then E4M3)   while S_{j+1} and P_{j-1}.V_{j-1} run
                    wait for both; rescale acc; issue acc += P_j . v8_j   (async wgmma, FP8)

Plain Triton cannot express this: its pipeliner waits for a Q.K^T wgmma right after issuing it
(docs/benchmarks/attention_sass_sm90.json). The K and V tiles arrive by cp.async into STAGES
shared-memory slots, STAGES - 1 blocks ahead; each program quantizes its own Q block to INT8 in
shared memory, as the Triton kernel does. One warpgroup per 64 query rows (4 warps: BLOCK_M 64;
8 warps: BLOCK_M 128, the two warpgroups sharing the K and V tiles).

Both wgmmas are waited for together before the rescale: with one left in flight ptxas cannot tell
that the rescale reads a finished accumulator and serializes every wgmma of the kernel (Triton
3.6's ptxas says so; benchmarks/attention_sass.py reports it). Compiled for sm_90a on the CPU and
checked there (registers, no serialized wgmma, the MMAs issued before the exp2s they overlap).
On an H100 it gives its reference's numbers, but is slower than the Triton kernel (0.91-1.09x cuDNN
bf16 at Wan2.2 720p self-attention against 1.16-1.18x, docs/benchmarks/attention_gluon_H100.json);
with 64-key blocks it gave NaN at 3 heads x 4096 x 4096, head dim 64 (not understood), so
attention_fp8.launch_config refuses those. Importing this module imports Triton's Gluon (Triton 3.5+).
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma, warpgroup_mma_init,
                                                              warpgroup_mma_wait)

from .attention_constants import MAGIC, MAGIC_BITS, P_EXPONENT_OFFSET  # shared with the Triton kernel


@gluon.constexpr_function
def _tile_layout(cols, elem_bytes, num_warps):
    """Registers for a tile of ``cols`` columns: 16 bytes per thread along them (one cp.async)."""
    per_thread = 16 // elem_bytes
    across = min(32, cols // per_thread)
    return gl.BlockedLayout([1, per_thread], [32 // across, across], [num_warps, 1], [1, 0])


@gluon.jit
def _softmax(s, scale, m_i, l_i, col0, Lk, BLOCK_N: gl.constexpr, MASK: gl.constexpr, mma_s: gl.constexpr):
    """Key block's int32 scores into the online softmax: (P, row max, row sum, rescale factor)."""
    s = (s + MAGIC_BITS).to(gl.float32, bitcast=True)  # 1.5 * 2^23 + s, exact
    if MASK:
        cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_s))
        s = gl.where(cols[None, :] < Lk, s, float("-inf"))
    m_new = gl.maximum(m_i, (gl.max(s, axis=1) - MAGIC) * scale)
    p = gl.exp2(s * scale - (MAGIC * scale + m_new - P_EXPONENT_OFFSET)[:, None])  # P <= 2^8
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


# N_BLOCKS == 1 (fewer keys than one block) would be specialized to a constant, which Triton 3.6's
# lowering of this kernel's pipelined loop fails on (an assertion in ConvertTritonGPUToLLVM, seen on
# an H200): keep it a runtime value
@gluon.jit(do_not_specialize=["N_BLOCKS"])
def attention_gluon_kernel(q_ptr, k_ptr, v_ptr, sk_ptr, sv_ptr, o_ptr, q_factor, Lq, Lk, N_BLOCKS, H, LK_PAD,
                           stride_qb, stride_qh, stride_ql, stride_ob, stride_oh, stride_ol,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                           num_warps: gl.constexpr):
    """q 16-bit in the caller's layout; k8 [BH, LK_PAD, D] int8, v8 [BH, D, LK_PAD] E4M3, sk and sv as
    ``quantize_kv`` writes them; N_BLOCKS = LK_PAD / BLOCK_N, the last one masked past Lk."""
    pid = gl.program_id(0)
    bh = gl.program_id(1).to(gl.int64)
    b = bh // H
    h = bh % H
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BLOCK_N, 32])
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, D, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=4)
    q_load: gl.constexpr = _tile_layout(D, 2, num_warps)
    k_load: gl.constexpr = _tile_layout(D, 1, num_warps)
    v_load: gl.constexpr = _tile_layout(BLOCK_N, 1, num_warps)
    q_smem = gl.allocate_shared_memory(gl.int8, [BLOCK_M, D],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gl.int8))
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, D],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gl.int8))
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, D, BLOCK_N],
                                       gl.NVMMASharedLayout.get_default_for([D, BLOCK_N], gl.float8e4nv))

    # K and V tiles (both K-major for the wgmma: k8 rows are keys, v8 rows are channels)
    kr = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, k_load))
    kc = gl.arange(0, D, layout=gl.SliceLayout(0, k_load))
    k_tile = k_ptr + bh * LK_PAD * D + kr[:, None] * D + kc[None, :]
    vr = gl.arange(0, D, layout=gl.SliceLayout(1, v_load))
    vc = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, v_load))
    v_tile = v_ptr + bh * D * LK_PAD + vr[:, None] * LK_PAD + vc[None, :]
    for i in gl.static_range(STAGES - 1):
        if i < N_BLOCKS:
            async_copy.async_copy_global_to_shared(k_smem.index(i), k_tile + i * BLOCK_N * D)
            async_copy.async_copy_global_to_shared(v_smem.index(i), v_tile + i * BLOCK_N)
        async_copy.commit_group()  # one group per block, empty past the last, so the counts stay fixed

    # this program's Q block, quantized to INT8 (half away from zero) into shared memory
    rows = pid * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_load))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, q_load))
    q = gl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None].to(gl.int64) * stride_ql + cols[None, :],
                mask=rows[:, None] < Lq, other=0.0).to(gl.float32)
    amax = gl.max(gl.max(gl.abs(q), axis=1), axis=0)
    amax = gl.where(amax > 0, amax, 127.0)
    xq = q * gl.div_rn(127.0, amax)
    q_smem.store(gl.where(xq >= 0, xq + 0.5, xq - 0.5).to(gl.int8))
    sq = gl.div_rn(amax, 127.0) * q_factor
    sk_row = sk_ptr + bh * (LK_PAD // BLOCK_N)

    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=mma_s)
    async_copy.wait_group(STAGES - 2)  # block 0's tiles
    fence_async_shared()  # the generic-proxy writes (cp.async, the Q store) seen by the wgmma's async proxy
    gl.thread_barrier()
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, mma_s))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, mma_s))
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, layout=mma_o))
    for j in range(0, N_BLOCKS):
        async_copy.wait_group(STAGES - 3)  # block j + 1's tiles
        fence_async_shared()
        gl.thread_barrier()
        # past the last block this reads a slot no load writes, and its result is never used
        s_next = warpgroup_mma(q_smem, k_smem.index((j + 1) % STAGES).permute((1, 0)), s_zero, use_acc=False,
                               is_async=True)
        scale = sq * gl.load(sk_row + j)
        if (j + 1) * BLOCK_N > Lk:
            p, m_i, l_i, alpha = _softmax(s, scale, m_i, l_i, j * BLOCK_N, Lk, BLOCK_N, True, mma_s)
        else:
            p, m_i, l_i, alpha = _softmax(s, scale, m_i, l_i, j * BLOCK_N, Lk, BLOCK_N, False, mma_s)
        p8 = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
        acc, s = warpgroup_mma_wait(num_outstanding=0, deps=(acc, s_next))
        if num_warps > 4:  # the other warpgroup may still be reading the slot the next copy overwrites
            gl.thread_barrier()
        ahead = j + STAGES - 1  # into the slot of block j - 1, whose P.V is done
        if ahead < N_BLOCKS:
            async_copy.async_copy_global_to_shared(k_smem.index(ahead % STAGES), k_tile + ahead * BLOCK_N * D)
            async_copy.async_copy_global_to_shared(v_smem.index(ahead % STAGES), v_tile + ahead * BLOCK_N)
        async_copy.commit_group()
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, mma_o))[:, None]
        acc = warpgroup_mma(p8, v_smem.index(j % STAGES).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    orow = pid * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_o))
    ocol = gl.arange(0, D, layout=gl.SliceLayout(0, mma_o))
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, mma_o))[:, None] * gl.load(sv_ptr + bh * D + ocol)[None, :]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + orow[:, None].to(gl.int64) * stride_ol + ocol[None, :]
    gl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=orow[:, None] < Lq)


def launch(q, k8, sk, v8, sv, out, q_factor: float, Lq: int, Lk: int, H: int, q_strides, o_strides, *, block_m: int,
           block_n: int, num_warps: int, num_stages: int, kernel=attention_gluon_kernel) -> None:
    """The Gluon kernel over (query blocks, batch x heads); arguments as ``attention_fp8.attention``
    prepares them."""
    if block_m != 16 * num_warps or num_stages < 3:
        raise ValueError(f"the Gluon kernel takes 16 query rows per warp (BLOCK_M {block_m} with {num_warps} warps) "
                         f"and at least 3 stages (got {num_stages})")
    lk_pad = k8.shape[1]
    kernel[(triton.cdiv(Lq, block_m), q.shape[0] * H)](
        q, k8, v8, sk, sv, out, q_factor, Lq, Lk, lk_pad // block_n, H, lk_pad, *q_strides, *o_strides,
        BLOCK_M=block_m, BLOCK_N=block_n, D=q.shape[3], STAGES=num_stages, num_warps=num_warps)
