"""numba.cuda block-sparse 2-D convolution: the host side (launch grids, the unchecked
launchers and the checked public functions) of the kernels in :mod:`.conv_kernels`,
where their design and thread-to-data mappings are described.

Shapes (one dtype, float32, float64 or float16 (accumulated in float32); block size ``B`` in 8, 16, 32):

* ``x  (N, C, H, W)`` NCHW input, ``C = in_blocks * B``;
* ``y  (N, K, Ho, Wo)`` NCHW output, ``K = out_blocks * B``;
* ``w  (capacity, kh, kw, B, B)``: ``w[s, dh, dw, k, c]`` multiplies input channel
  ``iB + k`` at tap ``(dh, dw)`` into output channel ``jB + c`` for the live entry
  ``(i, j)`` stored in slot ``s``.

Geometry: ``stride = (sh, sw)``, ``dilation = (dil_h, dil_w)`` and ``padding`` either
``(ph, pw)`` (``ph`` rows at the top and at the bottom, ``pw`` columns on the left and
on the right, as in ``torch.nn.functional.conv2d``) or ``(top, left, bottom, right)``.
``Ho = (H + top + bottom - dil_h*(kh - 1) - 1) // sh + 1`` (likewise ``Wo``).

Two entries per kernel, as in :mod:`.matmul`: the public ``forward`` /
``backward_data`` / ``backward_weight`` check shapes, dtypes, block size, geometry
(the spatial size of ``y`` / ``dy`` must be the output size that ``x`` / ``dx`` and
the geometry give), and every value of the layout tables, with no slot twice in the
weight gradient's (device tables are copied to the host for that, synchronizing on
``stream``); the private ``_forward`` / ``_backward_data`` / ``_backward_weight``
launch unchecked on ``stream`` and never synchronize, for callers whose arguments
are valid by construction (they use only the top / left padding and take the output
size from ``y`` / ``dy``).
"""
from __future__ import annotations

from ..checks import check_conv_geometry, check_conv_sizes
from .conv_kernels import PIXEL_TILE, THREADS, _data_kernel, _forward_kernel, _weight_kernel
from .host import check_floats, check_grouped_tables, dtype_of, flat_grid, host_in, shape_of

__all__ = ["forward", "backward_data", "backward_weight", "BLOCK_SIZES", "PIXEL_TILE", "THREADS"]

BLOCK_SIZES = (8, 16, 32)


# ---------------------------------------------------------------------- grids
def _pixel_grid(n_img: int, n_pix: int, groups: int) -> tuple:
    """1-D grid of the forward / data-gradient kernels: ``ceil(n_pix / PIXEL_TILE)``
    pixel tiles of each of ``n_img`` images for each of ``groups`` channel blocks."""
    return flat_grid((n_pix + PIXEL_TILE - 1) // PIXEL_TILE, n_img, groups)


def _weight_grid(nnz: int, taps: int) -> tuple:
    """1-D grid of the weight-gradient kernel: one thread-block per live entry and tap."""
    return flat_grid(nnz, taps)


# ------------------------------------------------------------ unchecked launches
def _geometry_args(stride, padding, dilation):
    return (int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]), int(dilation[0]), int(dilation[1]))


def _forward(x, w, col_ptr, col_rows, col_slots, block_size, stride, padding, dilation, y, stream=0):
    """Unchecked :func:`forward`: the arguments must already fit each other."""
    grid = _pixel_grid(y.shape[0], y.shape[2] * y.shape[3], col_ptr.shape[0] - 1)
    if grid[0] == 0:
        return
    _forward_kernel(int(block_size), dtype_of(x).str)[grid, THREADS, stream](
        host_in(x), host_in(w), host_in(col_ptr), host_in(col_rows), host_in(col_slots),
        *_geometry_args(stride, padding, dilation), y)


def _backward_data(dy, w, row_ptr, row_cols, row_slots, block_size, stride, padding, dilation, dx, stream=0):
    """Unchecked :func:`backward_data`: the arguments must already fit each other."""
    grid = _pixel_grid(dx.shape[0], dx.shape[2] * dx.shape[3], row_ptr.shape[0] - 1)
    if grid[0] == 0:
        return
    _data_kernel(int(block_size), dtype_of(dy).str)[grid, THREADS, stream](
        host_in(dy), host_in(w), host_in(row_ptr), host_in(row_cols), host_in(row_slots),
        *_geometry_args(stride, padding, dilation), dx)


def _backward_weight(x, dy, row_ptr, row_cols, row_slots, block_size, stride, padding, dilation, dw, stream=0):
    """Unchecked :func:`backward_weight`: the arguments must already fit each other."""
    grid = _weight_grid(row_cols.shape[0], dw.shape[1] * dw.shape[2])
    if grid[0] == 0:
        return
    _weight_kernel(int(block_size), dtype_of(x).str)[grid, THREADS, stream](
        host_in(x), host_in(dy), host_in(row_ptr), host_in(row_cols), host_in(row_slots),
        *_geometry_args(stride, padding, dilation), dw)


# ------------------------------------------------------------------- checked API
def _check_operands(block_size, arrays, weights, sizes, stride, padding, dilation):
    """``(B, shapes, (stride, padding, dilation))`` after checking the block size, the
    dtypes, the ranks (``weights``, the name of the weight-shaped array, 5-D
    ``(capacity, kh, kw, B, B)`` with ``kh, kw >= 1``; activations 4-D NCHW with
    channels a multiple of B), equal image counts, the geometry numbers (padding
    returned as ``(top, left, bottom, right)``) and the spatial sizes: ``sizes =
    (input name, output name)``, the output's size must be what the input's gives."""
    ranks = {name: 5 if name == weights else 4 for name in arrays}
    check_floats(block_size, BLOCK_SIZES, arrays, ranks)
    B = int(block_size)
    shapes = {name: shape_of(name, a) for name, a in arrays.items()}
    wshape = shapes[weights]
    if wshape[3:] != (B, B) or wshape[1] < 1 or wshape[2] < 1:
        raise ValueError(f"{weights} must have shape (capacity, kh, kw, {B}, {B}) with kh, kw >= 1, got {wshape}")
    images = None
    for name, shape in shapes.items():
        if name == weights:
            continue
        if shape[1] % B:
            raise ValueError(f"{name} has {shape[1]} channels, not a multiple of block_size {B}")
        if images is None:
            images = (name, shape[0])
        elif shape[0] != images[1]:
            raise ValueError(f"image count mismatch: {images[0]} has {images[1]} images, {name} has {shape[0]}")
    geometry = check_conv_geometry(stride, padding, dilation)
    check_conv_sizes(sizes[0], shapes[sizes[0]], sizes[1], shapes[sizes[1]], wshape[1:3], *geometry)
    return B, shapes, geometry


def forward(x, w, col_ptr, col_rows, col_slots, block_size, stride, padding, dilation, y, stream=0):
    """y (N, K, Ho, Wo) = conv2d(x (N, C, H, W), W); every element of y is written.

    ``stride = (sh, sw)``, ``padding = (ph, pw)`` or ``(top, left, bottom, right)``,
    ``dilation = (dil_h, dil_w)``; ``(Ho, Wo)`` must be the output size they give.
    Tables: ``col_ptr`` of length ``K/B + 1``, ``col_rows < C/B``, ``col_slots <
    capacity``.  Checks everything first (device tables are copied to the host for
    that).
    """
    B, shapes, geometry = _check_operands(block_size, {"x": x, "w": w, "y": y}, "w", ("x", "y"), stride, padding,
                                          dilation)
    check_grouped_tables("col", col_ptr, col_rows, col_slots, shapes["y"][1] // B, shapes["x"][1] // B,
                         shapes["w"][0], stream)
    _forward(x, w, col_ptr, col_rows, col_slots, B, *geometry, y, stream)


def backward_data(dy, w, row_ptr, row_cols, row_slots, block_size, stride, padding, dilation, dx, stream=0):
    """dx (N, C, H, W): gradient of the convolution with respect to x, from dy
    (N, K, Ho, Wo); every element written.  Geometry as in :func:`forward`
    (``(Ho, Wo)`` the output size of ``(H, W)``).  Tables: ``row_ptr`` of length
    ``C/B + 1``, ``row_cols < K/B``, ``row_slots < capacity``.  Checks everything
    first."""
    B, shapes, geometry = _check_operands(block_size, {"dy": dy, "w": w, "dx": dx}, "w", ("dx", "dy"), stride,
                                          padding, dilation)
    check_grouped_tables("row", row_ptr, row_cols, row_slots, shapes["dx"][1] // B, shapes["dy"][1] // B,
                         shapes["w"][0], stream)
    _backward_data(dy, w, row_ptr, row_cols, row_slots, B, *geometry, dx, stream)


def backward_weight(x, dy, row_ptr, row_cols, row_slots, block_size, stride, padding, dilation, dw, stream=0):
    """dw (capacity, kh, kw, B, B): gradient at the live slots (overwritten); dead slots
    untouched.  Geometry as in :func:`forward`; tables as in :func:`backward_data`
    (``row_ptr`` of length ``C/B + 1`` with ``C`` the channels of x), with no slot
    twice (each slot's gradient is written by one thread-block per tap).  Checks
    everything first."""
    B, shapes, geometry = _check_operands(block_size, {"x": x, "dy": dy, "dw": dw}, "dw", ("x", "dy"), stride,
                                          padding, dilation)
    check_grouped_tables("row", row_ptr, row_cols, row_slots, shapes["x"][1] // B, shapes["dy"][1] // B,
                         shapes["dw"][0], stream, distinct_slots=True)
    _backward_weight(x, dy, row_ptr, row_cols, row_slots, B, *geometry, dw, stream)
