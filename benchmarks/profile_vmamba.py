"""Where a vmamba_tiny training step spends its time: torch.profiler over a few AdamW steps.

One step: bf16 autocast forward at --image x --image, cross-entropy, backward, AdamW step (as
bench_models.py's training step); with --inference, one bf16 autocast forward without autograd in
eval mode (bench_models.py's inference step; use --batch 128 for its batch). After --warmup steps,
--steps steps are profiled. Written to --out (file names get an `_inference` suffix in that mode):

* profile_vmamba.md / .json: device time per step grouped by category (scan kernels, norms,
  elementwise and copies (permute/contiguous copies included), GEMMs and convolutions, optimizer,
  other), the top-25 kernels, and the host side: wall time per step, device busy time, and the time
  the CPU spent waiting for the device (synchronisations);
* the host side's operator counts per step: every aten operator, the top-level ones (called from
  Python or autograd), the leaf non-view ones (those that do work: roughly the kernel launches and
  allocations), and a few named ones (convolutions, GEMMs, copies, reductions, fills);
* profile_vmamba_key_averages.txt: the profiler's raw key_averages table.

On the CPU (--device cpu, for a smoke run: --batch 2 --image 64) there are no kernels: the same
tables are built from the CPU operators' self time.

    python benchmarks/profile_vmamba.py --out DIR [--model vmamba_tiny] [--batch 64] [--image 224] [--channels-last]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import header, write_report  # noqa: E402

import ssm2d_vision  # noqa: E402,F401  (registers the project's models; before timm)
import timm  # noqa: E402

# First match wins: the optimizer's fused/foreach kernels before the elementwise ones they resemble.
CATEGORIES = [
    ("optimizer", r"adam|multi_tensor_apply|foreach|optimizer"),
    ("norms", r"layer_?norm|group_?norm|batch_?norm|rms_?norm|welford|native_layer_norm|ssm2d::.*\bln_"),
    ("scan kernels", r"^(?!.*star_relu).*(scan2d|wave_(fwd|bwd)|add_chunks_kernel|ssm2d::)"),
    ("GEMMs / convs", r"gemm|cutlass|xmma|cublas|nvjet|conv|cudnn|wgrad|dgrad|fprop|implicit|winograd"
                      r"|aten::(mm|addmm|bmm|matmul|linear)\b"),
    ("elementwise / copies", r"elementwise|star_relu|copy|memcpy|memset|permute|transpose|contiguous|cat|fill|index"
                             r"|aten::(add|mul|sub|div|silu|gelu|exp|where|to|_to_copy|clone|zero_|fill_)"),
]
# Operators that only make views or metadata (no kernel, no allocation): left out of the "leaf
# non-view" count of operators that do work.
VIEW_OPS = {"as_strided", "view", "select", "slice", "transpose", "t", "permute", "expand", "unsqueeze", "squeeze",
            "_reshape_alias", "reshape", "detach", "resolve_conj", "resolve_neg", "narrow", "unbind", "split",
            "split_with_sizes", "_unsafe_view", "alias", "unflatten", "flatten", "mT", "view_as", "expand_as",
            "contiguous", "to", "lift_fresh", "chunk", "as_strided_", "diagonal"}
NAMED_OPS = ("convolution", "convolution_backward", "mm", "addmm", "bmm", "baddbmm", "copy_", "sum", "fill_", "zero_",
             "add_", "clone", "slice_backward", "empty")
SYNC_CALLS = re.compile(r"cuda(Stream|Device|Event)Synchronize|cudaMemcpy(?!Async)|aten::item|aten::_local_scalar_dense")


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def _inside_optimizer(evt) -> bool:
    """Whether a CPU event runs inside an optimizer step (its parent chain)."""
    while evt is not None:
        if evt.name.startswith("Optimizer.step"):
            return True
        evt = evt.cpu_parent
    return False


def kernel_times(prof, device: str) -> dict[tuple[str, str], float]:
    """(name, category) -> total self time in us over the profiled steps. On the GPU: the
    CUDA kernels, copies and memsets; on the CPU: every operator's self CPU time (nested ones are
    not double counted). Whatever an optimizer step launched or ran is "optimizer" (found through
    the launching CPU event's parents), the rest is categorised by name."""
    events = prof.events()
    # The operators a kernel is linked to (kernels carry their launching operator's id; the CUDA
    # runtime's own events carry ids of another counter and are left out).
    cpu = {e.id: e for e in events
           if e.device_type == torch.autograd.DeviceType.CPU and not getattr(e, "linked_correlation_id", 0)}
    times: dict[tuple[str, str], float] = {}
    for e in events:
        if device == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = float(e.time_range.elapsed_us())
            launcher = cpu.get(getattr(e, "linked_correlation_id", 0))
        else:
            if e.device_type != torch.autograd.DeviceType.CPU or e.is_async:
                continue
            t = float(e.self_cpu_time_total)
            launcher = e
        if t <= 0:
            continue
        key = (e.name, "optimizer" if _inside_optimizer(launcher) else category(e.name))
        times[key] = times.get(key, 0.0) + t
    return times


def host_wait_us(prof) -> float:
    """CPU time inside calls that block until the device is done (synchronisations, blocking copies)."""
    return sum(float(e.self_cpu_time_total) for e in prof.key_averages() if SYNC_CALLS.search(e.key))


def op_counts(prof, steps: int) -> dict:
    """aten operator counts per step: all, top-level (not inside another aten operator), leaf non-view
    (no aten operator inside, not a view: the ones that do work), and the NAMED_OPS."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")]
    top = sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    leaf = sum(1 for e in events if e.name[6:] not in VIEW_OPS
               and not any(c.name.startswith("aten::") for c in e.cpu_children))
    counts = {"all aten": len(events), "top-level": top, "leaf non-view": leaf}
    for name in NAMED_OPS:
        counts[name] = sum(1 for e in events if e.name == "aten::" + name)
    return {k: v / steps for k, v in counts.items()}


def training_step(model, opt, x, labels, device):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
    loss.backward()
    opt.step()


def inference_step(model, x, device):
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        model(x)


def short(name: str, width: int = 90) -> str:
    name = name.replace("|", "\\|")
    return name if len(name) <= width else name[: width - 3] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="vmamba_tiny")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--channels-last", action="store_true",
                        help="model and input in channels-last memory format (what bench_models.py picks on CUDA)")
    parser.add_argument("--inference", action="store_true",
                        help="profile the inference step (eval mode, no autograd) instead of a training step")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu", file=sys.stderr)
        return 2
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = timm.create_model(args.model, num_classes=1000).to(device).to(memory_format=fmt)
    model.train(not args.inference)
    x = torch.randn(args.batch, 3, args.image, args.image, device=device).contiguous(memory_format=fmt)
    if args.inference:
        def step():
            inference_step(model, x, device)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        labels = torch.randint(0, 1000, (args.batch,), device=device)

        def step():
            training_step(model, opt, x, labels, device)
    for _ in range(args.warmup):
        step()
    sync()

    # Wall time per step without the profiler's own overhead, then the profiled steps.
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - t0) / args.steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()

    times = kernel_times(prof, device)
    total_us = sum(times.values()) or 1.0
    by_cat: dict[str, float] = {}
    for (_, cat), t in times.items():
        by_cat[cat] = by_cat.get(cat, 0.0) + t
    wait_ms = host_wait_us(prof) / args.steps / 1e3
    busy_ms = total_us / args.steps / 1e3
    what = "device (kernel) time" if device == "cuda" else "CPU operator self time"

    kind = "inference" if args.inference else "training"
    lines = [f"# {args.model} {kind} step profile", "", header(device), "",
             f"batch {args.batch}, {args.image}x{args.image}, "
             f"{'channels-last' if args.channels_last else 'channels-first'}, bf16 autocast, "
             f"{'eval mode, no autograd' if args.inference else 'AdamW'}; {args.warmup} warm-up steps, "
             f"{args.steps} profiled; times per step.", "",
             f"Wall time per step (unprofiled): {wall_ms:.2f} ms ({args.batch / wall_ms * 1e3:.1f} img/s); "
             f"{what}: {busy_ms:.2f} ms" + (f" ({busy_ms / wall_ms:.0%} of the wall time busy)" if device == "cuda"
                                            else "") + f"; CPU waiting on the device (syncs, blocking copies, "
             f"including the synchronize after the profiled steps: how far the device lags the host): "
             f"{wait_ms:.2f} ms.", "",
             f"## {what} by category", "", "| category | ms / step | share |", "|---|---|---|"]
    for cat, t in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {t / args.steps / 1e3:.3f} | {t / total_us:.1%} |")
    lines += ["", f"## Top {args.top} {'kernels' if device == 'cuda' else 'operators'}", "",
              "| # | name | category | ms / step | share |", "|---|---|---|---|---|"]
    top = sorted(times.items(), key=lambda kv: -kv[1])[: args.top]
    for i, ((name, cat), t) in enumerate(top, 1):
        lines.append(f"| {i} | `{short(name)}` | {cat} | {t / args.steps / 1e3:.3f} | {t / total_us:.1%} |")
    counts = op_counts(prof, args.steps)
    lines += ["", "## Host operators per step" + ("" if args.inference else " (optimizer step included)"), "",
              "| " + " | ".join(counts) + " |", "|" + "---|" * len(counts),
              "| " + " | ".join(f"{v:.0f}" for v in counts.values()) + " |"]
    stem = "profile_vmamba" + ("_inference" if args.inference else "")
    lines += ["", f"Raw table: {stem}_key_averages.txt"]

    sort_key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    raw = prof.key_averages().table(sort_by=sort_key, row_limit=80, max_name_column_width=100)
    rows = [dict(category=c, ms_per_step=t / args.steps / 1e3) for c, t in by_cat.items()]
    rows += [dict(kernel=n, category=c, ms_per_step=t / args.steps / 1e3) for (n, c), t in top]
    rows.append(dict(wall_ms=wall_ms, busy_ms=busy_ms, host_wait_ms=wait_ms, batch=args.batch, image=args.image,
                     channels_last=args.channels_last, ops_per_step=counts))
    write_report(args.out, stem, lines, rows)
    Path(args.out, f"{stem}_key_averages.txt").write_text(raw + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
