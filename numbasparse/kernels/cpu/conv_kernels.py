"""The block-sparse 2-D convolution kernels for CPUs (numba.njit task loops).

Shapes (all arrays C-contiguous, one dtype, float32 or float64):

* ``x  (N, C, H, W)``  input, NCHW, ``C = in_blocks * B``;
* ``y  (N, K, Ho, Wo)`` output, NCHW, ``K = out_blocks * B``;
* ``w  (capacity, kh, kw, B, B)``: ``w[s, dh, dw, k, c]`` multiplies input channel
  ``iB + k`` at tap ``(dh, dw)`` into output channel ``jB + c``, for the live entry
  ``(i, j)`` stored in slot ``s``.

Geometry: ``y[n, jB+c, oh, ow] = sum x[n, iB+k, oh*sh - pt + dh*dil_h, ow*sw - pl + dw*dil_w]
* w[s, dh, dw, k, c]`` over live ``(i, j, s)``, taps and ``k``; out-of-range input
pixels are zero (``pt``, ``pl`` are the top/left padding; the bottom/right padding
only shows in ``Ho``, ``Wo``).

Design: implicit GEMM with packed panels and a register-blocked micro-kernel.
Every output element is a dot product over a *reduction panel*; the kernels pack
both operands into contiguous rows and run a 4x4 micro-kernel (16 accumulators, 8
loads per 16 FMAs; unsigned indices so that LLVM vectorizes the reduction loop to
full-width vectors).  numba gives us no SIMD intrinsics and no SLP vectorization, so
a reduction that is contiguous in memory on both operands is the one loop shape that
reliably runs at vector speed; everything else is arranged around it.

* forward: one task owns a tile of ``PIXEL_TILE`` output pixels of one image, for
  all output block columns ``j``.  The reduction index of column ``j`` is
  ``(live input block q, tap, k)``, length ``m_j * kh * kw * B``.  The input comes
  from a channels-last copy of ``x``, so each (pixel, block, tap) is one contiguous
  run of ``B`` channels (zeros where the tap falls into the padding).  With many live
  blocks (``nnz > 1.25 * in_blocks``) the task first gathers the tile's full im2col
  rows ``(block, tap, k)`` once, and column ``j`` copies its live blocks' contiguous
  ``kh*kw*B`` runs from them (a single live block is read in place); with few live
  blocks each column gathers its runs straight from ``x``.  Rows are packed four at
  a time into an L1-sized buffer right before the micro-kernel uses them.  The weight
  panel of column ``j`` (``B x m_j*kh*kw*B``) is packed once per call.
* data gradient: the same gather kernel run on a channels-last copy of ``dy`` with the
  transposed blocks.  With stride ``s > 1``, input pixels are grouped by phase
  ``(ih % sh, iw % sw)``: all pixels of one phase see the same set of taps, so only
  the taps that reach an output pixel enter the reduction (no zero-insertion).
* weight gradient: one task owns one tap ``(dh, dw)`` of every live block of one block
  row ``i`` (``dw[s, dh, dw]`` for the live ``(i, j, s)``).  The reduction runs over
  the output pixels of all images back to back: ``dy`` is copied once to
  ``(K, N*Ho*Wo)``, and per chunk of output rows the task packs the shifted input rows
  ``x[n, iB:(i+1)B]`` at its tap (``B x pixels``) once and reuses them for every live
  ``j`` of the row.

Reusing the matmul kernels as a sum of shifted matmuls would materialize one shifted
copy of ``x`` per tap and write (and re-read) the output ``kh*kw`` times; packing the
taps into one reduction panel gathers each input run once per tile and writes each
output once, with the whole ``m_j*kh*kw*B`` reduction in registers.

Threading: every kernel is a task loop: each thread running it takes task numbers from
an atomic counter (``counter[0]``) and works in its own slice of scratch buffers
(index ``fetch_add(counter, 1, 1)``), which the host allocates.  :mod:`.conv_programs`
wraps each kernel in a program that runs on torch's OpenMP team (:mod:`.runtime`).
The kernels allocate nothing and are compiled without numba's reference counting
(``_nrt=False``), which keeps atomic reference updates out of their loops (with them,
the weight gradient's packing ran 3x slower).  Every output element is written by
exactly one task, with a fixed summation order: results do not depend on the thread
count.
"""
from __future__ import annotations

from numba import njit, uint64

from .microkernel import FASTMATH as _FASTMATH
from .microkernel import dot4x4 as _dot4x4
from .simd import fetch_add

PIXEL_TILE = 64         # output pixels per forward / data-gradient task
PIXEL_CHUNK = 1024      # pixels per packed panel of the weight gradient
_KERNEL = {"nogil": True, "cache": True, "_nrt": False}


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _copy(dst, d0, src, s0, count):
    """dst[d0:d0+count] = src[s0:s0+count] for 1-D arrays and non-negative offsets."""
    ud = uint64(d0)
    us = uint64(s0)
    for u in range(uint64(count)):
        dst[ud + u] = src[us + u]


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _fill_zero(dst, d0, count):
    ud = uint64(d0)
    for u in range(uint64(count)):
        dst[ud + u] = 0


@njit(**_KERNEL)
def _to_channels_last(x, out, counter):
    """out[n, h, w, c] = x[n, c, h, w]; task = one row (n, h)."""
    n_img, chans, height, width = x.shape
    task = fetch_add(counter, 0, 1)
    while task < n_img * height:
        n = task // height
        h = task % height
        for c0 in range(0, chans, 16):
            c1 = min(chans, c0 + 16)
            for w in range(width):
                for c in range(c0, c1):
                    out[n, h, w, c] = x[n, c, h, w]
        task = fetch_add(counter, 0, 1)


@njit(**_KERNEL)
def _pack_weights(w, ptr, slots, tap_h, tap_w, tap_count, transpose, wp, counter):
    """Weight panels of the gather kernel.

    ``wp[p, g, r, (q*nt + t)*B + u]`` is the weight joining reduction element
    ``(q, t, u)`` to output row ``r`` of group ``g`` in phase ``p``: for the q-th live
    block of group g (slot ``slots[ptr[g] + q]``) at the phase's t-th tap
    ``(tap_h[p, t], tap_w[p, t])``, ``w[s, th, tw, u, r]`` (forward) or
    ``w[s, th, tw, r, u]`` (``transpose``, data gradient).
    """
    bs = w.shape[3]
    phases = tap_count.shape[0]
    groups = ptr.shape[0] - 1
    while True:
        task = fetch_add(counter, 0, 1)
        if task >= phases * groups:
            break
        p = task // groups
        g = task % groups
        nt = tap_count[p]
        start = ptr[g]
        for q in range(ptr[g + 1] - start):
            s = slots[start + q]
            for t in range(nt):
                th = tap_h[p, t]
                tw = tap_w[p, t]
                col = (q * nt + t) * bs
                if transpose:
                    for r in range(bs):
                        for u in range(bs):
                            wp[p, g, r, col + u] = w[s, th, tw, r, u]
                else:
                    for u in range(bs):
                        for r in range(bs):
                            wp[p, g, r, col + u] = w[s, th, tw, u, r]


@njit(cache=True)
def _gather_layout(nnz, src_blocks, max_taps, B):
    """``(shared, ldc)``: whether the gather first builds the tile's full im2col rows
    (many live blocks: ``nnz > 1.25 * src_blocks``), and their length."""
    shared = nnz * 4 > src_blocks * 5
    return shared, (src_blocks * max_taps * B if shared else 1)


@njit(fastmath=_FASTMATH, **_KERNEL)
def _gather_conv(src, src1, wp, ptr, other, grid_h, grid_w, phase_h, phase_w, tap_count, off_h, off_w,
                 step_h, step_w, dst_step_h, dst_step_w, max_workers, dst, dst1, panels, flats, cols_all, cols_rows,
                 tiles_out, dpixs, spixs, counter):
    """dst[n, gB + r, phase_h[p] + a*dst_step_h, phase_w[p] + b*dst_step_w] =
    sum over the live blocks o = other[ptr[g]:ptr[g+1]] (q-th), taps t < tap_count[p], u < B of
        src[n, a*step_h + off_h[p, t], b*step_w + off_w[p, t], oB + u] * wp[p, g, r, (q*nt + t)*B + u]
    with src pixels outside the array read as zero.

    src ``(N, Hs, Ws, Cs)`` is channels-last; dst ``(N, groups*B, Hd, Wd)`` is NCHW.
    Phase p covers the ``grid_h[p] x grid_w[p]`` dst pixels ``(a, b)``.  Every dst
    element in some phase is written (zeros where no live block or no tap reaches it).
    ``src1``/``dst1`` are 1-D views of src/dst.  Per-thread scratch (first index: the
    thread), each also given as a flat view: panels ``(T, 4, lmax)`` / flats ``(T, 4*lmax)``,
    cols_rows ``(T, PIXEL_TILE, ldc)`` / cols_all ``(T, PIXEL_TILE * ldc)`` (see
    :func:`_gather_layout`), tiles_out ``(T, PIXEL_TILE, B)``, dpixs ``(T, PIXEL_TILE)`` and
    spixs ``(T, PIXEL_TILE, max taps)`` int64.  (No reshapes inside: the kernel is compiled
    without reference counting, which only allows views made by indexing.)
    """
    # Thread/data mapping: every thread takes task numbers from the shared counter;
    # task = ((n * phases + p) * tiles + tile) * splits + part owns dst pixels
    # [tile*PT, tile*PT + PT) of phase p (row-major over (a, b)) of image n in the channel
    # blocks g = part, part + splits, ... (splits > 1 only when there are too few pixel
    # tiles to give max_workers tasks).
    # Packing: when the live blocks are many (nnz > 1.25 * source blocks), the task first
    # gathers the tile's full im2col rows cols[i, (o*nt + t)*B + u] (every source block o,
    # B-channel runs from src) once, and each group then copies its live blocks' nt*B-long
    # runs from it; otherwise each group gathers its B-channel runs straight from src.
    n_img, src_h, src_w, src_c = src.shape
    bs = wp.shape[2]
    lmax = wp.shape[3]
    groups = ptr.shape[0] - 1
    phases = tap_count.shape[0]
    src_blocks = src_c // bs
    max_nt = 0
    for p in range(phases):
        max_nt = max(max_nt, tap_count[p])
    shared, ldc = _gather_layout(other.shape[0], src_blocks, max_nt, bs)
    max_pixels = 0
    for p in range(phases):
        max_pixels = max(max_pixels, grid_h[p] * grid_w[p])
    tiles = (max_pixels + PIXEL_TILE - 1) // PIXEL_TILE
    base_tasks = n_img * phases * tiles
    splits = 1
    if base_tasks < max_workers:
        splits = min(max(groups, 1), (max_workers + base_tasks - 1) // max(base_tasks, 1))
    n_tasks = base_tasks * splits
    dst_hw = dst.shape[2] * dst.shape[3]
    me = fetch_add(counter, 1, 1)
    panel = panels[me]
    flat = flats[me]
    cols = cols_all[me]
    cols2 = cols_rows[me]
    tile_out = tiles_out[me]
    dpix = dpixs[me]
    spix = spixs[me]
    while True:
        task = fetch_add(counter, 0, 1)
        if task >= n_tasks:
            break
        part = task % splits
        rest = task // splits
        tile = rest % tiles
        rest = rest // tiles
        p = rest % phases
        n = rest // phases
        gw = grid_w[p]
        npix = grid_h[p] * gw
        p0 = tile * PIXEL_TILE
        if p0 >= npix:
            continue
        rows = min(npix - p0, PIXEL_TILE)
        nt = tap_count[p]
        padded = (rows + 3) // 4 * 4
        # flat source pixel offset of (row i, tap t), -1 outside; flat dst pixel of row i
        for i in range(rows):
            a = (p0 + i) // gw
            b = (p0 + i) - a * gw
            dpix[i] = (phase_h[p] + a * dst_step_h) * dst.shape[3] + phase_w[p] + b * dst_step_w
            for t in range(nt):
                hs = a * step_h + off_h[p, t]
                ws = b * step_w + off_w[p, t]
                if hs >= 0 and hs < src_h and ws >= 0 and ws < src_w:
                    spix[i, t] = ((n * src_h + hs) * src_w + ws) * src_c
                else:
                    spix[i, t] = -1
        if shared:
            for i in range(rows):
                for t in range(nt):
                    sp = spix[i, t]
                    if sp >= 0:
                        for o in range(src_blocks):
                            _copy(cols, i * ldc + (o * nt + t) * bs, src1, sp + o * bs, bs)
                    else:
                        for o in range(src_blocks):
                            _fill_zero(cols, i * ldc + (o * nt + t) * bs, bs)
            for i in range(rows, padded):
                _fill_zero(cols, i * ldc, src_blocks * nt * bs)
        for g in range(part, groups, splits):
            start = ptr[g]
            m = ptr[g + 1] - start
            length = m * nt * bs
            out0 = (n * groups + g) * bs * dst_hw
            if length == 0:
                for r in range(bs):
                    for i in range(rows):
                        dst1[out0 + r * dst_hw + dpix[i]] = 0
                continue
            run = nt * bs
            wpg = wp[p, g]
            if shared and m == 1:
                # a single live block: its im2col run is already contiguous
                for i0 in range(0, padded, 4):
                    for r in range(0, bs, 4):
                        _dot4x4(cols2, i0, other[start] * run, wpg, r, 0, run, tile_out, i0, r, False)
                for r in range(bs):
                    for i in range(rows):
                        dst1[out0 + r * dst_hw + dpix[i]] = tile_out[i, r]
                continue
            for i0 in range(0, padded, 4):
                # 4 pixel rows of the reduction panel, packed into an L1-sized buffer
                for i in range(i0, i0 + 4):
                    row = (i - i0) * lmax
                    if i >= rows:
                        _fill_zero(flat, row, length)
                    elif shared:
                        for q in range(m):
                            _copy(flat, row + q * run, cols, i * ldc + other[start + q] * run, run)
                    else:
                        for t in range(nt):
                            sp = spix[i, t]
                            if sp >= 0:
                                for q in range(m):
                                    _copy(flat, row + (q * nt + t) * bs, src1, sp + other[start + q] * bs, bs)
                            else:
                                for q in range(m):
                                    _fill_zero(flat, row + (q * nt + t) * bs, bs)
                for r in range(0, bs, 4):
                    _dot4x4(panel, 0, 0, wpg, r, 0, length, tile_out, i0, r, False)
            for r in range(bs):
                for i in range(rows):
                    dst1[out0 + r * dst_hw + dpix[i]] = tile_out[i, r]


@njit(**_KERNEL)
def _images_last(dy3, flat, counter):
    """flat[(c*N + n)*P + p] = dy3[n, c, p]: every channel's pixels of all images in one
    row of ``flat`` (a 1-D view of a ``(C, N*P)`` array); task = one channel."""
    n_img, chans, n_pix = dy3.shape
    c = fetch_add(counter, 0, 1)
    while c < chans:
        for n in range(n_img):
            _copy(flat, (c * n_img + n) * n_pix, dy3[n, c], 0, n_pix)
        c = fetch_add(counter, 0, 1)


@njit(cache=True)
def _weight_chunk(n_rows, out_w):
    """``(output rows, pixels)`` per packed panel of the weight gradient."""
    rows = min(max(1, PIXEL_CHUNK // out_w), n_rows)
    return rows, rows * out_w


@njit(fastmath=_FASTMATH, **_KERNEL)
def _weight_grad(x, x1, dyt, row_ptr, row_cols, row_slots, out_h, out_w, stride_h, stride_w, pad_t, pad_l,
                 dil_h, dil_w, dw, panels, flats, counter):
    """dw[s, dh, dwi, k, c] = sum over images n and output pixels (oh, ow) of
    x[n, iB+k, oh*sh - pt + dh*dil_h, ow*sw - pl + dwi*dil_w] * dyt[jB+c, (n*Ho + oh)*Wo + ow]
    for the live entries (i, j, s); dead slots untouched.  ``x1`` is a 1-D view of x;
    panels / flats: per-thread scratch ``(T, B, chunk)`` / ``(T, B*chunk)`` with ``chunk``
    from :func:`_weight_chunk`."""
    # Thread/data mapping: every thread takes task numbers from the shared counter;
    # task = tap * in_blocks + i owns dw[s, dh, dwi] of every live (i, j, s) of block row i
    # at tap (dh, dwi).  The reduction runs over all N*Ho*Wo output pixels (images back to
    # back, so small images still give long dot products) in chunks of whole output rows:
    # per chunk the task packs panel[k, g] = shifted x (B x pixels) once and runs the
    # micro-kernel against dyt[jB:(j+1)B, chunk] for each live j.
    n_img, chans, height, width = x.shape
    _, kh, kw, bs, _ = dw.shape
    in_blocks = row_ptr.shape[0] - 1
    n_tasks = kh * kw * in_blocks
    n_rows = n_img * out_h               # output rows of all images
    rows_per_chunk, chunk = _weight_chunk(n_rows, out_w)
    me = fetch_add(counter, 1, 1)
    panel = panels[me]
    flat = flats[me]
    while True:
        task = fetch_add(counter, 0, 1)
        if task >= n_tasks:
            break
        i = task % in_blocks
        tap = task // in_blocks
        dh = tap // kw
        dwi = tap % kw
        start = row_ptr[i]
        stop = row_ptr[i + 1]
        if start == stop:
            continue
        # output columns whose input column is inside the image: ow in [lo, hi)
        shift_w = -pad_l + dwi * dil_w
        lo = 0
        while lo < out_w and lo * stride_w + shift_w < 0:
            lo += 1
        hi = out_w
        while hi > lo and (hi - 1) * stride_w + shift_w >= width:
            hi -= 1
        for r0 in range(0, n_rows, rows_per_chunk):
            r1 = min(n_rows, r0 + rows_per_chunk)
            length = (r1 - r0) * out_w
            for k in range(bs):
                for r in range(r0, r1):
                    n = r // out_h
                    oh = r - n * out_h
                    base = k * chunk + (r - r0) * out_w
                    ih = oh * stride_h - pad_t + dh * dil_h
                    if ih < 0 or ih >= height:
                        _fill_zero(flat, base, out_w)
                        continue
                    _fill_zero(flat, base, lo)
                    src0 = ((n * chans + i * bs + k) * height + ih) * width + shift_w
                    if stride_w == 1:
                        _copy(flat, base + lo, x1, src0 + lo, hi - lo)
                    else:
                        for ow in range(lo, hi):
                            flat[uint64(base + ow)] = x1[uint64(src0 + ow * stride_w)]
                    _fill_zero(flat, base + hi, out_w - hi)
            for e in range(start, stop):
                j = row_cols[e]
                out = dw[row_slots[e], dh, dwi]
                for k in range(0, bs, 4):
                    for c in range(0, bs, 4):
                        _dot4x4(panel, k, 0, dyt, j * bs + c, r0 * out_w, length, out, k, c, r0 > 0)
