"""scan2d's and wavefront2d's CUDA kernels run on the CPU under tools/cuda_emu, against the CPU kernels
(the depthwise convolution's against a float64 loop over its definition).

Not a GPU test: this checks what the CUDA sources compute (indexing, barriers, shuffles, the
dispatch between kernel families) on machines without a GPU, every CUDA thread an OS thread. The
CPU kernel it compares with is checked against float64 references elsewhere in the suite. Fresh
random problems (sizes, origins, orders, z / D / delta_bias / softplus) every run; the seed is in
the failure message.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("g++") is None, reason="tools/cuda_emu builds with g++")]


@pytest.mark.parametrize("driver,dtype,cases,extra", [
    ("scan2d", "f32", 6, []), ("scan2d", "bf16", 4, []), ("wavefront2d", "f32", 6, []), ("dwconv2d", "bf16", 6, []),
    # the MIL layer's empty cells: delta = -inf (softplus 0) must stay finite and agree
    ("scan2d", "f32", 3, ["--masked"])])
def test_cuda_sources_match_the_cpu_kernels_under_emulation(driver, dtype, cases, extra):
    seed = random.randrange(1 << 30)
    cmd = [sys.executable, str(ROOT / "tools" / "cuda_emu" / "emu.py"), driver, "--no-asan", "--",
           "--cases", str(cases), "--bwd", "--dtype", dtype, "--seed", str(seed), *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"seed {seed}: {' '.join(cmd)}\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert f"0 of {cases} cases failed" in r.stdout
