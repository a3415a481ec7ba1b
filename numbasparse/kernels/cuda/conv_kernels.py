"""numba.cuda block-sparse 2-D convolution kernels (forward, data gradient, weight
gradient): the kernel factories.  The host side (grids, launches, the checked public
functions) is :mod:`.conv`.

Shapes (one dtype, float32, float64 or float16 (accumulated in float32); block size ``B`` in 8, 16, 32):

* ``x  (N, C, H, W)`` NCHW input, ``C = in_blocks * B``;
* ``y  (N, K, Ho, Wo)`` NCHW output, ``K = out_blocks * B``;
* ``w  (capacity, kh, kw, B, B)``: ``w[s, dh, dw, k, c]`` multiplies input channel
  ``iB + k`` at tap ``(dh, dw)`` into output channel ``jB + c`` for the live entry
  ``(i, j)`` stored in slot ``s``.

``y[n, jB+c, oh, ow] = sum x[n, iB+k, oh*sh - pt + dh*dil_h, ow*sw - pl + dw*dil_w] *
w[s, dh, dw, k, c]``, input pixels outside the image being zero (``pt``, ``pl`` are the
top / left padding; the kernels take the output size from ``y`` / ``dy``).

Design: direct convolution, one output tile per thread-block, staged through shared
memory.  For every live block and every tap the thread-block stages the
``TP x B`` input values that tap needs for its pixels (gathered, zeros in the
padding) and the ``B x B`` weight block of that tap, then every thread accumulates a
``TP/8 x B/8`` register tile.  No atomics anywhere: each thread-block owns its
output tile (forward / data gradient) or its ``B x B`` weight-gradient block at one
tap, and loops over everything that feeds it, so results are deterministic (the
weight gradient needs every live entry in a slot of its own, which the checked
wrapper enforces).  A thread-block has 64 threads viewed as an 8 x 8 grid
``tx = threadIdx.x % 8``, ``ty = threadIdx.x // 8``.

Every grid is one-dimensional (``gridDim.y`` / ``.z`` stop at 65535, which a layout
with more channel blocks would exceed); each kernel decomposes ``blockIdx.x`` itself.

Kernels are built lazily per ``(B, dtype)`` (shared-array shapes are compile-time
constants) and cached.
"""
from __future__ import annotations

import functools

from numba import cuda

from .host import compute_type

_TX = 8
_TY = 8
THREADS = _TX * _TY
PIXEL_TILE = 32      # output pixels per thread-block (forward / data gradient), pixels per step (weight)


@functools.lru_cache(maxsize=None)
def _forward_kernel(B: int, dtype_str: str):
    """``y[n, jB:(j+1)B, tile] = sum over live (i, j, s) and taps of x-gathered @ w[s, tap]``."""
    AT = compute_type(dtype_str)
    TP = PIXEL_TILE
    TX = _TX
    NT = THREADS
    BP = B + 1
    RP = TP // TX          # pixels per thread (4)
    RC = B // _TY          # channels per thread (1, 2, 4)
    X_ITEMS = (TP * B + NT - 1) // NT
    W_ITEMS = (B * B + NT - 1) // NT

    # Thread/data mapping.
    #   grid = (out_blocks * N * tiles,) with tiles = ceil(Ho*Wo / TP) (see conv._pixel_grid);
    #   blockIdx.x = (j * N + n) * tiles + pixel tile (tiles fastest, then images, then
    #   the output block column j).  The thread-block owns y[n, jB:(j+1)B, p0:p0+TP]
    #   (p = oh*Wo + ow) and nothing else writes it.  Thread (ty, tx) accumulates in
    #   registers the RP x RC outputs
    #       pixel p0 + tx + a*TX, channel jB + ty + b*TY   (a < RP, b < RC),
    #   so a warp writes runs of consecutive pixels (coalesced NCHW stores).
    #   For every live input block i of column j and every tap (uniform trip counts, so
    #   every thread reaches every syncthreads):
    #     x_s[r, k] = x[n, iB+k, ih(r), iw(r)] (0 in the padding); element
    #                 l = t + q*NT -> (r = l % TP, k = l // TP): consecutive threads
    #                 read consecutive pixels of one channel;
    #     w_s[k, c] = w[s, dh, dw, k, c], element l -> (k = l // B, c = l % B);
    #   then each thread does RP*RC FMAs per k for RP + RC shared loads.
    @cuda.jit
    def kernel(x, w, ptr, rows, slots, sh, sw, pt, pl, dil_h, dil_w, y):
        t = cuda.threadIdx.x
        tx = t % TX
        ty = t // TX
        height = x.shape[2]
        width = x.shape[3]
        kh = w.shape[1]
        kw = w.shape[2]
        out_w = y.shape[3]
        n_pix = y.shape[2] * out_w
        tiles = (n_pix + TP - 1) // TP
        image_tile = cuda.blockIdx.x // tiles
        p0 = (cuda.blockIdx.x - image_tile * tiles) * TP
        j = image_tile // y.shape[0]
        n = image_tile - j * y.shape[0]
        x_s = cuda.shared.array((TP, BP), AT)
        w_s = cuda.shared.array((B, BP), AT)
        acc = cuda.local.array((RP, RC), AT)
        xv = cuda.local.array(RP, AT)
        for a in range(RP):
            for b in range(RC):
                acc[a, b] = 0
        for e in range(ptr[j], ptr[j + 1]):
            c0 = rows[e] * B
            s = slots[e]
            for dh in range(kh):
                for dw in range(kw):
                    for q in range(X_ITEMS):
                        l = t + q * NT
                        if l < TP * B:
                            r = l % TP
                            k = l // TP
                            p = p0 + r
                            v = AT(0)
                            if p < n_pix:
                                oh = p // out_w
                                ih = oh * sh - pt + dh * dil_h
                                iw = (p - oh * out_w) * sw - pl + dw * dil_w
                                if ih >= 0 and ih < height and iw >= 0 and iw < width:
                                    v = AT(x[n, c0 + k, ih, iw])
                            x_s[r, k] = v
                    for q in range(W_ITEMS):
                        l = t + q * NT
                        if l < B * B:
                            w_s[l // B, l % B] = w[s, dh, dw, l // B, l % B]
                    cuda.syncthreads()
                    for k in range(B):
                        for a in range(RP):
                            xv[a] = x_s[tx + a * TX, k]
                        for b in range(RC):
                            wv = w_s[k, ty + b * _TY]
                            for a in range(RP):
                                acc[a, b] += xv[a] * wv
                    cuda.syncthreads()  # before the next tap overwrites x_s / w_s
        for b in range(RC):
            ch = j * B + ty + b * _TY
            for a in range(RP):
                p = p0 + tx + a * TX
                if p < n_pix:
                    oh = p // out_w
                    y[n, ch, oh, p - oh * out_w] = acc[a, b]

    return kernel


@functools.lru_cache(maxsize=None)
def _data_kernel(B: int, dtype_str: str):
    """``dx[n, iB:(i+1)B, tile] = sum over live (i, j, s) and taps of dy-gathered @ w[s, tap].T``."""
    AT = compute_type(dtype_str)
    TP = PIXEL_TILE
    TX = _TX
    NT = THREADS
    BP = B + 1
    RP = TP // TX
    RC = B // _TY
    D_ITEMS = (TP * B + NT - 1) // NT
    W_ITEMS = (B * B + NT - 1) // NT

    # Thread/data mapping.
    #   grid = (in_blocks * N * tiles,) with tiles = ceil(H*W / TP) (see conv._pixel_grid);
    #   blockIdx.x = (i * N + n) * tiles + pixel tile.  The thread-block owns
    #   dx[n, iB:(i+1)B, p0:p0+TP] (p = ih*W + iw) and nothing else writes it.
    #   Thread (ty, tx) accumulates the RP x RC outputs pixel p0 + tx + a*TX, channel
    #   iB + ty + b*TY.
    #   For every live output block j of row i and every tap (dh, dw):
    #     d_s[r, c] = dy[n, jB+c, oh, ow] where ih + pt - dh*dil_h = oh*sh (and likewise
    #                 for columns), 0 when not divisible by the stride or out of range;
    #                 element l -> (r = l % TP, c = l // TP);
    #     w_s[k, c] = w[s, dh, dw, k, c], element l -> (k = l // B, c = l % B);
    #   then acc[a, b] += d_s[pixel a, c] * w_s[channel b, c] over c.
    @cuda.jit
    def kernel(dy, w, ptr, cols, slots, sh, sw, pt, pl, dil_h, dil_w, dx):
        t = cuda.threadIdx.x
        tx = t % TX
        ty = t // TX
        out_h = dy.shape[2]
        out_w = dy.shape[3]
        kh = w.shape[1]
        kw = w.shape[2]
        width = dx.shape[3]
        n_pix = dx.shape[2] * width
        tiles = (n_pix + TP - 1) // TP
        image_tile = cuda.blockIdx.x // tiles
        p0 = (cuda.blockIdx.x - image_tile * tiles) * TP
        i = image_tile // dx.shape[0]
        n = image_tile - i * dx.shape[0]
        d_s = cuda.shared.array((TP, BP), AT)
        w_s = cuda.shared.array((B, BP), AT)
        acc = cuda.local.array((RP, RC), AT)
        dv = cuda.local.array(RP, AT)
        for a in range(RP):
            for b in range(RC):
                acc[a, b] = 0
        for e in range(ptr[i], ptr[i + 1]):
            c0 = cols[e] * B
            s = slots[e]
            for dh in range(kh):
                for dw in range(kw):
                    for q in range(D_ITEMS):
                        l = t + q * NT
                        if l < TP * B:
                            r = l % TP
                            c = l // TP
                            p = p0 + r
                            v = AT(0)
                            if p < n_pix:
                                ih = p // width
                                num_h = ih + pt - dh * dil_h
                                num_w = (p - ih * width) + pl - dw * dil_w
                                if num_h >= 0 and num_w >= 0 and num_h % sh == 0 and num_w % sw == 0:
                                    oh = num_h // sh
                                    ow = num_w // sw
                                    if oh < out_h and ow < out_w:
                                        v = AT(dy[n, c0 + c, oh, ow])
                            d_s[r, c] = v
                    for q in range(W_ITEMS):
                        l = t + q * NT
                        if l < B * B:
                            w_s[l // B, l % B] = w[s, dh, dw, l // B, l % B]
                    cuda.syncthreads()
                    for c in range(B):
                        for a in range(RP):
                            dv[a] = d_s[tx + a * TX, c]
                        for b in range(RC):
                            wv = w_s[ty + b * _TY, c]
                            for a in range(RP):
                                acc[a, b] += dv[a] * wv
                    cuda.syncthreads()  # before the next tap overwrites d_s / w_s
        for b in range(RC):
            ch = i * B + ty + b * _TY
            for a in range(RP):
                p = p0 + tx + a * TX
                if p < n_pix:
                    ih = p // width
                    dx[n, ch, ih, p - ih * width] = acc[a, b]

    return kernel


@functools.lru_cache(maxsize=None)
def _weight_kernel(B: int, dtype_str: str):
    """``dw[s, dh, dw] = sum over images and output pixels of x-shifted^T dy`` per live entry and tap."""
    AT = compute_type(dtype_str)
    TP = PIXEL_TILE
    TX = _TX
    TY = _TY
    NT = THREADS
    BP = B + 1
    RA = B // TY           # dw rows (input channels) per thread
    RB = B // TX           # dw columns (output channels) per thread
    ITEMS = (TP * B + NT - 1) // NT

    # Thread/data mapping.
    #   grid = (kh*kw * nnz,) (see conv._weight_grid); blockIdx.x = tap * nnz + e, for live
    #   entry e in row-major order (entries fastest) and tap = dh*kw + dw.  The
    #   thread-block owns dw[s, dh, dw] (B x B) of entry e = (i, j, s) and nothing else
    #   writes it; dead slots are never touched.  Thread (ty, tx) accumulates the
    #   RA x RB outputs dw[s, dh, dw, ty + a*TY, tx + b*TX].  The thread-block walks
    #   the N*Ho*Wo output pixels in steps of TP (uniform trip count):
    #     x_s[r, k] = x[n, iB+k, ih, iw] at the tap (0 in the padding),
    #     d_s[r, c] = dy[n, jB+c, oh, ow]; element l -> (r = l % TP, k or c = l // TP),
    #   then for each staged pixel RA + RB shared loads and RA*RB FMAs per thread.
    @cuda.jit
    def kernel(x, dy, ptr, cols, slots, sh, sw, pt, pl, dil_h, dil_w, dw):
        t = cuda.threadIdx.x
        tx = t % TX
        ty = t // TX
        nnz = cols.shape[0]
        tap = cuda.blockIdx.x // nnz
        e = cuda.blockIdx.x - tap * nnz
        kw = dw.shape[2]
        dh = tap // kw
        dwi = tap - dh * kw
        # block row i of entry e: the last i with ptr[i] <= e (binary search)
        lo = 0
        hi = ptr.shape[0] - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ptr[mid] <= e:
                lo = mid
            else:
                hi = mid
        i0 = lo * B
        j0 = cols[e] * B
        s = slots[e]
        n_img = x.shape[0]
        height = x.shape[2]
        width = x.shape[3]
        out_w = dy.shape[3]
        n_pix = dy.shape[2] * out_w
        total = n_img * n_pix
        x_s = cuda.shared.array((TP, BP), AT)
        d_s = cuda.shared.array((TP, BP), AT)
        acc = cuda.local.array((RA, RB), AT)
        xv = cuda.local.array(RA, AT)
        for a in range(RA):
            for b in range(RB):
                acc[a, b] = 0
        for g0 in range(0, total, TP):
            for q in range(ITEMS):
                l = t + q * NT
                if l < TP * B:
                    r = l % TP
                    k = l // TP
                    g = g0 + r
                    xval = AT(0)
                    dval = AT(0)
                    if g < total:
                        n = g // n_pix
                        p = g - n * n_pix
                        oh = p // out_w
                        ow = p - oh * out_w
                        dval = AT(dy[n, j0 + k, oh, ow])
                        ih = oh * sh - pt + dh * dil_h
                        iw = ow * sw - pl + dwi * dil_w
                        if ih >= 0 and ih < height and iw >= 0 and iw < width:
                            xval = AT(x[n, i0 + k, ih, iw])
                    x_s[r, k] = xval
                    d_s[r, k] = dval
            cuda.syncthreads()
            for r in range(TP):
                for a in range(RA):
                    xv[a] = x_s[r, ty + a * TY]
                for b in range(RB):
                    dval = d_s[r, tx + b * TX]
                    for a in range(RA):
                        acc[a, b] += xv[a] * dval
            cuda.syncthreads()  # before the next step overwrites x_s / d_s
        for a in range(RA):
            for b in range(RB):
                dw[s, dh, dwi, ty + a * TY, tx + b * TX] = acc[a, b]

    return kernel
