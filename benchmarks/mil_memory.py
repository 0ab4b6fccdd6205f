"""Byte count of one MIL training step: what autograd saves, and the peak of live tensors.

GPU memory cannot be measured without a GPU, but it can be counted: this tool runs one training step
(forward, cross-entropy, backward, AdamW step) of a MIL model on a synthetic slide (the slides of
``bench_mil.py``) and records

* **saved**: every tensor autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``),
  deduplicated by storage, split into references to the inputs/parameters (free) and new tensors,
  grouped by the op that produced them;
* **live peak**: every storage an op allocates (a ``TorchDispatchMode`` sees each op's outputs; a
  weak reference says when the storage dies), giving the running total of bytes allocated during
  the step beyond what existed before it (model, optimizer state, input features), its peak per
  phase (forward, backward, optimizer) and the largest tensors alive at the peak.

On CPU the scan2d kernel keeps no tile carries and needs no backward workspace; the counter adds the
CUDA kernel's (``scan2d_carry_floats`` float32 values alive as long as the scan's saved pre-gate
output, ``scan2d_backward_workspace_floats`` transient in each backward call), so the CPU count
models the CUDA step. Other differences from a CUDA run: the caching allocator rounds blocks up (to
512 B, and 2 MiB segments) and cuBLAS/cuDNN workspaces are not seen; CPU autocast casts the same
ops to bf16 as CUDA autocast for everything these models run (linear, matmul, conv; norms and
softmax in float32); CPU dropout keeps its mask in the input's dtype where CUDA keeps a bool mask.
Checked against the GPU: at 150k patches ABMIL counts 1246 MiB (GPU 1195 MiB with its bool mask),
2DMambaMIL before the chunked layer 1998 MiB (GPU 2157 MiB); the allocator adds up to ~10%.
``bench_mil.py --breakdown`` prints the same table on the GPU next to
``torch.cuda.max_memory_allocated``.

    python benchmarks/mil_memory.py --patches 150000              # 2dmambamil, bf16 autocast
    python benchmarks/mil_memory.py --patches 150000 --models 2dmambamil,abmil --top 12
"""

from __future__ import annotations

import argparse
import sys
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 2 ** 20


def _storage_key(t: torch.Tensor) -> tuple:
    st = t.untyped_storage()
    return (t.device.type, t.device.index, st.data_ptr())


class MemoryCounter(TorchDispatchMode):
    """Counts bytes of the storages the ops under it allocate, and of the tensors autograd saves.

    ``phase(name)`` starts a phase (its peak is kept separately); ``peaks`` maps phase -> peak bytes,
    ``peak_snapshot`` is the list of (bytes, op, shape, dtype) alive at the overall peak, ``saved``
    maps storage key -> (bytes, op, shape, dtype, phase) for tensors autograd saved, and
    ``free_saved`` the bytes of saved references to storages that existed before (inputs, params).
    """

    def __init__(self, add_cuda_scan_buffers: bool = True):
        super().__init__()
        self.add_cuda_scan_buffers = add_cuda_scan_buffers
        self.live: dict[tuple, tuple] = {}
        self.current = 0
        self.peak = 0
        self.peak_snapshot: list[tuple] = []
        self.peaks: dict[str, int] = defaultdict(int)
        self.saved: dict[tuple, tuple] = {}
        self.free_saved: dict[tuple, int] = {}
        self.phase_name = "forward"
        self.last_op = "?"
        self._virtual = 0

    # -- phases and reports --------------------------------------------------------------------------

    def phase(self, name: str) -> None:
        self.phase_name = name

    def _bump(self, extra: int = 0) -> None:
        now = self.current + extra
        if now > self.peaks[self.phase_name]:
            self.peaks[self.phase_name] = now
        if now > self.peak:
            self.peak = now
            self.peak_snapshot = sorted(self.live.values(), key=lambda v: -v[0])
            if extra:
                self.peak_snapshot.insert(0, (extra, f"{self.last_op} (transient workspace)", (), torch.float32))

    def _free(self, key: tuple, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def _track(self, t: torch.Tensor, op: str) -> None:
        key = _storage_key(t)
        nbytes = t.untyped_storage().nbytes()
        if key in self.live or nbytes == 0 or key in self._preexisting:
            return
        self.live[key] = (nbytes, op, tuple(t.shape), t.dtype)
        self.current += nbytes
        weakref.finalize(t.untyped_storage(), self._free, key, nbytes)

    def _track_virtual(self, anchor: torch.Tensor, nbytes: int, label: str) -> None:
        """Bytes that exist on CUDA but not here, alive as long as ``anchor``'s storage."""
        self._virtual += 1
        key = ("virtual", self._virtual)
        self.live[key] = (nbytes, label, (nbytes // 4,), torch.float32)
        self.current += nbytes
        weakref.finalize(anchor.untyped_storage(), self._free, key, nbytes)

    # -- hooks ---------------------------------------------------------------------------------------

    def __enter__(self):
        self._preexisting: set = set()
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved_hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._saved_hooks.__exit__(*exc)
        return super().__exit__(*exc)

    def mark_preexisting(self, tensors) -> None:
        """Storages that exist before the step (inputs, parameters, optimizer state): never counted."""
        for t in tensors:
            self._preexisting.add(_storage_key(t))

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        nbytes = t.untyped_storage().nbytes()
        if key in self._preexisting:
            self.free_saved[key] = nbytes
        elif key not in self.saved:
            info = self.live.get(key)
            op = info[1] if info is not None else self.last_op
            self.saved[key] = (nbytes, op, tuple(t.shape), t.dtype, self.phase_name)
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        if func.namespace == "ssm2d":
            op = f"ssm2d.{op}"
        self.last_op = op
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, op)
        extra = 0
        if self.add_cuda_scan_buffers and func.namespace == "ssm2d" and not args[0].is_cuda:
            extra = self._cuda_scan_extra(op, args, out)
        self._bump(extra)
        return out

    def _cuda_scan_extra(self, op: str, args, out) -> int:
        """The CUDA scan2d kernel's carries (forward, saved) and workspace (backward, transient; the
        forward's smaller transient workspace is not counted)."""
        from ssm2d_kernels.scan2d import scan2d_backward_workspace_floats, scan2d_carry_floats

        if op == "ssm2d.scan2d_fwd":
            u, A, order = args[0], args[2], args[10]
            b, d, h, w = u.shape
            anchor = out[1] if out[1].numel() else out[0]
            self._track_virtual(anchor, 4 * scan2d_carry_floats(b, d, A.shape[1], h, w, order),
                                "ssm2d.scan2d_fwd (CUDA carries)")
            return 0
        if op == "ssm2d.scan2d_bwd":
            u, A, order = args[1], args[3], args[13]
            b, d, h, w = u.shape
            return 4 * scan2d_backward_workspace_floats(b, d, A.shape[1], h, w, order)
        return 0

    # -- summaries -----------------------------------------------------------------------------------

    def saved_by_op(self, phase: str = "forward") -> list[tuple[str, int, int]]:
        """[(op, bytes, count)] of new tensors saved during ``phase``, largest first."""
        acc: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for nbytes, op, shape, dtype, ph in self.saved.values():
            if ph == phase:
                a = acc[f"{op} {_dtype_name(dtype)} {_shape_str(shape)}"]
                a[0] += nbytes
                a[1] += 1
        return sorted(((k, v[0], v[1]) for k, v in acc.items()), key=lambda r: -r[1])

    def saved_bytes(self, phase: str = "forward") -> int:
        return sum(v[0] for v in self.saved.values() if v[4] == phase)


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _shape_str(shape: tuple) -> str:
    return "x".join(str(s) for s in shape) if shape else "-"


def count_step(step: Callable[[MemoryCounter], None], preexisting, add_cuda_scan_buffers: bool = True) -> MemoryCounter:
    """Runs ``step(counter)`` under a MemoryCounter; ``step`` calls counter.phase(...) between phases."""
    counter = MemoryCounter(add_cuda_scan_buffers)
    with counter:
        counter.mark_preexisting(preexisting)
        step(counter)
    return counter


def training_step(model, opt, bag, label, device: str, amp: bool) -> Callable[[MemoryCounter], None]:
    """The step of bench_mil.py, split into phases for the counter."""
    def step(counter: MemoryCounter) -> None:
        counter.phase("forward")
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            out = model(bag)
        loss = F.cross_entropy(out.logits.float(), label)
        counter.phase("forward_end")
        counter._bump()
        counter.phase("backward")
        loss.backward()
        counter.phase("optimizer")
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def breakdown(counter: MemoryCounter, top: int = 10) -> str:
    """A Markdown report: peaks per phase, saved bytes by op, the largest tensors alive at the peak."""
    lines = []
    fwd_saved = counter.saved_bytes("forward")
    lines.append(f"saved for the backward (new tensors, by storage): {fwd_saved / MiB:.1f} MiB; "
                 f"references to inputs/parameters (free): {sum(counter.free_saved.values()) / MiB:.1f} MiB")
    lines.append("peak live bytes beyond the step's start, per phase: " + ", ".join(
        f"{k} {v / MiB:.1f} MiB" for k, v in counter.peaks.items() if k != "forward_end"))
    lines.append(f"live at the end of the forward: {counter.peaks.get('forward_end', 0) / MiB:.1f} MiB; "
                 f"overall peak: {counter.peak / MiB:.1f} MiB\n")
    lines.append("| saved by (op, dtype, shape) | MiB | count |")
    lines.append("|---|---|---|")
    for name, nbytes, count in counter.saved_by_op()[:top]:
        lines.append(f"| {name} | {nbytes / MiB:.1f} | {count} |")
    lines.append("\n| alive at the peak (op, dtype, shape) | MiB |")
    lines.append("|---|---|")
    for nbytes, op, shape, dtype in counter.peak_snapshot[:top]:
        lines.append(f"| {op} {_dtype_name(dtype)} {_shape_str(shape)} | {nbytes / MiB:.1f} |")
    rest = sum(v[0] for v in counter.peak_snapshot[top:])
    lines.append(f"| (the other {max(0, len(counter.peak_snapshot) - top)}) | {rest / MiB:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from bench_mil import make_bag, model_kwargs  # noqa: E402 (benchmarks/ on sys.path)
    from ssm2d_path.models import build_model, param_groups

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="2dmambamil")
    ap.add_argument("--patches", type=int, default=150000)
    ap.add_argument("--fill", type=float, default=0.6)
    ap.add_argument("--in-dim", type=int, default=1024)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--backend", default="kernel", help="scan backend (kernel: the CPU kernel, fast)")
    ap.add_argument("--chunk-channels", type=int, default=None, help="override the SSM layer's channel chunk")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)
    if args.patches < 1:
        ap.error(f"--patches must be >= 1, got {args.patches}")

    bag = make_bag(args.patches, args.fill, args.in_dim, 0, "cpu")
    h, w = bag.slides[0].shape
    print(f"{args.patches} patches on a {h} x {w} grid ({args.patches / (h * w):.2f} fill), "
          f"features {bag.features.numel() * 4 / MiB:.0f} MiB float32, {args.precision}\n")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, args.in_dim, 2, **model_kwargs(name, args.backend))
        if args.chunk_channels is not None:
            for layer in getattr(model, "layers", []):
                layer.chunk_channels = args.chunk_channels
        model.train()
        opt = torch.optim.AdamW(param_groups(model, 1e-5), lr=1e-4)
        label = torch.tensor([1])
        step = training_step(model, opt, bag, label, "cpu", args.precision == "bf16")
        step(MemoryCounter())  # creates the AdamW state, which then counts as pre-existing
        pre = [bag.features, label, *model.parameters(), *model.buffers()]
        pre += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        counter = count_step(step, pre)
        print(f"## {name}\n")
        print(breakdown(counter, args.top) + "\n")


if __name__ == "__main__":
    main()
