"""Host time per op call: what the Python side of ssm2d_nn.ops.scan2d and wavefront2d costs.

The kernels run asynchronously on the GPU, so a call's host time (argument checks, backend choice,
descriptors, allocations, the autograd node, the launch) is what bounds a model whose kernels are
short. Each call is timed alone with perf_counter, after the device queue was drained (outside the
timing, so the kernels' own time never enters): the median over ``--calls`` calls, and the median of
that over ``--repeats`` repeats, in microseconds.

Cases: VMamba-T stage 1 as the issue states it: u (64, 384, 1, 3136) (the 1D routes' shape) and the
2D shape (64, 384, 56, 56), N = 1, G = 4, softplus, delta_bias, D and z; forward without grad, forward
with grad, forward+backward. Also scan2d_routes as SS2D calls it at stage 1 (the four 2D routes of
2DVMamba in one call; VMamba's two 1D directions over the stacked layouts), for comparison with four
(two) scan2d calls. ``--device cpu`` measures the same Python with the CPU kernel on tiny
grids of the same structure (the kernel's own time there is small but included; the numbers are a
CPU host's, not a GPU host's).

    python benchmarks/bench_op_overhead.py --out DIR [--device cuda|cpu] [--calls 200] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import header, write_report  # noqa: E402

from ssm2d_nn.ops import scan2d, scan2d_routes, wavefront2d  # noqa: E402

TARGET_US = 25.0  # issue 14: host time of a scan2d forward call at VMamba-T stage 1

# (name, u shape (batch, D, H, W)); CPU mode keeps batch, channels and the grid's aspect small.
SCAN2D_CASES = {
    "cuda": [("VMamba-T s1 route (64, 384, 1, 3136)", (64, 384, 1, 3136)),
             ("VMamba-T s1 2D (64, 384, 56, 56)", (64, 384, 56, 56))],
    "cpu": [("tiny route (1, 8, 1, 16)", (1, 8, 1, 16)), ("tiny 2D (1, 8, 4, 4)", (1, 8, 4, 4))],
}
# scan2d_routes as SS2D calls it: (name, u shape, routes, G). 2D: the four routes of 2DVMamba on
# the (b, d_inner, H, W) input; cross1d: VMamba's two directions over the stacked layouts (G = 2).
SS2D_2D = (("tl", "hv"), ("tl", "vh"), ("br", "hv"), ("br", "vh"))
SS2D_1D = (("tl", "hv"), ("tr", "hv"))
ROUTES_CASES = {
    "cuda": [("SS2D 2D routes, VMamba-T s1 (64, 96, 56, 56), K=4", (64, 96, 56, 56), SS2D_2D, 1),
             ("SS2D cross1d, VMamba-T s1 (64, 192, 1, 3136), K=2, G=2", (64, 192, 1, 3136), SS2D_1D, 2)],
    "cpu": [("tiny 2D routes (1, 8, 4, 4), K=4", (1, 8, 4, 4), SS2D_2D, 1),
            ("tiny cross1d (1, 16, 1, 16), K=2, G=2", (1, 16, 1, 16), SS2D_1D, 2)],
}
# wavefront2d (batch, H, W, E), N: M2D-T stage 1 on the GPU.
WAVE_CASES = {"cuda": [("M2D-T s1 (64, 56, 56, 128), N=16", (64, 56, 56, 128), 16)],
              "cpu": [("tiny (1, 4, 4, 8), N=2", (1, 4, 4, 8), 2)]}


def scan2d_inputs(shape, device, dtype, groups=4, dstate=1, requires_grad=False):
    """scan2d's arguments at ``shape`` with the VMamba options (softplus, delta_bias, D, z)."""
    b, d, h, w = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dt).requires_grad_(requires_grad)

    return dict(u=rnd(b, d, h, w), delta=rnd(b, d, h, w, scale=0.5),
                A=(-torch.rand(d, dstate, generator=g) - 0.5).to(device).requires_grad_(requires_grad),
                B=rnd(b, groups, dstate, h, w), C=rnd(b, groups, dstate, h, w),
                D=rnd(d, dt=torch.float32), z=rnd(b, d, h, w), delta_bias=rnd(d, scale=0.1, dt=torch.float32),
                delta_softplus=True)


def routes_inputs(shape, routes, groups, device, dtype, requires_grad=False):
    """scan2d_routes' arguments as SS2D passes them (N = 1, softplus, delta_bias and D per route)."""
    b, d, h, w = shape
    k = len(routes)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dt).requires_grad_(requires_grad)

    return dict(u=rnd(b, d, h, w), delta=rnd(b, k, d, h, w, scale=0.5),
                A=(-torch.rand(k, d, 1, generator=g) - 0.5).to(device).requires_grad_(requires_grad),
                B=rnd(b, k, groups, 1, h, w), C=rnd(b, k, groups, 1, h, w), D=rnd(k, d, dt=torch.float32),
                delta_bias=rnd(k, d, scale=0.1, dt=torch.float32), delta_softplus=True, routes=routes)


def wavefront2d_inputs(shape, dstate, device, dtype, requires_grad=False):
    b, h, w, e = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, pos=False, dt=dtype):
        t = torch.rand(*s, generator=g) * 0.5 + 0.05 if pos else torch.randn(*s, generator=g)
        return t.to(device=device, dtype=dt).requires_grad_(requires_grad)

    return dict(u=rnd(b, h, w, e), dT=rnd(b, h, w, e, pos=True), dL=rnd(b, h, w, e, pos=True),
                AT=-rnd(e, dstate, pos=True, dt=torch.float32), AL=-rnd(e, dstate, pos=True, dt=torch.float32),
                BT=rnd(b, h, w, dstate), BL=rnd(b, h, w, dstate), C=rnd(b, h, w, dstate), D=rnd(e, dt=torch.float32))


def host_us(fn, device: str, calls: int, repeats: int) -> float:
    """Median host microseconds of one call: each call timed alone, the device queue drained before
    it (outside the timing), so a long kernel never makes the host wait inside the timed call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(max(3, calls // 10)):
        fn()
    medians = []
    for _ in range(repeats):
        times = []
        for _ in range(calls):
            sync()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times) * 1e6)
    sync()
    return statistics.median(medians)


def measure(op, inputs_fn, device: str, calls: int, repeats: int) -> dict:
    """Host us of forward (no grad), forward (grad on) and forward+backward."""
    plain = inputs_fn(requires_grad=False)
    grad = inputs_fn(requires_grad=True)
    leaves = [t for t in grad.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def fwd_nograd():
        with torch.no_grad():
            op(**plain)

    def fwd_grad():
        op(**grad)

    def fwd_bwd():
        out = op(**grad)
        torch.autograd.backward(out, out.detach())  # the upstream gradient: out itself
        for t in leaves:  # as a training step's zero_grad(set_to_none=True): no accumulation next time
            t.grad = None

    return dict(fwd_nograd=host_us(fwd_nograd, device, calls, repeats),
                fwd_grad=host_us(fwd_grad, device, calls, repeats),
                fwd_bwd=host_us(fwd_bwd, device, max(1, calls // 2), repeats))


def empty_op_us(device: str, calls: int, repeats: int) -> float:
    """The floor of one torch op on the same tensors: x.add_(0)-like host cost, for scale."""
    x = torch.zeros(16, device=device)
    return host_us(lambda: x.add_(1.0), device, calls, repeats)


class _EmptyFunction(torch.autograd.Function):
    """An autograd node with scan2d's eager signature (frame, two flags, eight tensor slots) whose
    forward only allocates its output and saves its inputs, as scan2d's does: what recording one
    custom node costs before any kernel work."""

    @staticmethod
    def forward(ctx, frame, softplus, deterministic, u, delta, A, B, C, D, z, delta_bias):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, None, None)
        ctx.frame, ctx.flags = frame, (softplus, deterministic)
        return torch.empty_like(u)

    @staticmethod
    def backward(ctx, dout):  # pragma: no cover - never called: the floor times the forward only
        return (None,) * 11


def autograd_floor_us(device: str, calls: int, repeats: int) -> float:
    """Host us of ``_EmptyFunction.apply`` on scan2d's arguments (grad on): the part of a grad-on
    call that is torch.autograd's own, whatever the op does."""
    args = scan2d_inputs((1, 8, 1, 16), device, torch.float32, requires_grad=True)
    tensors = [args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    return host_us(lambda: _EmptyFunction.apply(None, True, False, *tensors), device, calls, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for op_overhead.md / .json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.device == "cpu":
        import ssm2d_kernels

        ssm2d_kernels.set_num_threads(1)  # tiny grids: a thread pool's wake-up would dominate
    dev = args.device
    rows = []
    for name, shape in SCAN2D_CASES[dev]:
        r = measure(scan2d, lambda requires_grad, s=shape: scan2d_inputs(s, dev, dtype, requires_grad=requires_grad),
                    dev, args.calls, args.repeats)
        rows.append(dict(op="scan2d", case=name, **r))
    for name, shape, routes, groups in ROUTES_CASES[dev]:
        r = measure(scan2d_routes, lambda requires_grad, s=shape, rt=routes, g=groups: routes_inputs(
            s, rt, g, dev, dtype, requires_grad), dev, args.calls, args.repeats)
        rows.append(dict(op="scan2d_routes", case=name, **r))
    for name, shape, n in WAVE_CASES[dev]:
        r = measure(wavefront2d, lambda requires_grad, s=shape, n=n: wavefront2d_inputs(s, n, dev, dtype, requires_grad),
                    dev, args.calls, args.repeats)
        rows.append(dict(op="wavefront2d", case=name, **r))
    floor = empty_op_us(dev, args.calls * 5, args.repeats)
    node_floor = autograd_floor_us(dev, args.calls * 5, args.repeats)
    lines = [f"# Op call host time ({args.dtype})", "", header(dev), "",
             f"Host microseconds per call (perf_counter around each call, queue drained before it; median "
             f"of {args.calls} calls, median of {args.repeats} repeats); target for the scan2d forward at VMamba-T stage 1: <= {TARGET_US:.0f} us."
             + (" CPU mode: tiny grids, the CPU kernel's own time included." if dev == "cpu" else ""), "",
             "| op | case | fwd, no grad | fwd, grad on | fwd+bwd | target (fwd) |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = r["fwd_grad"] <= TARGET_US and r["fwd_nograd"] <= TARGET_US
        target = "" if r["op"] != "scan2d" else (f"<= {TARGET_US:.0f}: " + ("met" if met else "NOT met") if dev == "cuda"
                                                 else f"<= {TARGET_US:.0f} on the GPU host")
        lines.append(f"| {r['op']} | {r['case']} | {r['fwd_nograd']:.1f} | {r['fwd_grad']:.1f} | "
                     f"{r['fwd_bwd']:.1f} | {target} |")
    lines += ["", f"For scale: one in-place add on a 16-element tensor costs {floor:.1f} us here; an empty "
              f"autograd.Function with scan2d's arguments (it allocates its output and saves its inputs, "
              f"grad on) costs {node_floor:.1f} us: the part of the grad-on column that torch.autograd "
              "takes whatever the op does."]
    write_report(args.out, "op_overhead", lines, rows + [dict(op="add_", floor_us=floor),
                                                         dict(op="empty_autograd_function", floor_us=node_floor)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
