"""Argument checks shared by the public CPU and numba.cuda kernel wrappers.

* Weight-gradient tables: the kernels write ``dw[slot]`` once per live entry, from
  one thread (CPU) or thread-block (CUDA) per entry, so two live entries sharing a
  slot would write it at once (a race with a nondeterministic result).
  :func:`check_distinct_slots` refuses such tables.  Forward and data-gradient tables
  only read the slots; duplicates are harmless there and are not checked.
* Convolution geometry: :func:`check_conv_geometry` checks ``stride``, ``padding``
  and ``dilation`` and returns them as tuples, the padding as
  ``(top, left, bottom, right)``; :func:`check_conv_sizes` checks that the output
  (``y`` / ``dy``) has the spatial size that the input (``x`` / ``dx``) and the
  geometry give, as ``torch.nn.functional.conv2d`` computes it.

All values are host values (numpy arrays or Python numbers); pure Python, no numba.
"""
from __future__ import annotations

import numbers

import numpy as np


def check_no_overlap(arrays: dict) -> None:
    """The output arrays (``y``, ``dx``, ``dw``) share no memory with any other array:
    the kernels read inputs while they write outputs."""
    for out in ("y", "dx", "dw"):
        if out not in arrays:
            continue
        for name, other in arrays.items():
            if name != out and np.may_share_memory(arrays[out], other):
                raise ValueError(f"{out} shares memory with {name}: an output must not overlap an input")


def check_distinct_slots(name: str, slots) -> None:
    """ValueError naming the first slot that two entries of ``slots`` share."""
    s = np.asarray(slots)
    if s.shape[0] < 2:
        return
    order = np.argsort(s, kind="stable")
    ordered = s[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if same.size:
        first, second = sorted((int(order[same[0]]), int(order[same[0] + 1])))
        raise ValueError(f"{name} holds slot {int(ordered[same[0]])} twice ({name}[{first}] and {name}[{second}]): "
                         f"two live entries would write the weight gradient of that slot at once; "
                         f"every live entry needs a slot of its own")


def _integers(what: str, values, low: int, counts=(2,), forms: str = "") -> tuple:
    try:
        values = tuple(values)
    except TypeError:
        pass
    if not isinstance(values, tuple) or len(values) not in counts or any(
            isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < low for v in values):
        raise ValueError(f"{what} must be a pair of integers >= {low}{forms}, got {values!r}")
    return tuple(int(v) for v in values)


def check_conv_geometry(stride, padding, dilation) -> tuple:
    """``(stride, padding, dilation)`` as tuples of ints after checking them.

    ``stride = (sh, sw) >= 1`` and ``dilation = (dil_h, dil_w) >= 1``; ``padding``
    ``>= 0`` is ``(ph, pw)`` (``ph`` rows at the top and at the bottom, ``pw`` columns
    on the left and on the right, as in ``torch.nn.functional.conv2d``) or
    ``(top, left, bottom, right)``; it is returned in the second form.
    """
    stride = _integers("stride", stride, 1)
    padding = _integers("padding", padding, 0, (2, 4),
                        " (rows at the top and bottom, columns on the left and right) or four (top, left, bottom, "
                        "right)")
    dilation = _integers("dilation", dilation, 1)
    if len(padding) == 2:
        padding = padding + padding
    return stride, padding, dilation


def conv_output_size(input_size, kernel_size, stride, padding, dilation) -> tuple:
    """``(Ho, Wo)`` of an ``(H, W)`` input, ``(kh, kw)`` kernel and checked geometry
    (``padding`` as ``(top, left, bottom, right)``); 0 where the padded input is
    smaller than the dilated kernel."""
    out = []
    for axis in range(2):
        span = dilation[axis] * (kernel_size[axis] - 1) + 1
        padded = input_size[axis] + padding[axis] + padding[axis + 2]
        out.append(max(0, (padded - span) // stride[axis] + 1))
    return tuple(out)


def check_conv_sizes(in_name: str, in_shape, out_name: str, out_shape, kernel_size, stride, padding,
                     dilation) -> None:
    """ValueError unless the spatial size of ``out_shape`` (NCHW) is the output size
    that ``in_shape``'s spatial size gives with this kernel and geometry."""
    expected = conv_output_size(in_shape[2:], kernel_size, stride, padding, dilation)
    actual = tuple(int(v) for v in out_shape[2:])
    if actual != expected:
        raise ValueError(
            f"{out_name} has spatial size {actual}, expected {expected}: the output size for {in_name} of spatial "
            f"size {tuple(int(v) for v in in_shape[2:])}, kernel {tuple(int(v) for v in kernel_size)}, stride "
            f"{stride}, padding (top, left, bottom, right) {padding} and dilation {dilation}")
