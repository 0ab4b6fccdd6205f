"""wavefront2d, the Mamba2D (M2D-SSM) scan, at the array boundary.

The exact function is SCANS.md section 2 of the project spec (channels last):

    aT = exp(dT AT)  aL = exp(dL AL)  vT = dT BT u  vL = dL BL u        (at the current cell)
    h[0,0] = vL;  h[0,j] = aL h[0,j-1] + vL;  h[i,0] = aT h[i-1,0] + vT
    h[i,j] = (aL h[i,j-1] + vL + aT h[i-1,j] + vT) / 2                  (interior)
    y = sum_n C h + D u

Shapes: u, dT, dL, out: (batch, H, W, E); AT, AL: (E, N); BT, BL, C: (batch, H, W, N) or
(batch, H, W, G, N) with E % G == 0; D: (E,). dT, dL are the already-positive steps. Any strides.
``origin`` ("tl", "tr", "bl", "br") is mapped onto strides. On CUDA a grid whose rows are longer than
``MAX_CUDA_WIDTH`` and whose columns are not is scanned transposed (T and L exchanged: the same
function). With both sides longer, the lane-per-state kernels (``lanes_fit``: N <= 16, each block's
16 channels in one group) scan it as it is, in column strips; other problems are refused.

``out`` (and the backward's du, ddT, ddL) are accumulation buffers of float32 (float64 for float64
inputs) that the kernels ADD into: the caller zeroes them and casts once at the end.

On CUDA one block per (batch, channel) runs ``states_per_block(...)`` states (one warp each, a power
of two, at most 16); the other state chunks run in blocks side by side and add their per-cell
results through float32 scratch in ``workspace`` (``wavefront2d_workspace_floats``).

Memory: the forward writes only ``out`` (plus (chunks - 1) per-cell float32 partials on CUDA); the
(batch, H, W, E, N) state never reaches global memory. The CUDA backward recomputes h from row
checkpoints: its scratch is batch*E*N*(ceil(H/32) + 32)*W float32 values plus 3 (chunks - 1)
per-cell partials.
"""

from __future__ import annotations

from . import _C
from ._arrays import DTYPES, ITEMSIZE, Array, _contiguous_strides, as_array, check_buffer, check_writable, device_name

ORIGINS = ("tl", "tr", "bl", "br")
MAX_CUDA_WIDTH = 2048  # keep equal to kWave2dMaxWidth in csrc/include/ssm2d/wavefront2d.h
CHECKPOINT = 32  # rows between checkpoints in the CUDA backward; keep equal to kCheckpoint in the .cu



def lanes_fit(dim: int, dstate: int, groups: int = 1) -> bool:
    """Whether CUDA runs the problem with a lane per state (N <= 16, each block of 16 channels in one
    group): rows of any length, in column strips. Keep equal to lanes_fit in csrc/cuda/wavefront2d.cu."""
    return dstate <= 16 and (groups == 1 or (dim // groups) % 16 == 0)


def cuda_refusal(height: int, width: int, dim: int, dstate: int, groups: int = 1) -> str | None:
    """Why the CUDA kernels cannot scan this grid (None when they can): both sides longer than
    MAX_CUDA_WIDTH with N > 16 or a block's channels in two groups."""
    if min(height, width) > MAX_CUDA_WIDTH and not lanes_fit(dim, dstate, groups):
        return (f"the CUDA wavefront2d scans grids with both sides > {MAX_CUDA_WIDTH} (got {height} x {width}) "
                f"only with N <= 16 and groups of a multiple of 16 channels (got N={dstate}, E={dim}, G={groups})")
    return None


def scanned_hw(height: int, width: int, device: int = 0) -> tuple[int, int]:
    """(rows, row length) as the CUDA kernel scans the grid: transposed when only the rows are too long."""
    return (width, height) if device >= 0 and width > MAX_CUDA_WIDTH >= height else (height, width)


_SM_COUNT: dict[int, int] = {}


def states_per_block(batch: int, dim: int, dstate: int, height: int, width: int, device: int) -> int:
    """States one CUDA block runs (a warp each): a power of two that fits shared memory (3 staged rows
    per state), halved while that leaves multiprocessors idle (down to 4). 0 on the CPU."""
    if device < 0:
        return 0
    cap = int(_C.wavefront2d_max_states(scanned_hw(height, width, device)[1]))
    cap = 1 << (cap.bit_length() - 1)
    nw = min(cap, 1 << max(0, (dstate - 1).bit_length()))
    if device not in _SM_COUNT:
        _SM_COUNT[device] = int(_C.cuda_device_properties(device)["multiprocessors"])
    while nw > 4 and batch * dim * -(-dstate // nw) < _SM_COUNT[device]:
        nw //= 2
    return nw


def wavefront2d_workspace_floats(batch: int, dim: int, dstate: int, height: int, width: int, device: int = 0,
                                 backward: bool = True, groups: int = 1) -> int:
    """float32 scratch of a CUDA call, for the grid as scanned (after any transpose). N <= 16 (each
    block's 16 channels in one group): forward, the column strips' flags and carries (none when whole
    rows run); backward with rows of at most 64 cells and enough blocks, row checkpoints every K rows
    plus one K-row segment per (batch, 16 channels, 16 states), K = 8 up to 128 rows, else about
    sqrt(H / 2) (a power of two); backward in column strips, the forward's carries (the adjoint's
    carries overwrite them in place) and per (batch, 16 channels, strip) the same checkpoints and
    segment over the strip's columns, for the channels of one launch: when all of them would need
    more than 256 MiB the channels run in chunks of 16-channel blocks, the fewest that fit
    (1024 x 1024, B = 1, E = 64: two chunks, 254 MiB). Otherwise (chunks - 1) per-cell partials per
    per-cell output (1 forward, 3 backward), plus in the backward the row checkpoints (every
    CHECKPOINT rows) and one segment of rows per (batch, channel, state)."""
    if device < 0:
        return 0
    rows, w = scanned_hw(height, width, device)
    spb = states_per_block(batch, dim, dstate, height, width, device)
    return int(_C.wavefront2d_workspace_floats(batch, dim, dstate, groups, rows, w, spb, backward))


class _Checked:
    def __init__(self, u, dT, dL, AT, AL, BT, BL, C, D, origin):
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")
        self.u = as_array(u, "u")
        if len(self.u.shape) != 4:
            raise ValueError(f"u must have shape (batch, H, W, E), got {tuple(self.u.shape)}")
        b, h, w, e = self.u.shape
        if h < 1 or w < 1:
            raise ValueError(f"u must have H >= 1 and W >= 1, got H={h}, W={w}")
        if e < 1:
            raise ValueError(f"u must have at least one channel: shape (batch, H, W, E) with E >= 1, got E={e}")
        arrays = {}
        for name, v in (("dT", dT), ("dL", dL)):
            a = as_array(v, name)
            if tuple(a.shape) != tuple(self.u.shape):
                raise ValueError(f"{name} must have shape (batch, H, W, E) = {tuple(self.u.shape)}, got {tuple(a.shape)}")
            arrays[name] = a
        for name, v in (("AT", AT), ("AL", AL)):
            a = as_array(v, name)
            if len(a.shape) != 2 or a.shape[0] != e:
                raise ValueError(f"{name} must have shape (E, N) with E={e}, got {tuple(a.shape)}")
            arrays[name] = a
        n = arrays["AT"].shape[1]
        if n < 1:
            raise ValueError(f"AT must have at least one state: shape (E, N) with N >= 1, got N={n}")
        if arrays["AL"].shape[1] != n:
            raise ValueError(f"AL must have shape (E, N) = {(e, n)} like AT, got {tuple(arrays['AL'].shape)}")
        groups = None
        for name, v in (("BT", BT), ("BL", BL), ("C", C)):
            a = as_array(v, name)
            if len(a.shape) == 4:
                g = 1
                ok = tuple(a.shape) == (b, h, w, n)
            elif len(a.shape) == 5:
                g = a.shape[3]
                ok = tuple(a.shape) == (b, h, w, g, n) and g >= 1 and e % g == 0
            else:
                ok, g = False, None
            if not ok:
                raise ValueError(f"{name} must have shape (batch, H, W, N) = {(b, h, w, n)} or (batch, H, W, G, N) "
                                 f"with G dividing E={e}, got {tuple(a.shape)}")
            if groups is not None and g != groups:
                raise ValueError(f"BT, BL and C must have the same number of groups, got {groups} and {g} ({name})")
            groups = g
            arrays[name] = a
        self.D = None if D is None else as_array(D, "D")
        if self.D is not None and (tuple(self.D.shape) != (e,) or (e > 1 and self.D.strides[0] != 1)):
            raise ValueError(f"D must be a contiguous (E,) = ({e},) array, got shape {tuple(self.D.shape)}")
        self.param_dtype = "float64" if self.u.dtype == "float64" else "float32"
        for name in ("dT", "dL", "BT", "BL", "C"):
            if arrays[name].dtype != self.u.dtype:
                raise TypeError(f"{name} must have the dtype of u ({self.u.dtype}), got {arrays[name].dtype}")
        for name, a in (("AT", arrays["AT"]), ("AL", arrays["AL"]), ("D", self.D)):
            if a is not None and a.dtype != self.param_dtype:
                raise TypeError(f"{name} must be {self.param_dtype} for {self.u.dtype} inputs, got {a.dtype}")
        self.device = self.u.device
        for name, a in list(arrays.items()) + [("D", self.D)]:
            if a is not None and a.device != self.device:
                raise ValueError(f"{name} is on device {device_name(a.device)} but u is on {device_name(self.device)}")
        if self.device >= 0 and self.u.dtype == "float64":
            raise TypeError("u is float64 on CUDA: the CUDA kernel takes float32, float16 or bfloat16 "
                            "(float64 runs on the CPU kernel)")
        self.transpose = scanned_hw(h, w, self.device) != (h, w)
        refusal = cuda_refusal(h, w, e, n, groups) if self.device >= 0 else None
        if refusal:
            raise ValueError(f"{refusal}; use the CPU kernel or tile the grid")
        self.arrays = arrays
        self.b, self.h, self.w, self.e, self.n, self.g = b, h, w, e, n, groups
        self.origin = origin

    def grid(self, a: Array | None, kind: str):
        """kind 'x': (b, H, W, E) channels last; 'bn': (b, H, W, [G,] N)."""
        if a is None:
            return None
        st = a.strides
        sb, si, sj = st[0], st[1], st[2]
        if kind == "x":
            sc, sn = st[3], 0
        elif len(a.shape) == 5:
            sc, sn = st[3], st[4]
        else:
            sc, sn = 0, st[3]
        offset = 0
        if self.origin in ("bl", "br"):
            offset += (self.h - 1) * si
            si = -si
        if self.origin in ("tr", "br"):
            offset += (self.w - 1) * sj
            sj = -sj
        if self.transpose:
            si, sj = sj, si
        return (a.ptr + offset * ITEMSIZE[a.dtype], sb, sc, sn, si, sj)

    def accumulator(self, arr, name: str) -> Array | None:
        """A per-cell output: u's shape, the accumulation dtype, u's device."""
        if arr is None:
            return None
        a = as_array(arr, name)
        check_writable(a, name)
        if tuple(a.shape) != tuple(self.u.shape):
            raise ValueError(f"{name} must have shape (batch, H, W, E) = {tuple(self.u.shape)}, got {tuple(a.shape)}")
        if a.dtype != self.param_dtype:
            raise TypeError(f"{name} must be a {self.param_dtype} accumulation buffer, got {a.dtype}")
        if a.device != self.device:
            raise ValueError(f"{name} is on device {device_name(a.device)} but u is on {device_name(self.device)}")
        return a

    def same_as_u(self, arr, name: str) -> Array | None:
        if arr is None:
            return None
        a = as_array(arr, name)
        if tuple(a.shape) != tuple(self.u.shape):
            raise ValueError(f"{name} must have shape (batch, H, W, E) = {tuple(self.u.shape)}, got {tuple(a.shape)}")
        if a.dtype != self.u.dtype:
            raise TypeError(f"{name} must have the dtype of u ({self.u.dtype}), got {a.dtype}")
        if a.device != self.device:
            raise ValueError(f"{name} is on device {device_name(a.device)} but u is on {device_name(self.device)}")
        return a

    def tl(self, t_name: str, l_name: str) -> tuple[str, str]:
        """The operands that play T and L in the scanned frame (exchanged when transposed)."""
        return (l_name, t_name) if self.transpose else (t_name, l_name)

    def workspace(self, workspace, backward: bool):
        """The CUDA scratch, checked against its required size (None on the CPU or when not needed)."""
        need = wavefront2d_workspace_floats(self.b, self.e, self.n, self.h, self.w, self.device, backward, self.g)
        if need == 0:
            return None
        if workspace is None:
            raise ValueError(f"workspace (float32, {need} values) is required on CUDA here")
        wsp = as_array(workspace, "workspace")
        check_buffer(wsp, "workspace", (need,), "float32", self.device)
        return wsp.ptr

    def problem(self, stream: int, workspace_ptr=None) -> dict:
        a = self.arrays
        t, l = self.tl("dT", "dL")
        bt, bl = self.tl("BT", "BL")
        at, al = self.tl("AT", "AL")
        h, w = (self.w, self.h) if self.transpose else (self.h, self.w)
        return dict(batch=self.b, dim=self.e, dstate=self.n, groups=self.g, height=h, width=w,
                    dtype=DTYPES[self.u.dtype], param_dtype=DTYPES[self.param_dtype],
                    u=self.grid(self.u, "x"), dT=self.grid(a[t], "x"), dL=self.grid(a[l], "x"),
                    BT=self.grid(a[bt], "bn"), BL=self.grid(a[bl], "bn"), C=self.grid(a["C"], "bn"),
                    AT=a[at].ptr, AT_sd=a[at].strides[0], AT_sn=a[at].strides[1],
                    AL=a[al].ptr, AL_sd=a[al].strides[0], AL_sn=a[al].strides[1],
                    D=None if self.D is None else self.D.ptr, origin_top=bool(self.transpose),
                    states_per_block=states_per_block(self.b, self.e, self.n, self.h, self.w, self.device),
                    workspace=workspace_ptr, device=self.device, stream=int(stream))



def wavefront2d_forward(u, dT, dL, AT, AL, BT, BL, C, D=None, *, out, origin: str = "tl", workspace=None,
                        stream: int = 0) -> None:
    """Adds y into ``out`` (batch, H, W, E), an accumulation buffer (float32; float64 for float64
    inputs). ``stream``: the caller's CUDA stream handle."""
    chk = _Checked(u, dT, dL, AT, AL, BT, BL, C, D, origin)
    o = chk.accumulator(out, "out")
    _C.wavefront2d_forward(chk.problem(stream, chk.workspace(workspace, backward=False)), chk.grid(o, "x"))


def wavefront2d_backward(dout, u, dT, dL, AT, AL, BT, BL, C, D=None, *, du=None, ddT=None, ddL=None, dBT=None,
                         dBL=None, dC=None, dAT_part=None, dAL_part=None, dD_part=None, origin: str = "tl",
                         deterministic: bool = False, e_begin: int = 0, e_end: int = -1, workspace=None,
                         stream: int = 0) -> None:
    """Gradients of wavefront2d, all ADDED into accumulation buffers (float32; float64 for float64
    inputs). du, ddT, ddL: shaped like u. dBT, dBL, dC: accumulation buffers (float32;
    float64 for float64 inputs) shaped like BT (with a G axis: (batch, H, W, G, N)) that are ADDED
    into; with ``deterministic`` on CUDA, per-channel partials (batch, H, W, e_end - e_begin, N).
    dAT_part, dAL_part (batch, E, N) and dD_part (batch, E): per-batch partial sums. On CUDA
    ``workspace`` is float32 scratch of ``wavefront2d_workspace_floats`` values.
    """
    chk = _Checked(u, dT, dL, AT, AL, BT, BL, C, D, origin)
    acc = chk.param_dtype
    go = chk.same_as_u(dout, "dout")
    grads = {name: chk.accumulator(v, name) for name, v in (("du", du), ("ddT", ddT), ("ddL", ddL))}
    e_end = chk.e if e_end < 0 else e_end
    if not 0 <= e_begin < e_end <= chk.e:
        raise ValueError(f"need 0 <= e_begin < e_end <= E={chk.e}, got e_begin={e_begin}, e_end={e_end}")
    per_channel = deterministic and chk.device >= 0
    bn_shape = (chk.b, chk.h, chk.w, e_end - e_begin if per_channel else chk.g, chk.n)
    bufs = {}
    for name, v in (("dBT", dBT), ("dBL", dBL), ("dC", dC)):
        if v is not None:
            v = as_array(v, name)
            check_buffer(v, name, bn_shape, acc, chk.device)
        bufs[name] = v
    parts = {}
    for name, v, shape in (("dAT_part", dAT_part, (chk.b, chk.e, chk.n)), ("dAL_part", dAL_part, (chk.b, chk.e, chk.n)),
                           ("dD_part", dD_part, (chk.b, chk.e))):
        if v is not None:
            v = as_array(v, name)
            check_buffer(v, name, shape, acc, chk.device)
            if v.strides != _contiguous_strides(shape):
                raise ValueError(f"{name} must be contiguous")
        parts[name] = v
    wsp = chk.workspace(workspace, backward=True)
    dt_name, dl_name = chk.tl("ddT", "ddL")
    bt_name, bl_name = chk.tl("dBT", "dBL")
    at_name, al_name = chk.tl("dAT_part", "dAL_part")
    ptr = lambda a: None if a is None else a.ptr  # noqa: E731
    _C.wavefront2d_backward(
        chk.problem(stream),
        dict(dout=chk.grid(go, "x"), du=chk.grid(grads["du"], "x"), ddT=chk.grid(grads[dt_name], "x"),
             ddL=chk.grid(grads[dl_name], "x"), dBT=chk.grid(bufs[bt_name], "bn"), dBL=chk.grid(bufs[bl_name], "bn"),
             dC=chk.grid(bufs["dC"], "bn"), dAT_part=ptr(parts[at_name]), dAL_part=ptr(parts[al_name]),
             dD_part=ptr(parts["dD_part"]), deterministic=bool(per_channel), e_begin=int(e_begin),
             e_end=int(e_end), workspace=wsp),
    )
