"""The ssm2d-path command line."""

from __future__ import annotations

import pytest

from ssm2d_path import __version__, cli


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"ssm2d-path {__version__}"


def test_info_selftest_reports_versions_and_backends(capsys):
    assert cli.main(["info", "--selftest"]) == 0
    out = capsys.readouterr().out
    assert f"ssm2d-path" in out and __version__ in out
    assert "CPU self-test" in out and "passed" in out
    assert "backend on cpu" in out and "lifelines" in out and "h5py" in out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
