#!/usr/bin/env python3
"""Runs the project's CUDA kernels on the CPU: rewrites the sources for cuda_emu.h, builds a driver, runs it.

    python3 tools/cuda_emu/emu.py scan2d [--tsan] [--no-asan] [-- DRIVER ARGS]

Each driver (tools/cuda_emu/drivers/NAME.cc) runs the CUDA implementation of an op, every CUDA thread
an OS thread (include/cuda_emu.h), on random problems and compares it with the CPU implementation of
the same op (csrc/cpu), which the test suite checks against float64 references. Built with
AddressSanitizer by default (an out-of-bounds access stops the run at its line); --tsan builds with
ThreadSanitizer instead (shared-memory races between barriers). The rewritten sources and the binary
go to build/cuda_emu/.

What the rewrite does (the sources stay as they are): `X<<<grid, block, smem, stream>>>(args)` becomes
a call of cuda_emu::launch; `__shared__` arrays become per-block allocations; the few inline PTX
statements become the C++ they stand for (a table below; an unknown one stops the build).

This is a correctness tool for machines without a GPU, not a GPU test: a kernel that passes here
must still pass the GPU suite, and no timing here says anything about a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "packages" / "ssm2d-kernels" / "csrc"
HERE = Path(__file__).resolve().parent
OUT = ROOT / "build" / "cuda_emu"

# Inline PTX the kernels use -> C++ ({0}, {1}: the operands in PTX order, outputs first).
PTX = [
    ("ex2.approx", "{0} = exp2f({1});"),
    ("lg2.approx", "{0} = log2f({1});"),
    ("rcp.approx", "{0} = 1.0f / ({1});"),
    ("ld.acquire.gpu.global.u32", "{0} = ::cuda_emu::ld_acquire(reinterpret_cast<const void*>({1}));"),
    ("st.release.gpu.global.u32", "::cuda_emu::st_release(reinterpret_cast<void*>({0}), {1});"),
    ("prefetch.", "(void)0;"),
    ("ld.global.nc.f32", "{0} = *reinterpret_cast<const float*>({1});"),
    ("ld.global.nc.b16", "{0} = *reinterpret_cast<const unsigned short*>({1});"),
    ("add.s64", "{0} = ::cuda_emu::add_bytes({0}, {1});"),  # "+l"(ptr) : "l"(bytes): operands ptr, bytes
]


# The kernel and CPU sources each driver needs (globs in csrc/cuda and csrc/cpu).
DRIVERS = {
    "scan2d": (["scan2d*.cu"], ["scan2d_cpu.cpp", "parallel.cpp"]),
    "wavefront2d": (["wavefront2d.cu"], ["wavefront2d_cpu.cpp", "parallel.cpp"]),
    "dwconv2d": (["dwconv2d.cu"], []),
}
# Drivers whose kernels' blocks wait on each other: every block of a launch runs at once.
CONCURRENT = {"wavefront2d"}


def _balanced(text: str, i: int, open_c: str, close_c: str) -> int:
    """Index just past the bracket closing the one at text[i]."""
    depth = 0
    for k in range(i, len(text)):
        if text[k] == open_c:
            depth += 1
        elif text[k] == close_c:
            depth -= 1
            if depth == 0:
                return k + 1
    raise ValueError(f"unbalanced {open_c}{close_c} at offset {i}")


def _split_top(s: str, sep: str = ",") -> list[str]:
    """s split at ``sep`` outside (), [] and {} (empty pieces kept only for ":")."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip() or sep == ":":
        parts.append("".join(cur).strip())
    return parts if sep == ":" else [q for q in parts if q]


def _callee_start(text: str, end: int) -> int:
    """Start of the callee ending at text[end - 1]: a name (identifiers and ::), then optionally one
    template-argument list (``kernel`` or ``scan2d_fwd_row_kernel<T, CPL>``)."""
    i = len(text[:end].rstrip())
    if i > 0 and text[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(text: str) -> str:
    out, pos = [], 0
    while True:
        i = text.find("<<<", pos)
        if i < 0:
            out.append(text[pos:])
            return "".join(out)
        start = _callee_start(text, i)
        j = text.index(">>>", i)
        cfg = _split_top(text[i + 3:j])
        k = j + 3
        while text[k].isspace():
            k += 1
        if text[k] != "(":
            raise ValueError(f"launch without arguments near: {text[start:k + 20]!r}")
        e = _balanced(text, k, "(", ")")
        args = text[k + 1:e - 1].strip()
        cfg += ["0"] * (4 - len(cfg))
        callee = text[start:i].strip()
        call = (f"::cuda_emu::launch(::cuda_emu::Site{{__FILE__, __LINE__, {callee!r}}}, dim3({cfg[0]}), dim3({cfg[1]}), "
                f"static_cast<size_t>({cfg[2]}), {callee}{', ' + args if args else ''})").replace("'", '"')
        out.append(text[pos:start])
        out.append(call)
        pos = e


_SHARED_EXTERN = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<>, ]+?)\s+(\w+)\s*((?:\[[^\]]+\]\s*)*);")


def rewrite_shared(text: str, file_id: int) -> str:
    text = _SHARED_EXTERN.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ::cuda_emu::dynamic_shared<{m.group(1)}>();", text)
    counter = iter(range(1, 1 << 20))

    def static(m):
        site = file_id * 100000 + next(counter)
        dims = "".join(m.group(3).split())
        return f"auto& {m.group(2)} = ::cuda_emu::shared_static<{m.group(1)}{dims}>({site});"

    return _SHARED.sub(static, text)


def rewrite_asm(text: str) -> str:
    out, pos = [], 0
    pat = re.compile(r"\basm\s*(?:volatile\s*)?\(")
    while True:
        m = pat.search(text, pos)
        if not m:
            out.append(text[pos:])
            return "".join(out)
        e = _balanced(text, m.end() - 1, "(", ")")
        body = text[m.end():e - 1]
        semi = text.index(";", e)
        instr = re.match(r'\s*"([^"]*)"', body).group(1)
        rest = body[body.index('"', body.index('"') + 1) + 1:]
        operands = []
        for section in _split_top(rest, ":")[1:3]:
            for op in _split_top(section):
                c = op.index("(")
                operands.append(op[c:].strip())
        for prefix, cpp in PTX:
            if instr.startswith(prefix):
                out.append(text[pos:m.start()])
                out.append(cpp.format(*operands))
                pos = semi + 1
                break
        else:
            raise ValueError(f"inline PTX with no emulation: {instr!r} (add it to PTX in {__file__})")


def rewrite(src: Path, dst: Path, file_id: int) -> None:
    text = src.read_text()
    text = rewrite_asm(text)
    text = rewrite_shared(text, file_id)
    text = rewrite_launches(text)
    text = f'#line 1 "{src}"\n' + text
    if not dst.exists() or dst.read_text() != text:
        dst.write_text(text)


def build(driver: str, sanitizer: str) -> Path:
    if driver not in DRIVERS:
        sys.exit(f"cuda_emu: no driver {driver!r} (known: {', '.join(DRIVERS)})")
    cuda_globs, cpu_names = DRIVERS[driver]
    wanted = {p.name for g in cuda_globs for p in (KERNELS / "cuda").glob(g)}
    src_dir = OUT / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    units = []
    for i, p in enumerate(sorted((KERNELS / "cuda").iterdir())):
        if p.suffix not in (".cu", ".cuh", ".h"):
            continue
        dst = src_dir / (p.stem + ".cc" if p.suffix == ".cu" else p.name)
        rewrite(p, dst, i + 1)  # (a file only when its text changed, which keeps unchanged units built)
        if p.name in wanted:
            units.append(dst)
    units += [KERNELS / "cpu" / n for n in cpu_names]
    units.append(HERE / "drivers" / f"{driver}.cc")
    exe = OUT / f"{driver}{'-' + sanitizer if sanitizer else ''}"
    flags = ["-std=c++20", "-O1", "-g", "-pthread", "-Wno-unknown-pragmas", "-DSSM2D_CUDA_EMU=1",
             f"-I{HERE / 'include'}", f"-I{src_dir}", f"-I{KERNELS / 'include'}", f"-I{KERNELS / 'cpu'}"]
    if sanitizer:
        flags.append(f"-fsanitize={sanitizer}")
    # Headers every unit sees: a change in any of them rebuilds everything (a unit's own text and the
    # flags are in its key too); unchanged units are not recompiled.
    common = "".join(p.read_text() for d in (HERE / "include", HERE / "drivers", src_dir, KERNELS / "include" / "ssm2d")
                     for p in sorted(d.iterdir()) if p.suffix in (".h", ".cuh"))
    objs = []
    jobs = []
    for u in units:
        kind = "driver_" if u.parent.name == "drivers" else ""
        o = OUT / "obj" / (sanitizer or "plain") / (kind + u.stem + ".o")
        o.parent.mkdir(parents=True, exist_ok=True)
        objs.append(o)
        key = hashlib.sha256((common + u.read_text() + " ".join(flags)).encode()).hexdigest()
        stamp = o.with_suffix(".key")
        if o.exists() and stamp.exists() and stamp.read_text() == key:
            continue
        jobs.append((["g++", *flags, "-c", str(u), "-o", str(o)], stamp, key))
    procs: list = []

    def finish(entry) -> None:
        proc, stamp, key = entry
        if proc.wait() != 0:
            sys.exit("cuda_emu: compilation failed")
        stamp.write_text(key)

    for cmd, stamp, key in jobs:  # two at a time: this runs on small machines
        procs.append((subprocess.Popen(cmd), stamp, key))
        if len(procs) >= int(os.environ.get("CUDA_EMU_JOBS", "2")):
            finish(procs.pop(0))
    for entry in procs:
        finish(entry)
    subprocess.run(["g++", *flags, *map(str, objs), "-o", str(exe)], check=True)
    return exe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("driver", help="a driver in tools/cuda_emu/drivers (without .cc)")
    ap.add_argument("--tsan", action="store_true", help="ThreadSanitizer instead of AddressSanitizer")
    ap.add_argument("--no-asan", action="store_true", help="no sanitizer (faster)")
    ap.add_argument("--build-only", action="store_true")
    ap.epilog = "Arguments after -- go to the driver."
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    a.args = rest
    sanitizer = "thread" if a.tsan else None if a.no_asan else "address"
    exe = build(a.driver, sanitizer)
    if a.build_only:
        print(exe)
        return 0
    env = dict(os.environ)
    if a.driver in CONCURRENT:
        env.setdefault("CUDA_EMU_BLOCKS", "4096")
    return subprocess.run([str(exe), *a.args], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
