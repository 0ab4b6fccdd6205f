"""Whole-model throughput of timm models: inference and one training step, bf16 autocast.

    python benchmarks/bench_models.py [NAME ...] [--batch 128 256] [--train-batch 64] [--compile]
                                      [--layout best|cf|cl] [--out FILE.md] [--device cuda|cpu]

Default names: vmamba_tiny vmamba2d_tiny vmamba_small m2d_nano m2d_tiny m2d_small convnext_tiny
swin_tiny_patch4_window7_224 (names timm does not know are reported and skipped). For each model:
inference img/s at 224x224 for every --batch (median of --steps timed calls after --warmup, CUDA
events, inputs rotated among 3 fresh random sets, cudnn.benchmark on), in channels-first and
channels-last layout (--layout best keeps the faster, the table says which); one training step
(forward, cross-entropy, backward, AdamW step) at --train-batch, in both layouts with --layout best
(the faster kept, as for inference: a model's faster layout for inference need not be its faster
one for training);
peak memory of each. --compile adds the same for torch.compile(model). Prints a Markdown table
headed by device, date, torch version and commit (env SSM2D_COMMIT where the tree has no .git).

CPU smoke run: python benchmarks/bench_models.py --device cpu --batch 2 --train-batch 2 --steps 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import header, time_ms  # noqa: E402

import ssm2d_vision  # noqa: E402,F401  (registers the project's models; before timm)
import timm  # noqa: E402
from ssm2d_nn.fileio import atomic_output  # noqa: E402

DEFAULT_MODELS = ["vmamba_tiny", "vmamba2d_tiny", "vmamba_small", "m2d_nano", "m2d_tiny", "m2d_small",
                  "convnext_tiny", "swin_tiny_patch4_window7_224"]
IMG = 224


def peak_gib(fn, inputs, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn(inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def make_inputs(batch: int, device: str, channels_last: bool, n: int = 3, image: int = IMG):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.randn(batch, 3, image, image, device=device).contiguous(memory_format=fmt) for _ in range(n)]


def set_backends(device: str) -> None:
    """The cuDNN / TF32 settings every timed run uses (cudnn.benchmark on)."""
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def inference(model, batch: int, device: str, channels_last: bool, args) -> tuple[float, float | None]:
    inputs = make_inputs(batch, device, channels_last)

    def run(x):
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            return model(x)

    ms = time_ms(run, inputs, device, args.warmup, args.steps)
    return batch / (ms * 1e-3), peak_gib(run, inputs[0], device)


def training_step(model, batch: int, device: str, channels_last: bool, image: int = IMG):
    """(step, inputs): one AdamW training step of ``model`` (put in train mode) on an input batch
    (bf16 autocast forward, cross-entropy, backward, step), and 3 fresh random input batches."""
    inputs = make_inputs(batch, device, channels_last, image=image)
    labels = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model.train()

    def step(x):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
        loss.backward()
        opt.step()

    return step, inputs


def training(model, batch: int, device: str, channels_last: bool, args) -> tuple[float, float | None]:
    step, inputs = training_step(model, batch, device, channels_last)
    ms = time_ms(step, inputs, device, args.warmup, args.steps)
    peak = peak_gib(step, inputs[0], device)
    model.eval()
    return batch / (ms * 1e-3), peak


def bench_model(name: str, device: str, args) -> dict:
    model = timm.create_model(name, num_classes=1000).to(device).eval()
    row = dict(model=name, params=sum(p.numel() for p in model.parameters()))
    layouts = {"cf": [False], "cl": [True], "best": [False, True]}[args.layout]
    best_cl, best = False, -1.0
    for batch in args.batch:
        results = {}
        for cl in layouts:
            model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            results[cl] = inference(model, batch, device, cl, args)
        cl = max(results, key=lambda k: results[k][0])
        row[f"infer_{batch}"] = results[cl]
        row[f"layout_{batch}"] = "cl" if cl else "cf"
        # the layout not kept, for the record (a model's two layouts can differ by 1.5x)
        row[f"other_{batch}"] = [("cl" if k else "cf", results[k][0]) for k in results if k != cl]
        if results[cl][0] > best:
            best, best_cl = results[cl][0], cl
    train = {}
    for cl in layouts:
        model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        train[cl] = training(model, args.train_batch, device, cl, args)
    cl = max(train, key=lambda k: train[k][0])
    row["train"], row["layout_train"] = train[cl], "cl" if cl else "cf"
    row["other_train"] = [("cl" if k else "cf", train[k][0]) for k in train if k != cl]
    model.to(memory_format=torch.channels_last if best_cl else torch.contiguous_format)
    if args.compile:
        compiled = torch.compile(model)
        row["compiled_infer"] = inference(compiled, args.batch[0], device, best_cl, args)
        row["compiled_train"] = training(compiled, args.train_batch, device, best_cl, args)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _rate(ips: float) -> str:
    return f"{ips:,.0f}" if ips >= 100 else f"{ips:.3g}"


def fmt(pair) -> str:
    ips, peak = pair
    return _rate(ips) + (f" ({peak:.1f} GiB)" if peak is not None else "")


def _others(others: list) -> str:
    return "".join(f"; {name} {_rate(ips)}" for name, ips in others)


def table(rows: list[dict], args, head: str, skipped: list[str]) -> str:
    cols = ["model", "params"] + [f"infer b{b} img/s" for b in args.batch] + [f"train b{args.train_batch} img/s"]
    if args.compile:
        cols += [f"compiled infer b{args.batch[0]}", f"compiled train b{args.train_batch}"]
    lines = [head, "",
             f"224x224, bf16 autocast, AdamW training step; median of {args.steps} after {args.warmup} warm-up; "
             "peak memory in parentheses; layout cf = channels-first, cl = channels-last (the faster one "
             "kept, the other's img/s after it).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["model"], f"{r['params']:,}"]
        cells += [f"{fmt(r[f'infer_{b}'])} [{r[f'layout_{b}']}{_others(r[f'other_{b}'])}]" for b in args.batch]
        cells.append(f"{fmt(r['train'])} [{r['layout_train']}{_others(r['other_train'])}]")
        if args.compile:
            cells += [fmt(r["compiled_infer"]), fmt(r["compiled_train"])]
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "skipped (not registered with timm): " + ", ".join(skipped)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 256], help="inference batch sizes")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed repeats (median)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--layout", default="best", choices=["best", "cf", "cl"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (use --device cpu for a smoke run)")
    if min(args.batch + [args.train_batch, args.steps]) < 1 or args.warmup < 0:
        parser.error("--batch, --train-batch and --steps must be >= 1, --warmup >= 0")
    set_backends(args.device)
    known = set(timm.list_models())
    names = [n for n in args.models if n in known]
    skipped = [n for n in args.models if n not in known]
    for n in skipped:
        print(f"skipping {n}: not registered with timm", file=sys.stderr)
    rows = []
    for name in names:
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        rows.append(bench_model(name, args.device, args))
    head = header(args.device)
    text = table(rows, args, head, skipped)
    print(text)
    if args.out:
        with atomic_output(args.out) as tmp:
            tmp.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
