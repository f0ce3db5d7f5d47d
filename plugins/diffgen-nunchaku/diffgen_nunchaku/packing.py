"""Nunchaku's tile-packed tensors <-> plain layouts, both ways.

Plain layouts (what diffgen's SVDQuant methods hold; ``numerics.int4`` / ``numerics.e2m1`` order):
  codes      uint8 [N, K/2]    two 4-bit codes per byte along K, element 2i in the low nibble
  scales     [N, K/G]          row-major, one per group of G inputs (G = 64 int4, 16 fp4)
  vectors    [N] or [K]        bias, smooth_factor, wcscales in channel order
  proj_down  [r, K]            low-rank down projection (L2 / smooth)
  proj_up    [N, r]            low-rank up projection (L1)
Nunchaku's layouts (the ``NunchakuWeightPacker`` of nunchaku / deepcompressor, facts in
``shared/reference/nunchaku.md`` section 2.4): 128x64 tiles of int32 words for ``qweight``,
per-128-row permutations for scales and vectors, 16x16 register tiles for the low-rank pair; the
AWQ W4A16 modulation weights use TinyChat's int16 packing of 4 rows by 64 inputs.
Every function works on meta tensors too (the planner reads shapes through them).
"""

from __future__ import annotations

import torch

from diffgen.errors import CheckpointError

_U8 = torch.uint8


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise CheckpointError(f"SVDQuant layout: {what}")


def nibbles_to_plain(codes: torch.Tensor) -> torch.Tensor:
    """uint codes [N, K] (0..15) -> uint8 [N, K/2], element 2i in the low nibble."""
    codes = codes.to(torch.int32)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(_U8)


def plain_to_nibbles(plain: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int32 codes [N, K] (0..15)."""
    p = plain.to(torch.int32)
    return torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).reshape(plain.shape[0], -1)


# -- W4A4 qweight: words [nt][kt][np:8][nl:8][kl:4][nps:2][kps:2], 8 nibbles r per word --------
# n = nt*128 + np*16 + nps*8 + nl,  k = kt*64 + kps*32 + kl*8 + r
def unpack_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """int8 [N, K/2] tile-packed -> plain uint8 [N, K/2]."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    _need(n % 128 == 0 and k % 128 == 0, f"qweight {tuple(qweight.shape)}: N and K must be multiples of 128")
    words = qweight.contiguous().view(torch.int32).reshape(n // 128, k // 64, 8, 8, 4, 2, 2)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    nib = (words.unsqueeze(-1) >> shifts) & 0xF
    codes = nib.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k)
    return nibbles_to_plain(codes)


def pack_qweight(plain: torch.Tensor) -> torch.Tensor:
    """plain uint8 [N, K/2] -> nunchaku's int8 [N, K/2] tiles."""
    n, k = plain.shape[0], 2 * plain.shape[1]
    _need(n % 128 == 0 and k % 128 == 0, f"weight [{n}, {k}]: N and K must be multiples of 128")
    codes = plain_to_nibbles(plain).to(torch.int64).reshape(n // 128, 8, 2, 8, k // 64, 2, 4, 8)
    codes = codes.permute(0, 4, 1, 3, 6, 2, 5, 7)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=plain.device)
    words = (codes << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.contiguous().view(torch.int8).reshape(n, k // 2)


# -- per-channel scales and vectors: [nt][g][a:8][c:4][b:2][d:2], n = nt*128 + a*16 + b*8 + c*2 + d --
def _as_bytes(t: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    return (t.view(_U8), t.dtype) if t.dtype == torch.float8_e4m3fn else (t, t.dtype)


def unpack_scales(wscales: torch.Tensor) -> torch.Tensor:
    """[G, N] packed (one group per 64 inputs, or any G with group > 16) -> [N, G]."""
    t, dtype = _as_bytes(wscales)
    g, n = t.shape
    _need(n % 128 == 0, f"wscales {tuple(t.shape)}: N must be a multiple of 128")
    out = t.contiguous().reshape(n // 128, g, 8, 4, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(n, g)
    return out.view(dtype) if dtype != t.dtype else out


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """[N, G] -> nunchaku's [G, N] order."""
    t, dtype = _as_bytes(scales)
    n, g = t.shape
    _need(n % 128 == 0, f"scales {tuple(t.shape)}: N must be a multiple of 128")
    out = t.contiguous().reshape(n // 128, 8, 2, 4, 2, g).permute(0, 5, 1, 3, 2, 4).reshape(g, n)
    return out.view(dtype) if dtype != t.dtype else out


def unpack_vector(v: torch.Tensor) -> torch.Tensor:
    """bias / smooth_factor / wcscales [N] packed -> channel order."""
    return unpack_scales(v.reshape(1, -1)).reshape(-1)


def pack_vector(v: torch.Tensor) -> torch.Tensor:
    return pack_scales(v.reshape(-1, 1)).reshape(-1)


# -- NVFP4 micro-scales: [nt][kb][y:8][x:4][sp:4][g4:4], n = nt*128 + sp*32 + x*8 + y, group = kb*4 + g4 --
def unpack_fp4_scales(wscales: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [K/16, N] packed -> [N, K/16]."""
    t, dtype = _as_bytes(wscales)
    g, n = t.shape
    _need(n % 128 == 0 and g % 4 == 0, f"fp4 wscales {tuple(t.shape)}: N % 128 and K % 64 must be 0")
    out = t.contiguous().reshape(n // 128, g // 4, 8, 4, 4, 4).permute(0, 4, 3, 2, 1, 5).reshape(n, g)
    return out.view(dtype)


def pack_fp4_scales(scales: torch.Tensor) -> torch.Tensor:
    t, dtype = _as_bytes(scales)
    n, g = t.shape
    _need(n % 128 == 0 and g % 4 == 0, f"fp4 scales {tuple(t.shape)}: N % 128 and K % 64 must be 0")
    out = t.contiguous().reshape(n // 128, 4, 4, 8, g // 4, 4).permute(0, 4, 3, 2, 1, 5).reshape(g, n)
    return out.view(dtype)


# -- low-rank pair: 16x16 tiles [A][B][nl:8][kl:4][nps:2][kps:2][rk:2] --------------------------
# in a tile row = nps*8 + nl, col = kps*8 + kl*2 + rk; proj_down [r, K]: A = K tiles, B = r tiles;
# proj_up [N, r]: A = N tiles, B = r tiles. Stored shapes: proj_down [K, r], proj_up [N, r].
def _tiles(m: torch.Tensor, rows_outer: bool) -> torch.Tensor:
    rows, cols = m.shape
    t = m.reshape(rows // 16, 2, 8, cols // 16, 2, 4, 2)  # rt, nps, nl, ct, kps, kl, rk
    order = (0, 3) if rows_outer else (3, 0)
    return t.permute(*order, 2, 5, 1, 4, 6)


def pack_lowrank(m: torch.Tensor, down: bool) -> torch.Tensor:
    """proj_down [r, K] (``down``) or proj_up [N, r] -> nunchaku's stored [K, r] / [N, r]."""
    rows, cols = m.shape
    _need(rows % 16 == 0 and cols % 16 == 0, f"low-rank {tuple(m.shape)}: both sides must be multiples of 16")
    return _tiles(m, rows_outer=not down).contiguous().reshape(cols, rows) if down else \
        _tiles(m, rows_outer=True).contiguous().reshape(rows, cols)


def unpack_lowrank(stored: torch.Tensor, down: bool) -> torch.Tensor:
    """nunchaku's proj_down [K, r] -> [r, K]; proj_up [N, r] -> [N, r]."""
    a, b = stored.shape
    rows, cols = (b, a) if down else (a, b)
    _need(rows % 16 == 0 and cols % 16 == 0, f"low-rank {tuple(stored.shape)}: both sides must be multiples of 16")
    outer = (cols // 16, rows // 16) if down else (rows // 16, cols // 16)
    t = stored.contiguous().reshape(*outer, 8, 4, 2, 2, 2)  # A, B, nl, kl, nps, kps, rk
    if down:
        t = t.permute(1, 4, 2, 0, 5, 3, 6)  # rt, nps, nl, ct, kps, kl, rk
    else:
        t = t.permute(0, 4, 2, 1, 5, 3, 6)
    return t.reshape(rows, cols)


# -- AWQ W4A16 (TinyChat): int16 words of 4 codes k = j, j+8, j+16, j+24 of a 32-block; rows in
# fours, [N/4][K/64][4 rows][16 words]; stored as int32 [N/4, K/2]. Codes are unsigned 0..15.
def unpack_awq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N/4, K/2] -> plain uint8 [N, K/2] (unsigned codes)."""
    n, k = 4 * qweight.shape[0], 2 * qweight.shape[1]
    _need(k % 64 == 0, f"AWQ qweight {tuple(qweight.shape)}: K must be a multiple of 64")
    words = qweight.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    words = words.reshape(n // 4, k // 64, 4, 16).permute(0, 2, 1, 3).reshape(n, k // 32, 8)
    shifts = torch.arange(0, 16, 4, dtype=torch.int32, device=qweight.device)
    codes = (words.unsqueeze(-1) >> shifts) & 0xF  # [n, block, j, a] -> k = block*32 + a*8 + j
    return nibbles_to_plain(codes.permute(0, 1, 3, 2).reshape(n, k))


def pack_awq_qweight(plain: torch.Tensor) -> torch.Tensor:
    n, k = plain.shape[0], 2 * plain.shape[1]
    _need(n % 4 == 0 and k % 64 == 0, f"AWQ weight [{n}, {k}]: N % 4 and K % 64 must be 0")
    codes = plain_to_nibbles(plain).reshape(n, k // 32, 4, 8).permute(0, 1, 3, 2)  # n, block, j, a
    shifts = torch.arange(0, 16, 4, dtype=torch.int32, device=plain.device)
    words = (codes << shifts).sum(-1)
    words = torch.where(words >= 2**15, words - 2**16, words).to(torch.int16)
    words = words.reshape(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).contiguous()
    return words.view(torch.int32).reshape(n // 4, k // 2)
