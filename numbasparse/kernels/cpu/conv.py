"""Block-sparse 2-D convolution on CPUs: host functions around the kernels of
:mod:`.conv_kernels` (run as :mod:`.conv_programs` on torch's OpenMP team).

Shapes (all arrays C-contiguous numpy arrays, one dtype, float32 or float64):

* ``x  (N, C, H, W)``  input, NCHW, ``C = in_blocks * B``;
* ``y  (N, K, Ho, Wo)`` output, NCHW, ``K = out_blocks * B``;
* ``w  (capacity, kh, kw, B, B)``: ``w[s, dh, dw, k, c]`` multiplies input channel
  ``iB + k`` at tap ``(dh, dw)`` into output channel ``jB + c``, for the live entry
  ``(i, j)`` stored in slot ``s``.

Geometry: ``y[n, jB+c, oh, ow] = sum x[n, iB+k, oh*sh - pt + dh*dil_h, ow*sw - pl + dw*dil_w]
* w[s, dh, dw, k, c]`` over live ``(i, j, s)``, taps and ``k``; out-of-range input
pixels are zero.  ``stride = (sh, sw)``, ``dilation = (dil_h, dil_w)`` and ``padding``
either ``(ph, pw)`` (``ph`` rows at the top and at the bottom, ``pw`` columns on the
left and on the right, as in ``torch.nn.functional.conv2d``) or ``(top, left, bottom,
right)``; ``pt``, ``pl`` are the top / left padding, the bottom / right padding only
shows in ``Ho = (H + top + bottom - dil_h*(kh - 1) - 1) // sh + 1`` (likewise
``Wo``).  Every public function checks its arguments (types, shapes, dtypes, table
ranges, the spatial size of ``y`` / ``dy`` against the geometry, no slot twice in the
weight gradient's tables) before any kernel runs.
"""
from __future__ import annotations

import functools

import numpy as np

from ..checks import check_conv_geometry, check_conv_sizes, check_distinct_slots, check_no_overlap
from . import conv_programs, runtime
from .conv_kernels import PIXEL_TILE, _gather_layout, _weight_chunk
from .notice import compiling as _compiling

__all__ = ["forward", "backward_data", "backward_weight", "BLOCK_SIZES"]

BLOCK_SIZES = (8, 16, 32)
WORKERS_PER_THREAD = 4  # the gather splits its pixel tiles to give every thread this many tasks


def _forward_taps(kh, kw, pt, pl, dil_h, dil_w):
    taps = np.arange(kh * kw)
    tap_h = (taps // kw).reshape(1, -1)
    tap_w = (taps % kw).reshape(1, -1)
    return tap_h, tap_w, np.array([kh * kw]), -pt + tap_h * dil_h, -pl + tap_w * dil_w


def _data_phases(kh, kw, sh, sw, pt, pl, dil_h, dil_w, height, width):
    """Phases of the data gradient: input pixels (ph + sh*a, pw + sw*b) and the taps
    (dh, dw) that reach an output pixel from them: (ph + pt - dh*dil_h) % sh == 0,
    at output row a + (ph + pt - dh*dil_h) // sh (and likewise for columns)."""
    phases = sh * sw
    tap_h = np.zeros((phases, kh * kw), np.int64)
    tap_w = np.zeros_like(tap_h)
    off_h = np.zeros_like(tap_h)
    off_w = np.zeros_like(tap_h)
    count = np.zeros(phases, np.int64)
    phase_h = np.zeros(phases, np.int64)
    phase_w = np.zeros(phases, np.int64)
    grid_h = np.zeros(phases, np.int64)
    grid_w = np.zeros(phases, np.int64)
    for p in range(phases):
        ph, pw = divmod(p, sw)
        phase_h[p], phase_w[p] = ph, pw
        grid_h[p] = max(0, -(-(height - ph) // sh))
        grid_w[p] = max(0, -(-(width - pw) // sw))
        rows = [dh for dh in range(kh) if (ph + pt - dh * dil_h) % sh == 0]
        cols = [dw for dw in range(kw) if (pw + pl - dw * dil_w) % sw == 0]
        t = 0
        for dh in rows:
            for dw in cols:
                tap_h[p, t], tap_w[p, t] = dh, dw
                off_h[p, t] = (ph + pt - dh * dil_h) // sh
                off_w[p, t] = (pw + pl - dw * dil_w) // sw
                t += 1
        count[p] = t
    return phase_h, phase_w, grid_h, grid_w, tap_h, tap_w, count, off_h, off_w


def _announce_compile(host):
    """Announce the first call's compile pause of a conv host function (see .notice)."""
    @functools.wraps(host)
    def wrapper(first, *args):
        with _compiling(("conv", host.__name__, first.dtype.str),
                        f"CPU block-sparse conv kernels for {first.dtype.name}"):
            return host(first, *args)
    return wrapper


def _max_live(ptr):
    counts = np.diff(np.asarray(ptr))
    return int(counts.max()) if counts.size else 0


def _threads(out_elements, taps, nnz, groups, B):
    """Threads for a pass writing ``out_elements`` values, each a reduction over the
    group's live blocks (``nnz / groups`` on average) at ``taps`` taps."""
    return runtime.threads_for(2.0 * out_elements * taps * B * nnz / max(groups, 1))


def _gather(src_cl, wp, ptr, other, grid_h, grid_w, phase_h, phase_w, count, off_h, off_w, step, dst_step,
            dst, threads):
    """Run the gather kernel with per-thread scratch."""
    B = wp.shape[2]
    max_taps = int(count.max()) if count.size else 0
    _, ldc = _gather_layout(other.shape[0], src_cl.shape[3] // B, max_taps, B)
    dt = src_cl.dtype
    panels = np.empty((threads, 4, wp.shape[3]), dt)
    cols = np.empty((threads, PIXEL_TILE, ldc), dt)
    conv_programs.run("gather", (src_cl, src_cl.reshape(-1), wp, ptr, other, grid_h, grid_w, phase_h, phase_w,
                                 count, off_h, off_w, dst, dst.reshape(-1), panels, panels.reshape(threads, -1),
                                 cols.reshape(threads, -1), cols, np.empty((threads, PIXEL_TILE, B), dt),
                                 np.empty((threads, PIXEL_TILE), np.int64),
                                 np.empty((threads, PIXEL_TILE, max(max_taps, 1)), np.int64)),
                      (step[0], step[1], dst_step[0], dst_step[1], threads * WORKERS_PER_THREAD), threads)


@_announce_compile
def forward(x, w, col_ptr, col_rows, col_slots, block_size, stride, padding, dilation, y):
    """y (N, K, Ho, Wo) = conv2d(x (N, C, H, W), W); every element of y is written.

    ``stride = (sh, sw)``, ``padding = (ph, pw)`` or ``(top, left, bottom, right)``,
    ``dilation = (dil_h, dil_w)``; ``(Ho, Wo)`` must be the output size they give.
    Everything is checked before a kernel runs.
    """
    B, (stride, padding, dilation) = _check(block_size, {"x": x, "w": w, "y": y}, ("x", "y"), stride, padding,
                                            dilation)
    _check_channels(x, y, col_ptr, B, "col")
    col_ptr, col_rows, col_slots = _check_tables("col", col_ptr, col_rows, col_slots, x.shape[1] // B, w.shape[0])
    n_img, _, height, width = x.shape
    _, kh, kw, bs, _ = w.shape
    if y.size == 0:
        return
    threads = _threads(y.size, kh * kw, col_rows.shape[0], col_ptr.shape[0] - 1, bs)
    x_cl = np.empty((n_img, height, width, x.shape[1]), dtype=x.dtype)
    conv_programs.run("channels_last", (x, x_cl), (), threads)
    tap_h, tap_w, count, off_h, off_w = _forward_taps(kh, kw, padding[0], padding[1], dilation[0], dilation[1])
    groups = col_ptr.shape[0] - 1
    lmax = max(_max_live(col_ptr) * kh * kw * bs, 1)
    wp = np.empty((1, groups, bs, lmax), dtype=w.dtype)
    conv_programs.run("pack_weights", (w, col_ptr, col_slots, tap_h, tap_w, count, wp), (0,), threads)
    zero = np.zeros(1, np.int64)
    _gather(x_cl, wp, col_ptr, col_rows, np.array([y.shape[2]]), np.array([y.shape[3]]), zero, zero, count, off_h,
            off_w, stride, (1, 1), y, threads)


@_announce_compile
def backward_data(dy, w, row_ptr, row_cols, row_slots, block_size, stride, padding, dilation, dx):
    """dx (N, C, H, W) = gradient of the convolution with respect to x, from dy (N, K, Ho, Wo).

    Every element of dx is written (exact zeros where no live block or tap reaches it).
    Geometry as in :func:`forward` (``(Ho, Wo)`` the output size of ``(H, W)``).
    """
    B, (stride, padding, dilation) = _check(block_size, {"dy": dy, "w": w, "dx": dx}, ("dx", "dy"), stride,
                                            padding, dilation)
    _check_channels(dx, dy, row_ptr, B, "row")
    row_ptr, row_cols, row_slots = _check_tables("row", row_ptr, row_cols, row_slots, dy.shape[1] // B, w.shape[0])
    n_img, _, out_h, out_w = dy.shape
    _, kh, kw, bs, _ = w.shape
    height, width = dx.shape[2], dx.shape[3]
    if dx.size == 0:
        return
    threads = _threads(dx.size, kh * kw, row_cols.shape[0], row_ptr.shape[0] - 1, bs)
    dy_cl = np.empty((n_img, out_h, out_w, dy.shape[1]), dtype=dy.dtype)
    conv_programs.run("channels_last", (dy, dy_cl), (), threads)
    phase_h, phase_w, grid_h, grid_w, tap_h, tap_w, count, off_h, off_w = _data_phases(
        kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], height, width)
    groups = row_ptr.shape[0] - 1
    lmax = max(_max_live(row_ptr) * int(count.max()) * bs, 1)
    wp = np.empty((count.shape[0], groups, bs, lmax), dtype=w.dtype)
    conv_programs.run("pack_weights", (w, row_ptr, row_slots, tap_h, tap_w, count, wp), (1,), threads)
    _gather(dy_cl, wp, row_ptr, row_cols, grid_h, grid_w, phase_h, phase_w, count, off_h, off_w, (1, 1), stride,
            dx, threads)


@_announce_compile
def backward_weight(x, dy, row_ptr, row_cols, row_slots, block_size, stride, padding, dilation, dw):
    """dw (capacity, kh, kw, B, B): gradient at the live slots; dead slots untouched.

    ``x (N, C, H, W)`` and ``dy (N, K, Ho, Wo)`` are NCHW; geometry as in :func:`forward`.
    No slot may appear twice in ``row_slots`` (a slot's gradient is written by one task).
    """
    B, (stride, padding, dilation) = _check(block_size, {"x": x, "dy": dy, "dw": dw}, ("x", "dy"), stride, padding,
                                            dilation)
    _check_channels(x, dy, row_ptr, B, "row")
    row_ptr, row_cols, row_slots = _check_tables("row", row_ptr, row_cols, row_slots, dy.shape[1] // B, dw.shape[0])
    check_distinct_slots("row_slots", row_slots)
    if row_cols.shape[0] == 0:
        return
    n_img, k_out, out_h, out_w = dy.shape
    if n_img == 0 or out_h * out_w == 0:
        dw[np.asarray(row_slots)] = 0
        return
    _, kh, kw, bs, _ = dw.shape
    threads = _threads(dy.size * bs, kh * kw, row_cols.shape[0], dy.shape[1] // bs, bs)
    dyt = np.empty((k_out, n_img * out_h * out_w), dtype=dy.dtype)
    conv_programs.run("images_last", (dy.reshape(n_img, k_out, out_h * out_w), dyt.reshape(-1)), (), threads)
    panels = np.empty((threads, bs, _weight_chunk(n_img * out_h, out_w)[1]), dtype=x.dtype)
    conv_programs.run("weight_grad", (x, x.reshape(-1), dyt, row_ptr, row_cols, row_slots, dw, panels,
                                      panels.reshape(threads, -1)),
                      (out_h, out_w, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]), threads)


# ------------------------------------------------------------------- checks
_DTYPES = ("float32", "float64")


def _check(block_size, arrays, sizes, stride, padding, dilation):
    """``(B, (stride, padding, dilation))`` after checking the block size, array types,
    dtypes, contiguity, ranks, the geometry numbers (padding returned as ``(top, left,
    bottom, right)``) and the spatial sizes: ``sizes = (input name, output name)``, the
    output's size must be what the input's gives."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or int(block_size) not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    B = int(block_size)
    dtype = None
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
        if a.dtype.name not in _DTYPES:
            raise TypeError(f"{name} has dtype {a.dtype}; supported dtypes are float32 and float64")
        if dtype is None:
            dtype = a.dtype
        elif a.dtype != dtype:
            raise TypeError("dtype mismatch: " + ", ".join(f"{n}={v.dtype}" for n, v in arrays.items()))
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        if name in ("w", "dw"):
            if a.ndim != 5 or a.shape[3:] != (B, B):
                raise ValueError(f"{name} must have shape (capacity, kh, kw, {B}, {B}), got {a.shape}")
        elif a.ndim != 4:
            raise ValueError(f"{name} must be 4-D NCHW, got shape {a.shape}")
    for name in ("y", "dx", "dw"):
        if name in arrays and not arrays[name].flags.writeable:
            raise ValueError(f"{name} is read-only")
    check_no_overlap(arrays)
    geometry = check_conv_geometry(stride, padding, dilation)
    kernel = arrays["dw" if "dw" in arrays else "w"].shape[1:3]
    check_conv_sizes(sizes[0], arrays[sizes[0]].shape, sizes[1], arrays[sizes[1]].shape, kernel, *geometry)
    return B, geometry


def _check_channels(inputs, outputs, ptr, B, kind):
    """Channels are multiples of B and match the tables; image counts match."""
    if inputs.shape[0] != outputs.shape[0]:
        raise ValueError(f"image count mismatch: {inputs.shape[0]} and {outputs.shape[0]}")
    for name, a in (("input", inputs), ("output", outputs)):
        if a.shape[1] % B:
            raise ValueError(f"{name} has {a.shape[1]} channels, not a multiple of block_size {B}")
    groups = (outputs if kind == "col" else inputs).shape[1] // B
    if len(ptr) != groups + 1:
        raise ValueError(f"{kind}_ptr has length {len(ptr)}, expected {groups + 1} ({groups} channel blocks)")


def _check_tables(kind, ptr, idx, slots, others, capacity):
    for name, t in ((f"{kind}_ptr", ptr), (f"{kind} indices", idx), (f"{kind}_slots", slots)):
        if not isinstance(t, np.ndarray) or t.ndim != 1 or t.dtype.kind not in "iu":
            raise TypeError(f"{name} must be a 1-D integer numpy array")
    if slots.shape != idx.shape:
        raise ValueError(f"{kind}_slots has length {slots.shape[0]}, expected {idx.shape[0]}")
    if ptr[0] != 0 or ptr[-1] != idx.shape[0] or np.any(np.diff(ptr) < 0):
        raise ValueError(f"{kind}_ptr must rise from 0 to the number of entries ({idx.shape[0]})")
    for name, t, bound in ((f"{kind} indices", idx, others), (f"{kind}_slots", slots, capacity)):
        if t.size and (t.min() < 0 or t.max() >= bound):
            raise ValueError(f"{name} must lie in [0, {bound}), got values in [{t.min()}, {t.max()}]")
    return tuple(np.ascontiguousarray(t, dtype=np.int32) for t in (ptr, idx, slots))
