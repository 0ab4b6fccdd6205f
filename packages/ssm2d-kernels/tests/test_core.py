"""ssm2d_kernels on its own: build facts, the CPU thread pool, error behaviour. No torch needed."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest

import ssm2d_kernels as k


def test_build_info_is_self_consistent():
    info = k.build_info()
    assert info["version"] == k.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_architectures"], "a CUDA build must list its architectures"
        assert all(re.fullmatch(r"(sm|compute)_\d+[a-z]?", a) for a in info["cuda_architectures"])
        assert re.fullmatch(r"\d+\.\d+", info["cuda_runtime_version"])
    else:
        assert info["cuda_architectures"] == [] and info["cuda_runtime_version"] is None


@pytest.mark.parametrize(
    "cmake,expected",
    [
        ("90", ["sm_90", "compute_90"]),
        ("80-real;86-real;120-virtual", ["sm_80", "sm_86", "compute_120"]),
        ("", []),
    ],
)
def test_architecture_names(cmake, expected):
    assert k._architectures(cmake) == expected


def test_cuda_version_encoding():
    assert k._version_string(13000) == "13.0"
    assert k._version_string(12080) == "12.8"
    assert k._version_string(0) is None


def test_device_count_is_a_non_negative_int_and_never_raises():
    n = k.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    if not os.path.exists("/dev/nvidia0") and not os.path.exists("/dev/nvidiactl"):
        assert n == 0


def test_device_index_out_of_range_is_a_clear_error():
    n = k.cuda_device_count()
    if k.build_info()["cuda"]:
        with pytest.raises(ValueError, match=rf"device must be in \[0, {n}\), got {n + 3}"):
            k.cuda_device_properties(n + 3)
        with pytest.raises(ValueError, match="device must be in"):
            k.cuda_selftest(-1)
    else:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            k.cuda_device_properties(0)


@pytest.mark.parametrize("elements", [1, 7, 1000, 3_000_001])
def test_cpu_selftest_matches_closed_form(elements):
    r = k.cpu_selftest(elements)
    assert r["ok"] and r["elements"] == elements
    assert 1 <= r["threads"] <= k.get_num_threads()


def test_cpu_selftest_rejects_bad_sizes():
    with pytest.raises(ValueError, match="elements must be in"):
        k.cpu_selftest(0)


def test_set_num_threads_round_trip():
    default = k.get_num_threads()
    try:
        k.set_num_threads(3)
        assert k.get_num_threads() == 3
        assert k.cpu_selftest(1 << 20)["threads"] == 3
    finally:
        k.set_num_threads(0)
    assert k.get_num_threads() == default


def test_env_var_sets_threads():
    code = "import ssm2d_kernels as k; print(k.get_num_threads(), k.cpu_selftest(1 << 20)['threads'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "SSM2D_NUM_THREADS": "5"}).stdout.split()
    assert out == ["5", "5"]


def test_scan2d_kernel_family_rule():
    # The documented choice: lanes kernels for 8 <= N <= 16 with one group or groups of a multiple of 8
    # channels; the pre-gate output is saved only for the tiled kernels (N >= 8 otherwise).
    from ssm2d_kernels import _C

    for dim, groups in [(256, 1), (16, 2), (24, 3), (12, 3), (40, 5), (8, 8), (64, 4)]:
        for n in (1, 7, 8, 12, 16, 17, 64):
            lanes = 8 <= n <= 16 and (groups == 1 or (dim // groups) % 8 == 0)
            assert _C.scan2d_lanes_fit(dim, groups, n) == lanes, (dim, groups, n)
            assert _C.scan2d_backward_needs_y(dim, groups, n) == (n >= 8 and not lanes), (dim, groups, n)


def test_scan2d_chan_rule_and_carry_size():
    # Chan kernels: N == 1, both scanned sides of at most 64 cells, H >= 2, channels per group a
    # multiple of 32 (or one group), and at least 264 warps, a warp holding 32, 16, 8 or 4 channels
    # for a short side of at most 8, 16, 32 or 64 cells (counted for the walk with more channels per warp).
    # Their carries (every 4th step of the walk along the long side) fit in the buffer the caller
    # sizes by shape; grids with both sides of at most 16 cells save none.
    from ssm2d_kernels import _C

    rng = random.Random()
    for _ in range(400):
        b, g = rng.choice([1, 2, 9, 64]), rng.choice([1, 2, 3, 4])
        dim = g * rng.choice([16, 32, 96, 384])
        n, h, w = rng.choice([1, 1, 2, 16]), rng.randint(1, 90), rng.randint(1, 90)

        def shape(steps, inner):
            return inner <= 64 and steps <= 64

        def per_warp(inner):
            return 32 if inner <= 8 else 16 if inner <= 16 else 8 if inner <= 32 else 4

        walks = [inner for steps, inner in ((h, w), (w, h)) if shape(steps, inner)]
        fit = (n == 1 and h >= 2 and bool(walks) and (g == 1 or (dim // g) % 32 == 0)
               and b * -(-dim // max(per_warp(x) for x in walks)) >= 264)
        assert _C.scan2d_chan_fit(b, dim, g, n, h, w) == fit, (b, dim, g, n, h, w)
        if n == 1 and h >= 2:
            def chan(steps, inner):  # none when both sides are at most 16 (whole-channel kernels)
                if max(steps, inner) <= 16:
                    return 0
                return b * dim * inner * (-(-steps // 4) - 1) if shape(steps, inner) else 0
            band = b * dim * (-(-h // 16) - 1) * w
            assert _C.scan2d_carry_floats(b, dim, 1, h, w) == max(band, chan(h, w), chan(w, h)), (b, dim, h, w)


@pytest.mark.skipif(not k.build_info()["cuda"], reason="the CUDA sizes need a CUDA build")
def test_wavefront2d_strip_backward_workspace_size():
    # N <= 16 with rows longer than 64 cells or fewer than 16 (batch, 16-channel) blocks: the backward
    # runs column strips (the widest of 64 / 32 columns that gives 264 blocks, else 16 if that gives 132,
    # else 8; the forward stops at 16). The backward's scratch, as documented, for one launch over
    # `items` (batch, 16-channel) items: its recompute pass's strip flags and h carries (which the
    # adjoint's lambda carries overwrite in place), the backward's flags, the per-strip parameter sums,
    # and per item and strip checkpoints every K rows plus one K-row segment of the strip's width
    # (float4-aligned), K = 8 up to 128 rows, else the power of two with 2 K^2 >= H. When all channels
    # need more than 256 MiB, the channels run in k chunks of ceil(blocks / k) blocks (the fewest that
    # fit, strips of at least 16 columns; one block each when none fits). The forward's: its strip
    # flags and carries.
    from ssm2d_kernels import _C

    def segment(h):
        k = 8
        while k < 256 and 2 * k * k < h:
            k *= 2
        return k

    def width(items, w, backward=True):
        for sw in (64, 32):
            if items * -(-w // sw) >= 264:
                return sw, -(-w // sw)
        if not backward or items * -(-w // 16) >= 132:
            return 16, -(-w // 16)
        return 8, -(-w // 8)

    def layout(items, wmax, strips, h):
        flags = 1 + items * strips
        carries = 0 if strips == 1 else flags + items * (strips - 1) * h * 256
        parts = carries + 1 + items * strips
        scratch = -(-(parts + items * strips * 3 * 256) // 4) * 4
        k = segment(h)
        return scratch + items * strips * (-(-h // k) + k) * wmax * 256

    rng = random.Random()
    checked = chunked = 0
    while checked < 300:
        b, g = rng.choice([1, 2, 5, 64]), rng.choice([1, 1, 2])
        e = g * rng.choice([16, 32, 48]) if g > 1 else rng.choice([8, 16, 40, 64, 128])
        n = rng.randint(1, 16)
        h, w = (rng.randint(1, 300), rng.randint(1, 3000)) if rng.random() < 0.7 else (rng.randint(500, 5000),) * 2
        blocks = -(-e // 16)
        items = b * blocks
        if w <= 64 and items >= 16:
            continue  # whole rows: the short-row backward
        checked += 1
        total = layout(items, *width(items, w), h)
        if total * 4 > 256 << 20:
            chunked += 1
            prev = blocks
            for k in range(2, blocks + 1):
                c = -(-blocks // k)
                if c == prev:
                    continue
                prev = c
                wmax, strips = width(b * c, w)
                if wmax == 8:
                    wmax, strips = 16, -(-w // 16)
                total = layout(b * c, wmax, strips, h)
                if total * 4 <= 256 << 20:
                    break
        fwd_w, fwd_strips = width(items, w, backward=False)
        fwd = 0 if fwd_strips == 1 else 1 + items * fwd_strips + items * (fwd_strips - 1) * h * 256
        got = _C.wavefront2d_workspace_floats(b, e, n, g, h, w, 1, True)
        assert got == total, (b, e, n, g, h, w, got, total)
        assert _C.wavefront2d_workspace_floats(b, e, n, g, h, w, 1, False) == fwd, (b, e, n, g, h, w)
    assert chunked > 0


@pytest.mark.skipif(not k.build_info()["cuda"], reason="the CUDA sizes need a CUDA build")
def test_wavefront2d_1024_backward_workspace_fits_the_memory_target():
    # Issue 15's case: B = 1, E = 64, N = 16, 1024 x 1024, bf16. Beyond the inputs the backward holds
    # out (128 MiB), du, ddT, ddL (384 MiB, bf16), dBT, dBL, dC (float32 accumulators, 192 MiB) and the
    # workspace: that sum must stay under 1 GiB (the bf16 casts of dB come after the workspace is freed).
    from ssm2d_kernels import _C

    mib = 1 << 20
    ws = _C.wavefront2d_workspace_floats(1, 64, 16, 1, 1024, 1024, 1, True) * 4
    held = 3 * 2 * 1024 * 1024 * 64 + 2 * 1024 * 1024 * 64 + 3 * 4 * 1024 * 1024 * 16
    assert held + ws <= 1024 * mib, (held / mib, ws / mib)


def test_wavefront2d_cuda_grid_rule():
    # CUDA scans a grid whose rows are longer than 2048 cells (and columns not) transposed; with both
    # sides longer, only the lane-per-state kernels (N <= 16, each 16-channel block in one group) take
    # it, as it is; anything else is refused with a message naming the sizes.
    from ssm2d_kernels.wavefront2d import cuda_refusal, scanned_hw

    rng = random.Random()
    for _ in range(300):
        h, w = rng.choice([1, 2048, 2049, 5000]) + rng.randint(0, 3), rng.choice([1, 2048, 2049, 5000]) + rng.randint(0, 3)
        g = rng.choice([1, 2, 3])
        e, n = g * rng.choice([8, 16, 32, 40]), rng.randint(1, 20)
        lanes = n <= 16 and (g == 1 or (e // g) % 16 == 0)
        refused = h > 2048 and w > 2048 and not lanes
        why = cuda_refusal(h, w, e, n, g)
        assert (why is not None) == refused, (h, w, e, n, g, why)
        if refused:
            assert f"{h} x {w}" in why and f"N={n}" in why
        assert scanned_hw(h, w, 0) == ((w, h) if w > 2048 >= h else (h, w))
        assert scanned_hw(h, w, -1) == (h, w)
