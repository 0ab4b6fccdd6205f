"""Bad inputs outside the pathology workflow are refused with a clear message: the VMamba converter on
corrupt, empty or malicious files and onto an existing destination; double backward through the kernel
backend; and what the shared atomic writer leaves on disk (the umask's permissions)."""

from __future__ import annotations

import os

import pytest
import torch

from ssm2d_nn.ops.scan2d import scan2d
from ssm2d_nn.ops.wavefront2d import wavefront2d


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def convert(capsys):
    from ssm2d_vision.convert.cli import main

    def run(*args):
        code = main(["--model", "vmamba_tiny", *map(str, args)])
        return code, capsys.readouterr()

    return run


def _one_clear_line(err: str) -> str:
    assert err.startswith("ssm2d-vision-convert: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err and "weights_only" not in err and "Re-running" not in err, err
    return err


def test_converter_refuses_corrupt_empty_and_malicious_files(tmp_path, convert):
    dst = tmp_path / "out.pth"
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": {"patch_embed.0.weight": torch.zeros(8, 3, 3, 3)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint\n" * 20)
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Evil(marker)}, evil)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_dict)
    cases = [(empty, "is empty (0 bytes)"), (truncated, "not a complete torch.save file"),
             (text, "is not a torch.save file"), (evil, "holds a Python object (posix.system"),
             (not_a_dict, "checkpoint must be a dict")]
    for src, why in cases:
        code, out = convert(src, dst)
        err = _one_clear_line(out.err)
        assert code == 1 and str(src) in err and why in err, err
        assert not dst.exists()
    assert not marker.exists()  # the pickled call never ran


def test_converter_does_not_overwrite_its_destination_unless_asked(tmp_path, convert):
    import timm

    import ssm2d_vision  # noqa: F401  (registers the models)
    from ssm2d_vision.convert.vmamba import ours_to_released

    released, unknown = ours_to_released(timm.create_model("vmamba_tiny").state_dict(), "vmamba_tiny")
    assert not unknown
    src, dst = tmp_path / "src.pth", tmp_path / "ours.pth"
    torch.save({"model": released}, src)
    dst.write_bytes(b"precious")
    code, out = convert(src, dst)
    err = _one_clear_line(out.err)
    assert code == 1 and "exists; pass --overwrite" in err and dst.read_bytes() == b"precious"
    code, out = convert(src, src)
    assert code == 1 and "is SRC" in _one_clear_line(out.err)
    code, out = convert("--overwrite", src, dst)
    assert code == 0 and "wrote" in out.out
    assert "stem.conv1.weight" in torch.load(dst, weights_only=True)


def _scan2d_inputs(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    b, d, n, h, w = 1, 2, 4, 3, 3
    u = torch.randn(b, d, h, w, generator=g, requires_grad=requires_grad)
    return (u, torch.randn(b, d, h, w, generator=g), -torch.rand(d, n, generator=g),
            torch.randn(b, 1, n, h, w, generator=g), torch.randn(b, 1, n, h, w, generator=g))


def _wavefront_inputs():
    g = torch.Generator().manual_seed(0)
    b, h, w, e, n = 1, 3, 3, 2, 4
    u = torch.randn(b, h, w, e, generator=g, requires_grad=True)
    pos = lambda: torch.rand(b, h, w, e, generator=g) + 0.1  # noqa: E731
    return (u, pos(), pos(), -torch.rand(e, n, generator=g), -torch.rand(e, n, generator=g),
            torch.randn(b, h, w, n, generator=g), torch.randn(b, h, w, n, generator=g),
            torch.randn(b, h, w, n, generator=g))


@pytest.mark.parametrize("op, inputs, name", [(scan2d, _scan2d_inputs, "scan2d"),
                                              (wavefront2d, _wavefront_inputs, "wavefront2d")])
def test_double_backward_through_the_kernel_is_refused_clearly(op, inputs, name):
    args = inputs()
    y = op(*args, backend="kernel")
    (first,) = torch.autograd.grad(y.square().sum(), args[0])  # first order works
    ref_y = op(*args, backend="reference")
    (ref,) = torch.autograd.grad(ref_y.square().sum(), args[0])
    torch.testing.assert_close(first, ref, rtol=1e-4, atol=1e-5)
    y = op(*args, backend="kernel")
    with pytest.raises(RuntimeError, match=f"{name}: double backward .* is not supported by the kernel backend; "
                                           f"use backend='reference'"):
        (g,) = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)
        g.sum().backward()


def test_atomic_output_gives_the_umask_permissions(tmp_path):
    from ssm2d_nn.fileio import atomic_output

    old = os.umask(0o027)
    try:
        with atomic_output(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"x")
        assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        with atomic_output(tmp_path / "y.pt") as tmp:
            torch.save({"a": torch.zeros(1)}, tmp)
        assert (tmp_path / "y.pt").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)
