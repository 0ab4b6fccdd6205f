"""The kernels' array boundary refuses what would crash or write where it must not, with clear errors;
the torch ops take D of any stride."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssm2d_kernels.scan2d import scan2d_forward
from ssm2d_kernels.wavefront2d import wavefront2d_forward


def _scan_inputs(rng, b=1, d=4, n=2, g=1, h=3, w=5):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(u=f(b, d, h, w), delta=np.abs(f(b, d, h, w)) * 0.3 + 0.05, A=-np.abs(f(d, n)) - 0.1,
                B=f(b, g, n, h, w), C=f(b, g, n, h, w))


def test_read_only_output_is_refused_and_left_untouched():
    rng = np.random.default_rng()
    x = _scan_inputs(rng)
    out = np.full(x["u"].shape, 7.0, dtype=np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out is read-only"):
        scan2d_forward(**x, out=out)
    assert (out == 7.0).all()


class _NullArray:
    """An array interface with elements but a null data pointer."""

    def __init__(self, shape):
        self.__array_interface__ = dict(data=(0, False), shape=shape, typestr="<f4", version=3)


def test_null_pointer_is_refused_not_dereferenced():
    rng = np.random.default_rng()
    x = _scan_inputs(rng)
    x["u"] = _NullArray(x["u"].shape)
    with pytest.raises(ValueError, match="u has 60 elements but a null data pointer"):
        scan2d_forward(**x, out=np.empty((1, 4, 3, 5), np.float32))


def test_zero_channels_or_states_are_named():
    rng = np.random.default_rng()
    x = _scan_inputs(rng, d=0)
    with pytest.raises(ValueError, match="at least one channel.*D=0"):
        scan2d_forward(**x, out=np.empty(x["u"].shape, np.float32))
    x = _scan_inputs(rng, n=0)
    with pytest.raises(ValueError, match="at least one state.*N=0"):
        scan2d_forward(**x, out=np.empty(x["u"].shape, np.float32))
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    for e, n, what in ((0, 2, "at least one channel.*E=0"), (3, 0, "at least one state.*N=0")):
        u = f(1, 3, 4, e)
        with pytest.raises(ValueError, match=what):
            wavefront2d_forward(u, np.abs(u), np.abs(u), -np.abs(f(e, n)), -np.abs(f(e, n)), f(1, 3, 4, n),
                                f(1, 3, 4, n), f(1, 3, 4, n), out=np.zeros(u.shape, np.float32))


def test_strided_D_and_delta_bias_give_the_contiguous_result():
    from ssm2d_nn.ops import scan2d, wavefront2d

    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u, delta = r(1, 4, 6, 7), r(1, 4, 6, 7) * 0.5 - 1
    A, B, C = -torch.rand(4, 3, generator=g) - 0.1, r(1, 2, 3, 6, 7), r(1, 2, 3, 6, 7)
    D2, bias2 = r(8), r(8) * 0.3
    got = scan2d(u, delta, A, B, C, D=D2[::2], delta_bias=bias2[::2], delta_softplus=True, backend="kernel")
    ref = scan2d(u, delta, A, B, C, D=D2[::2].contiguous(), delta_bias=bias2[::2].contiguous(), delta_softplus=True,
                 backend="reference")
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    ue = r(1, 5, 6, 4)
    dT, dL = torch.rand(1, 5, 6, 4, generator=g) * 0.5, torch.rand(1, 5, 6, 4, generator=g) * 0.5
    AT, AL = -torch.rand(4, 3, generator=g) - 0.1, -torch.rand(4, 3, generator=g) - 0.1
    BT, BL, Cw = r(1, 5, 6, 3), r(1, 5, 6, 3), r(1, 5, 6, 3)
    Dw = r(8)
    got = wavefront2d(ue, dT, dL, AT, AL, BT, BL, Cw, Dw[::2], backend="kernel")
    ref = wavefront2d(ue, dT, dL, AT, AL, BT, BL, Cw, Dw[::2].contiguous(), backend="reference")
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
