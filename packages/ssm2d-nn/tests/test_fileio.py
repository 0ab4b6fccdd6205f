"""atomic_output: the destination is replaced only by a complete file; a failed write leaves it as it was."""

from __future__ import annotations

import pytest

from ssm2d_nn.fileio import atomic_output


def test_complete_write_replaces_and_failed_write_keeps_the_old_file(tmp_path):
    dst = tmp_path / "sub" / "out.txt"
    with atomic_output(dst) as tmp:
        assert tmp.parent == dst.parent and tmp != dst
        tmp.write_text("first")
    assert dst.read_text() == "first"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_output(dst) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert dst.read_text() == "first"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out.txt"]  # no temporary left behind
