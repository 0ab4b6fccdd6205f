"""One MIL training step (forward, cross-entropy, backward, AdamW step, zero_grad) on synthetic slides.

For each model x slide size x precision: median step time (CUDA events on GPU, perf_counter on CPU;
warm-up first; the inputs rotate through fresh random bags, never zeros) and, on GPU, the peak memory
of the step beyond what was allocated before it (model, AdamW state and the input bag are counted
separately: the input features are listed in their own column). Slides are blob-shaped tissue masks
(not rectangles) on a grid whose tissue-cropped fill is ~50-70%; features are 1024-dim like
UNI-class encoders. Prints a Markdown table.

    python benchmarks/bench_mil.py                              # GPU: 10k, 50k, 150k patches
    python benchmarks/bench_mil.py --device cpu --sizes 2000    # CPU smoke check
    python benchmarks/bench_mil.py --models 2dmambamil --sizes 150000 --precision bf16 --breakdown

``--breakdown`` also prints, per row, the byte count of ``mil_memory.py`` (saved tensors by op, the
largest tensors alive at the peak) taken on the same device, next to the allocator's peak.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import HostDeviceTrace, device_gaps, device_time_by_operator, header, time_ms  # noqa: E402

from ssm2d_path.bag import Bag, SlideGrid  # noqa: E402
from ssm2d_path.models import build_model, param_groups  # noqa: E402


def blob_cells(n: int, fill: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly n (row, col) cells forming a blob: a smooth random field plus a radial falloff,
    thresholded at its n-th largest value on a box of ~n/fill cells."""
    g = torch.Generator().manual_seed(seed)
    area = n / fill
    h = int(math.ceil(math.sqrt(area / 1.25)))
    w = int(math.ceil(area / h))
    low = torch.randn(1, 1, 6, 6, generator=g)
    field = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    field = field * 0.5 - 2.0 * (xx ** 2 + yy ** 2) + 0.05 * torch.randn(h, w, generator=g)
    flat = torch.topk(field.flatten(), n).indices.numpy()
    return flat // w, flat % w


def make_bag(n: int, fill: float, in_dim: int, seed: int, device: str, stride: int = 256) -> Bag:
    rows, cols = blob_cells(n, fill, seed)
    coords = np.stack([cols * stride, rows * stride], axis=1)
    g = torch.Generator().manual_seed(10_000 + seed)
    feats = torch.randn(n, in_dim, generator=g)
    slide = SlideGrid.from_coords(f"synthetic{n}_{seed}", feats, coords, stride)
    return Bag(slide.slide_id, [slide]).to(device)


def model_kwargs(name: str, backend: str) -> dict:
    return {"backend": backend} if name in ("2dmambamil", "m2dmil", "mambamil") else {}


def make_step(model, opt, device: str, amp: bool):
    def step(inputs):
        bag, label = inputs
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            out = model(bag)
        loss = F.cross_entropy(out.logits.float(), label)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peak_step_mib(step, inputs) -> float:
    """Peak allocated during one step beyond what was live before it (model, AdamW state, inputs)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--models", default="2dmambamil,abmil,transmil")
    ap.add_argument("--sizes", default="10000,50000,150000", help="patches per slide, comma-separated")
    ap.add_argument("--precision", default="bf16,fp32", help="bf16 (autocast) and/or fp32")
    ap.add_argument("--fill", type=float, default=0.6, help="target tissue fill of the cropped grid (0.5-0.7)")
    ap.add_argument("--in-dim", type=int, default=1024)
    ap.add_argument("--n-outputs", type=int, default=2)
    ap.add_argument("--backend", default="auto", help="scan backend of the SSM models")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--inputs", type=int, default=3, help="distinct random bags the repeats cycle through")
    ap.add_argument("--chunk-channels", type=int, default=None,
                    help="channels per chunk of the SSM layers' chunked scan2d path (default: the layer's auto)")
    ap.add_argument("--checkpoint", choices=("auto", "true", "false"), default="auto",
                    help="the SSM layers' checkpoint setting (default: the models' 'auto')")
    ap.add_argument("--breakdown", action="store_true", help="print mil_memory.py's byte count for each row")
    ap.add_argument("--profile", action="store_true",
                    help="print where one step's device time goes (torch.profiler, top kernels) for each row")
    ap.add_argument("--top", type=int, default=10, help="rows of the --breakdown tables")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device (use --device cpu for the smoke check)")
    if not 0.3 <= args.fill <= 0.9:
        ap.error(f"--fill must be in [0.3, 0.9], got {args.fill}")
    sizes = [int(s) for s in args.sizes.split(",")]
    models = args.models.split(",")
    precisions = args.precision.split(",")
    for p in precisions:
        if p not in ("bf16", "fp32"):
            ap.error(f"--precision: expected bf16 and/or fp32, got {p!r}")

    print(header(args.device))
    print(f"one training step = forward + cross-entropy + backward + AdamW step + zero_grad; batch = one bag; "
          f"features {args.in_dim}-d float32; median of {args.reps} after {args.warmup} warm-up steps, "
          f"{args.inputs} rotating random bags; peak = beyond model + optimizer state + inputs\n")
    breakdowns: list[str] = []
    print("| model | patches | grid (H x W) | fill | precision | step ms | peak MiB | inputs MiB | params | scan backend |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        bags = [make_bag(n, args.fill, args.in_dim, seed, args.device) for seed in range(args.inputs)]
        shape = bags[0].slides[0].shape
        fill = n / (shape[0] * shape[1])
        inputs_mib = bags[0].features.numel() * bags[0].features.element_size() / 2**20
        for name in models:
            for prec in precisions:
                torch.manual_seed(0)
                model = build_model(name, args.in_dim, args.n_outputs, **model_kwargs(name, args.backend)).to(args.device)
                for layer in getattr(model, "layers", []):
                    if args.chunk_channels is not None:
                        layer.chunk_channels = args.chunk_channels
                    if args.checkpoint != "auto":
                        layer.checkpoint = args.checkpoint == "true"
                model.train()
                opt = torch.optim.AdamW(param_groups(model, 1e-5), lr=1e-4)
                g = torch.Generator().manual_seed(n)
                labels = [torch.randint(0, args.n_outputs, (1,), generator=g).to(args.device) for _ in bags]
                inputs = list(zip(bags, labels))
                step = make_step(model, opt, args.device, prec == "bf16")
                try:
                    ms = time_ms(step, inputs, args.device, args.warmup, args.reps)
                    peak = f"{peak_step_mib(step, inputs[0]):.0f}" if args.device == "cuda" else "n/a"
                    ms_s = f"{ms:.2f}"
                except torch.OutOfMemoryError:
                    ms_s, peak = "OOM", "OOM"
                params = sum(p.numel() for p in model.parameters())
                print(f"| {name} | {n} | {shape[0]} x {shape[1]} | {fill:.2f} | {prec} | {ms_s} | {peak} | "
                      f"{inputs_mib:.0f} | {params:,} | {getattr(model, 'scan_backend', None) or '-'} |", flush=True)
                if args.profile and ms_s != "OOM" and args.device == "cuda":
                    breakdowns.append(f"### {name}, {n} patches, {prec}: device time per step (step {ms_s} ms)\n\n"
                                      + profile_step(step, inputs, args.top))
                if args.breakdown and ms_s != "OOM":
                    breakdowns.append(f"### {name}, {n} patches, {prec} (allocator peak {peak} MiB)\n\n"
                                      + count_breakdown(model, opt, inputs[0], args.device, prec == "bf16", args.top))
                del model, opt, step
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    for b in breakdowns:
        print("\n" + b)


def profile_step(step, inputs, top: int, steps: int = 3) -> str:
    """torch.profiler over a few steps: the CUDA kernels by device time per step, the step's
    device-busy total (the rest of the step is the GPU waiting for the host), and which host
    operators the device waits for (harness.device_gaps, from a second run recording the host side)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in range(steps):
            step(inputs[k % len(inputs)])
        torch.cuda.synchronize()
    # A second run with the host side recorded too: which host operators the device waits for.
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as host_prof:
        for k in range(steps):
            step(inputs[k % len(inputs)])
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    busy = sum(e.self_device_time_total for e in events) / steps / 1e3
    lines = [f"device busy {busy:.2f} ms per step", "", "| kernel | ms per step | calls per step |", "|---|---|---|"]
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        lines.append(f"| {e.key[:90]} | {e.self_device_time_total / steps / 1e3:.3f} | {e.count // steps} |")
    trace = HostDeviceTrace(host_prof)
    lines += ["", "Host side (a second profiled run, CPU operators recorded too):", "", device_gaps(trace, steps, top),
              "", "Device time by the operators that launched it (same run):", "",
              device_time_by_operator(trace, steps, top)]
    return "\n".join(lines)


def count_breakdown(model, opt, inputs, device: str, amp: bool, top: int) -> str:
    """mil_memory.py's byte count of one step (after the timed ones: the AdamW state exists)."""
    from mil_memory import breakdown, count_step, training_step

    bag, label = inputs
    pre = [bag.features, label, *model.parameters(), *model.buffers()]
    pre += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    counter = count_step(training_step(model, opt, bag, label, device, amp), pre)
    return breakdown(counter, top)


if __name__ == "__main__":
    main()
