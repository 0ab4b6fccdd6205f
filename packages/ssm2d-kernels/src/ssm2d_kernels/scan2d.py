"""scan2d, the 2DMamba selective scan (rows first, then columns), at the array boundary.

The exact function is SCANS.md section 1 of the project spec:

    dt = softplus(delta + delta_bias) (or delta + delta_bias)      a = exp(dt * A)    x = dt * B * u
    G[i,j] = a[i,j] G[i,j-1] + x[i,j]          (rows, along W)
    h[i,j] = a[i,j] h[i-1,j] + G[i,j]          (columns, along H)
    y = sum_n C h + D u,   out = y * silu(z) if z is given

Shapes: u, delta, z, out: (batch, D, H, W); A: (D, N); B, C: (batch, G, N, H, W) with D % G == 0;
D, delta_bias: (D,). Any strides are accepted for every operand (negative too). ``origin`` picks the
corner the scan starts from, ``order`` rows first ("hv") or columns first ("vh"); both are mapped
onto pointers and strides, never copied.

Memory: the forward writes only ``out`` (and ``y``, the pre-gate output, when the backward of a gate
needs it: the tiled kernels on CUDA, ``_C.scan2d_backward_needs_y(dim, groups, dstate)``). On CUDA
it also saves ``scan2d_carry_floats(...)`` float32 values, from which the backward recomputes the
states: with N == 1 on a grid of at most 64 x 64 cells and enough channels (chan kernels,
``_C.scan2d_chan_fit``) the carry entering every 4th step of the walk along the long side (1/4 of
u's elements; the buffer is sized for the larger of this and the band layout); with N < 8 (band
kernels) the state h of every 16th row (N/16 of u's elements, none when the scanned H <= 16); with
8 <= N <= 16 and groups of a multiple of 8 channels (lanes kernels) the G
entering every 16-column strip at every row and h after every 16th row (about u's element count,
plus N/16 of it); otherwise (tiled kernels) the carries of every 32x32 tile (N/16 of u's elements).
When no backward follows (inference), pass ``carries=None``: nothing is saved. The forward may also
need a float32 ``workspace`` of ``scan2d_forward_workspace_floats(...)`` values: with N < 8, band
summaries of grids wider than one band (32, 64 or 128 columns by width),
batch*D*H*(bands + N*(bands-1)); lanes kernels: a flag per strip, and with no carries the G hand-over
(about u's element count); tiled kernels with no carries (inference), room for the tile carries.
"""

from __future__ import annotations

from . import _C
from ._arrays import (DTYPES, ITEMSIZE, Array, _contiguous_strides, as_array, check_buffer, check_writable,
                      device_name)

ORIGINS = ("tl", "tr", "bl", "br")
ORDERS = ("hv", "vh")


def logical_hw(height: int, width: int, order: str) -> tuple[int, int]:
    return (width, height) if order == "vh" else (height, width)


def scan2d_carry_floats(batch: int, dim: int, dstate: int, height: int, width: int, order: str = "hv") -> int:
    """float32 values the CUDA forward saves for the backward: h every 16th scanned row,
    batch*dim*N*(ceil(H/16) - 1)*W on the scanned grid."""
    lh, lw = logical_hw(height, width, order)
    return int(_C.scan2d_carry_floats(batch, dim, dstate, lh, lw))


def scan2d_forward_workspace_floats(batch: int, dim: int, dstate: int, height: int, width: int,
                                    order: str = "hv", saving: bool = False) -> int:
    """float32 scratch values the CUDA forward needs; ``saving``: carries are saved for a backward
    (the tiled kernels, N > 16, then need none)."""
    lh, lw = logical_hw(height, width, order)
    return int(_C.scan2d_forward_workspace_floats(batch, dim, dstate, lh, lw, saving))


def scan2d_backward_workspace_floats(batch: int, dim: int, dstate: int, height: int, width: int,
                                     order: str = "hv") -> int:
    """float32 scratch values the CUDA backward needs on the scanned grid. N < 8 (band kernels): band
    summaries of both directions for grids wider than one band, batch*dim*H*(bands + 2N*(bands-1)), and
    per-band sums batch*dim*bands*(N+2); 8 <= N <= 16 (lanes kernels): the hand-over between strips
    (about u's element count) and h of one 16-row segment per block (about u's count again);
    tiled kernels: batch*dim*N*(H+W) (the larger of the two for 8 <= N <= 16)."""
    lh, lw = logical_hw(height, width, order)
    return int(_C.scan2d_backward_workspace_floats(batch, dim, dstate, lh, lw))


def grid_descriptor(ptr: int, shape, strides, itemsize: int, origin: str, order: str, has_state: bool) -> tuple:
    """(ptr, sb, sc, sn, si, sj) of a (batch, C[, N], H, W) array in the scan's logical frame (rows first
    from the origin): the flips and the transpose become a pointer offset and strides (in elements)."""
    sb, sc = strides[0], strides[1]
    sn = strides[2] if has_state else 0
    si, sj = strides[-2], strides[-1]
    offset = 0
    if origin in ("bl", "br"):
        offset += (shape[-2] - 1) * si
        si = -si
    if origin in ("tr", "br"):
        offset += (shape[-1] - 1) * sj
        sj = -sj
    if order == "vh":
        si, sj = sj, si
    return (ptr + offset * itemsize, sb, sc, sn, si, sj)


def _grid(a: Array | None, origin: str, order: str, has_state: bool):
    return None if a is None else grid_descriptor(a.ptr, a.shape, a.strides, ITEMSIZE[a.dtype], origin, order,
                                                  has_state)


def _expect(a: Array, name: str, shape: tuple, what: str) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {tuple(a.shape)}")


class _Checked:
    """Validated operands of one call: shapes, dtypes and devices agree."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, origin, order):
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.u = as_array(u, "u")
        if len(self.u.shape) != 4:
            raise ValueError(f"u must have shape (batch, D, H, W), got {tuple(self.u.shape)}")
        b, d, h, w = self.u.shape
        if h < 1 or w < 1:
            raise ValueError(f"u must have H >= 1 and W >= 1, got H={h}, W={w}")
        if d < 1:
            raise ValueError(f"u must have at least one channel: shape (batch, D, H, W) with D >= 1, got D={d}")
        self.A = as_array(A, "A")
        if len(self.A.shape) != 2 or self.A.shape[0] != d:
            raise ValueError(f"A must have shape (D, N) with D={d}, got {tuple(self.A.shape)}")
        n = self.A.shape[1]
        if n < 1:
            raise ValueError(f"A must have at least one state: shape (D, N) with N >= 1, got N={n}")
        self.B = as_array(B, "B")
        if len(self.B.shape) != 5:
            raise ValueError(f"B must have shape (batch, G, N, H, W), got {tuple(self.B.shape)}")
        g = self.B.shape[1]
        if g < 1 or d % g:
            raise ValueError(f"B has G={g} groups, which must divide D={d}")
        grid = (b, g, n, h, w)
        _expect(self.B, "B", grid, "(batch, G, N, H, W)")
        self.C = as_array(C, "C")
        _expect(self.C, "C", grid, "(batch, G, N, H, W)")
        self.delta = as_array(delta, "delta")
        _expect(self.delta, "delta", self.u.shape, "(batch, D, H, W) like u")
        self.z = None if z is None else as_array(z, "z")
        if self.z is not None:
            _expect(self.z, "z", self.u.shape, "(batch, D, H, W) like u")
        self.D = None if D is None else as_array(D, "D")
        self.delta_bias = None if delta_bias is None else as_array(delta_bias, "delta_bias")
        for name, v in (("D", self.D), ("delta_bias", self.delta_bias)):
            if v is not None:
                _expect(v, name, (d,), "(D,)")
                if v.strides[0] != 1 and d > 1:
                    raise ValueError(f"{name} must be contiguous, got stride {v.strides[0]}")
        self.param_dtype = "float64" if self.u.dtype == "float64" else "float32"
        for name, v in (("delta", self.delta), ("z", self.z), ("B", self.B), ("C", self.C)):
            if v is not None and v.dtype != self.u.dtype:
                raise TypeError(f"{name} must have the dtype of u ({self.u.dtype}), got {v.dtype}")
        for name, v in (("A", self.A), ("D", self.D), ("delta_bias", self.delta_bias)):
            if v is not None and v.dtype != self.param_dtype:
                raise TypeError(f"{name} must be {self.param_dtype} for {self.u.dtype} inputs, got {v.dtype}")
        self.device = self.u.device
        if self.device >= 0 and self.u.dtype == "float64":
            raise TypeError("u is float64 on CUDA: the CUDA kernel takes float32, float16 or bfloat16 "
                            "(float64 runs on the CPU kernel)")
        for name, v in (("delta", self.delta), ("A", self.A), ("B", self.B), ("C", self.C), ("D", self.D),
                        ("z", self.z), ("delta_bias", self.delta_bias)):
            if v is not None and v.device != self.device:
                raise ValueError(f"{name} is on device {device_name(v.device)} but u is on {device_name(self.device)}")
        self.sizes = dict(batch=b, dim=d, dstate=n, groups=g)
        self.height, self.width = h, w
        self.origin, self.order = origin, order

    def same_as_u(self, arr, name: str) -> Array | None:
        if arr is None:
            return None
        a = as_array(arr, name)
        _expect(a, name, self.u.shape, "(batch, D, H, W) like u")
        if a.device != self.device:
            raise ValueError(f"{name} is on device {device_name(a.device)} but u is on {device_name(self.device)}")
        return a

    def grid(self, a: Array | None, has_state: bool = False):
        return _grid(a, self.origin, self.order, has_state)

    def problem(self, softplus: bool, stream: int) -> dict:
        lh, lw = logical_hw(self.height, self.width, self.order)
        return dict(
            **self.sizes, height=lh, width=lw, dtype=DTYPES[self.u.dtype], param_dtype=DTYPES[self.param_dtype],
            softplus=bool(softplus), u=self.grid(self.u), delta=self.grid(self.delta), z=self.grid(self.z),
            B=self.grid(self.B, True), C=self.grid(self.C, True), A=self.A.ptr, A_sd=self.A.strides[0],
            A_sn=self.A.strides[1], D=None if self.D is None else self.D.ptr,
            delta_bias=None if self.delta_bias is None else self.delta_bias.ptr, device=self.device,
            stream=int(stream),
        )




def scan2d_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, out, y=None, carries=None,
                   workspace=None, softplus: bool = False, origin: str = "tl", order: str = "hv",
                   stream: int = 0) -> None:
    """Writes ``out`` (and ``y`` = the pre-gate output, when given and z is given: the CUDA backward
    needs it for N >= 8; and, on CUDA, the ``carries`` buffer of ``scan2d_carry_floats`` float32
    values, which the backward needs).
    ``carries=None`` on CUDA: inference, nothing saved. ``workspace``: float32 scratch of
    ``scan2d_forward_workspace_floats`` values on CUDA (None when that is 0).

    ``stream``: the caller's CUDA stream handle (e.g. ``torch.cuda.current_stream().cuda_stream``).
    """
    chk = _Checked(u, delta, A, B, C, D, z, delta_bias, origin, order)
    o = chk.same_as_u(out, "out")
    check_writable(o, "out")
    if o.dtype != chk.u.dtype:
        raise TypeError(f"out must have the dtype of u ({chk.u.dtype}), got {o.dtype}")
    ya = chk.same_as_u(y, "y")
    if ya is not None:
        check_writable(ya, "y")
    car = wsp = None
    if chk.device >= 0:
        sizes = (chk.sizes["batch"], chk.sizes["dim"], chk.sizes["dstate"], chk.height, chk.width, order)
        if carries is not None:
            car = as_array(carries, "carries")
            check_buffer(car, "carries", (scan2d_carry_floats(*sizes),), "float32", chk.device)
        need = scan2d_forward_workspace_floats(*sizes, saving=car is not None)
        if need:
            if workspace is None:
                raise ValueError(f"workspace is required on CUDA for this shape: {need} float32 values "
                                 "(scan2d_forward_workspace_floats)")
            wsp = as_array(workspace, "workspace")
            check_buffer(wsp, "workspace", (need,), "float32", chk.device)
    _C.scan2d_forward(chk.problem(softplus, stream),
                      dict(out=chk.grid(o), y=chk.grid(ya) if chk.z is not None else None,
                           carries=None if car is None else car.ptr, workspace=None if wsp is None else wsp.ptr))


def scan2d_backward(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None, *, y=None, carries=None,
                    du=None, ddelta=None, dz=None, dB=None, dC=None, dA_part=None, dD_part=None,
                    ddelta_bias_part=None, softplus: bool = False, origin: str = "tl", order: str = "hv",
                    deterministic: bool = False, d_begin: int = 0, d_end: int = -1, workspace=None,
                    stream: int = 0) -> None:
    """Gradients of scan2d. du, ddelta, dz: like u. dB, dC: accumulation buffers (float32; float64
    for float64 inputs) of shape (batch, G, N, H, W) that are ADDED into; with ``deterministic`` on
    CUDA, per-channel partials (batch, d_end - d_begin, N, H, W) for channels [d_begin, d_end).
    dA_part (batch, D, N), dD_part and ddelta_bias_part (batch, D): per-batch partial sums.
    Pass None for gradients that are not wanted. On CUDA ``workspace`` is float32 scratch of
    ``scan2d_backward_workspace_floats`` values.
    """
    chk = _Checked(u, delta, A, B, C, D, z, delta_bias, origin, order)
    acc = chk.param_dtype
    b, d, n, g = (chk.sizes[k] for k in ("batch", "dim", "dstate", "groups"))
    h, w = chk.height, chk.width
    go = chk.same_as_u(dout, "dout")
    grads = {name: chk.same_as_u(v, name) for name, v in (("du", du), ("ddelta", ddelta), ("dz", dz))}
    for name, v in grads.items():
        if v is not None:
            check_writable(v, name)
        if v is not None and v.dtype != chk.u.dtype:
            raise TypeError(f"{name} must have the dtype of u ({chk.u.dtype}), got {v.dtype}")
    d_end = d if d_end < 0 else d_end
    if not 0 <= d_begin < d_end <= d:
        raise ValueError(f"need 0 <= d_begin < d_end <= D={d}, got d_begin={d_begin}, d_end={d_end}")
    per_channel = deterministic and chk.device >= 0
    bc_shape = (b, d_end - d_begin, n, h, w) if per_channel else (b, g, n, h, w)
    bc = {}
    for name, v in (("dB", dB), ("dC", dC)):
        if v is not None:
            v = as_array(v, name)
            check_buffer(v, name, bc_shape, acc, chk.device)
        bc[name] = v
    parts = {}
    for name, v, shape in (("dA_part", dA_part, (b, d, n)), ("dD_part", dD_part, (b, d)),
                           ("ddelta_bias_part", ddelta_bias_part, (b, d))):
        if v is not None:
            v = as_array(v, name)
            check_buffer(v, name, shape, acc, chk.device)
            if v.strides != _contiguous_strides(shape):
                raise ValueError(f"{name} must be contiguous")
        parts[name] = None if v is None else v.ptr
    ya = chk.same_as_u(y, "y")
    car = wsp = None
    if chk.device >= 0:
        if chk.z is not None and ya is None and _C.scan2d_backward_needs_y(d, chk.sizes["groups"], n):
            raise ValueError("y (the pre-gate output saved by the forward) is required on CUDA when z is given "
                             "and the tiled kernels run (N > 16, or 8 <= N <= 16 with groups of other than a "
                             "multiple of 8 channels)")
        if carries is None or workspace is None:
            raise ValueError("carries (saved by the forward, possibly empty) and workspace are required on CUDA")
        car = as_array(carries, "carries")
        check_buffer(car, "carries", (scan2d_carry_floats(b, d, n, h, w, order),), "float32", chk.device)
        wsp = as_array(workspace, "workspace")
        check_buffer(wsp, "workspace", (scan2d_backward_workspace_floats(b, d, n, h, w, order),), "float32",
                     chk.device)
    _C.scan2d_backward(
        chk.problem(softplus, stream),
        dict(dout=chk.grid(go), y=chk.grid(ya), carries=None if car is None else car.ptr,
             du=chk.grid(grads["du"]), ddelta=chk.grid(grads["ddelta"]), dz=chk.grid(grads["dz"]),
             dB=chk.grid(bc["dB"], True), dC=chk.grid(bc["dC"], True), deterministic=bool(per_channel),
             d_begin=int(d_begin), d_end=int(d_end), workspace=None if wsp is None else wsp.ptr, **parts),
    )

