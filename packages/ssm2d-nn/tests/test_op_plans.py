"""The ops' cached per-layout plans: a call whose layout was seen before skips the checks, yet every
call that differs in dtype, device, strides, type or options is checked (and refused) as before, and
the eager path straight to the kernels gives what the custom ops give."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scan2d_cases import make_inputs, rel_err
from ssm2d_nn.ops import _scan2d_args, scan2d, scan2d_reference, wavefront2d, wavefront2d_reference
from wavefront2d_cases import make_wave_inputs

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _leaves(inputs: dict, requires_grad: bool) -> dict:
    for v in inputs.values():
        if v is not None:
            v.requires_grad_(requires_grad)
    return inputs


def _inputs(dtype=torch.float64, requires_grad=False):
    return _leaves(make_inputs(random.Random(), batch=2, dim=4, dstate=2, groups=2, height=5, width=6, dtype=dtype),
                   requires_grad)


class _Passthrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: calls under it must take the custom ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_repeated_layout_is_checked_once(monkeypatch):
    calls = []
    original = _scan2d_args.check_scan2d_args
    monkeypatch.setattr(_scan2d_args, "check_scan2d_args", lambda *a: (calls.append(1), original(*a))[1])
    inputs = _inputs()
    u = inputs["u"]
    inputs["u"] = torch.cat([u, u[..., :1]], dim=-1)[..., :6]  # a layout no other test uses: rows of 7
    for _ in range(3):
        scan2d(**dict(inputs, z=None), delta_softplus=True, origin="bl")
    assert len(calls) == 1
    scan2d(**dict(inputs, z=None, u=inputs["u"].contiguous()), delta_softplus=True, origin="bl")  # new strides
    assert len(calls) == 2


@pytest.mark.parametrize("override,exc,msg", [
    (dict(delta=lambda t: t.float()), TypeError, r"scan2d: delta must have the dtype of u"),
    (dict(B=lambda t: t.to(torch.float32)), TypeError, r"scan2d: B must have the dtype of u"),
    (dict(u=lambda t: t.to(torch.int64)), TypeError, r"scan2d: u must be float32, float16, bfloat16 or float64"),
    (dict(delta_bias=lambda t: t.to("meta")), ValueError, r"scan2d: delta_bias is on meta but u is on cpu"),
    (dict(z=lambda t: t.to("meta")), ValueError, r"scan2d: z is on meta but u is on cpu"),
    (dict(u=lambda t: t.tolist()), TypeError, r"scan2d: u must be a torch.Tensor, got list"),
    (dict(C=lambda t: t.numpy()), TypeError, r"scan2d: C must be a torch.Tensor, got ndarray"),
])
def test_a_good_call_does_not_let_a_bad_one_with_the_same_shapes_through(override, exc, msg):
    inputs = _inputs()
    scan2d(**inputs, delta_softplus=True)  # the good layout is now cached
    (name, change), = override.items()
    with pytest.raises(exc, match=msg):
        scan2d(**dict(inputs, **{name: change(inputs[name])}), delta_softplus=True)
    with pytest.raises(exc, match=msg):  # and again: a refused call is never cached
        scan2d(**dict(inputs, **{name: change(inputs[name])}), delta_softplus=True)


@pytest.mark.parametrize("options,exc,msg", [
    (dict(origin="center"), ValueError, r"scan2d: origin must be one of"),
    (dict(origin=["tl"]), ValueError, r"scan2d: origin must be one of"),  # unhashable: not a cache key
    (dict(order="hvh"), ValueError, r"scan2d: order must be one of"),
    (dict(backend="fast"), ValueError, r"scan2d: backend must be one of"),
])
def test_bad_options_after_a_good_call_are_refused(options, exc, msg):
    inputs = _inputs()
    scan2d(**inputs)
    with pytest.raises(exc, match=msg):
        scan2d(**inputs, **options)


def test_same_shapes_other_strides_get_their_own_frame():
    """A cached layout's pointer offsets and strides must never serve another layout of the same shapes."""
    inputs = _inputs()
    want = scan2d_reference(**inputs, delta_softplus=True, origin="tr", order="vh")
    assert rel_err(scan2d(**inputs, delta_softplus=True, origin="tr", order="vh", backend="kernel"), want) < 1e-12
    strided = dict(inputs)
    strided["u"] = inputs["u"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels last
    strided["z"] = inputs["z"].transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major planes
    strided["B"] = torch.cat([inputs["B"], inputs["B"]], dim=2)[:, :, :2]  # a slice: wider strides
    strided["D"] = torch.stack([inputs["D"], inputs["D"]], dim=1)[:, 0]  # stride 2: made contiguous
    got = scan2d(**strided, delta_softplus=True, origin="tr", order="vh", backend="kernel")
    assert rel_err(got, want) < 1e-12


def test_same_layout_other_dtype_is_planned_anew():
    inputs = _inputs()
    scan2d(**inputs, delta_softplus=True, backend="kernel")
    low = {k: None if v is None else (v.float() if k in ("A", "D", "delta_bias") else v.to(torch.bfloat16))
           for k, v in inputs.items()}
    got = scan2d(**low, delta_softplus=True, backend="kernel")
    assert got.dtype == torch.bfloat16
    assert rel_err(got, scan2d_reference(**inputs, delta_softplus=True)) < 3e-2


def test_eager_path_equals_the_custom_ops_forward_and_backward():
    """Plain eager calls skip the dispatcher; under a dispatch mode the custom ops run. Same kernels:
    bitwise the same output and gradients (float32, with retain_graph a second backward too)."""
    inputs = _inputs(torch.float32, requires_grad=True)
    leaves = [inputs[k] for k in NAMES if inputs[k] is not None]
    gout = torch.randn(2, 4, 5, 6)

    def run():
        out = scan2d(**inputs, delta_softplus=True, origin="br", order="vh", backend="kernel")
        first = torch.autograd.grad(out, leaves, gout, retain_graph=True)
        second = torch.autograd.grad(out, leaves, gout)
        return out, first, second

    out, first, second = run()
    assert type(out.grad_fn).__name__ == "_Scan2dFunctionBackward"
    with _Passthrough():
        out_op, first_op, second_op = run()
    assert torch.equal(out, out_op)
    for a, b, c in zip(first, first_op, second):
        assert torch.equal(a, b) and torch.equal(a, c)
    ref = scan2d_reference(**{k: None if v is None else v.detach().double() for k, v in inputs.items()},
                           delta_softplus=True, origin="br", order="vh")
    assert rel_err(out, ref) < 1e-5


def test_eager_no_grad_call_builds_no_graph():
    inputs = _inputs(torch.float32, requires_grad=True)
    with torch.no_grad():
        out = scan2d(**inputs, delta_softplus=True)
    assert out.grad_fn is None and not out.requires_grad


def _wave_inputs(dtype=torch.float64, requires_grad=False):
    return _leaves(make_wave_inputs(random.Random(), batch=2, height=5, width=6, dim=4, dstate=2, groups=2,
                                    dtype=dtype), requires_grad)


@pytest.mark.parametrize("override,exc,msg", [
    (dict(dL=lambda t: t.float()), TypeError, r"wavefront2d: dL must have the dtype of u"),
    (dict(D=lambda t: t.to("meta")), ValueError, r"wavefront2d: D is on meta but u is on cpu"),
    (dict(BT=lambda t: t.tolist()), TypeError, r"wavefront2d: BT must be a torch.Tensor, got list"),
    (dict(origin=lambda o: "middle"), ValueError, r"wavefront2d: origin must be one of"),
])
def test_wavefront2d_refuses_a_bad_call_after_a_good_one_with_the_same_shapes(override, exc, msg):
    inputs = dict(_wave_inputs(), origin="br")
    wavefront2d(**inputs)
    (name, change), = override.items()
    for _ in range(2):
        with pytest.raises(exc, match=msg):
            wavefront2d(**dict(inputs, **{name: change(inputs[name])}))


def test_wavefront2d_other_strides_and_the_eager_path_against_the_custom_ops():
    inputs = _wave_inputs(torch.float32, requires_grad=True)
    names = [k for k, v in inputs.items() if v is not None]
    gout = torch.randn(2, 5, 6, 4)

    def run(args):
        out = wavefront2d(**args, origin="tr", backend="kernel")
        return out, torch.autograd.grad(out, [args[k] for k in names], gout)

    out, grads = run(inputs)
    assert type(out.grad_fn).__name__ == "_Wavefront2dFunctionBackward"
    with _Passthrough():
        out_op, grads_op = run(inputs)
    assert torch.equal(out, out_op) and all(torch.equal(a, b) for a, b in zip(grads, grads_op))
    # The same shapes in other layouts (channels-first u, a strided slice of BT): their own frame.
    strided = dict(inputs)
    strided["u"] = inputs["u"].detach().permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1).requires_grad_()
    strided["BT"] = torch.cat([inputs["BT"], inputs["BT"]], dim=-1)[..., :2].detach().requires_grad_()
    out_s, _ = run(strided)
    ref = wavefront2d_reference(**{k: None if v is None else v.detach().double() for k, v in inputs.items()},
                                origin="tr")
    assert rel_err(out_s, ref) < 1e-5 and rel_err(out, ref) < 1e-5
