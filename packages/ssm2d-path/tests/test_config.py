"""Config schema: defaults, overrides, and rejection messages that name the key."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from ssm2d_path.config import ConfigError, apply_overrides, check_model_kwargs, load_config, parse_config
from ssm2d_path.manifest import file_record, write_manifest


class _Model(nn.Module):
    def __init__(self, in_dim, n_outputs, dim=8, dropout=0.25, *, layers=1):
        super().__init__()


def test_defaults_overrides_and_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  task: survival\n  label_csv: l.csv\ntrain:\n  lr: 1\n  epochs: 3\n"
                 "model:\n  name: abmil\noutput: {dir: out}\n")
    cfg = load_config(p, ["train.epochs=5", "train.lr=2e-4", "data.level=patient"], check_model=False)
    assert cfg.train.epochs == 5 and cfg.train.lr == pytest.approx(2e-4) and cfg.data.level == "patient"
    assert cfg.train.weight_decay == pytest.approx(1e-2) and cfg.data.n_bins == 4  # the default recipe's
    assert cfg.resolved_selection() == "val_loss" and cfg.model.name == "abmil"
    assert load_config(p, ["train.recipe=paper"], check_model=False).resolved_selection() == "val_cindex"
    assert isinstance(parse_config({"train": {"lr": 1}}, check_model=False).train.lr, float)
    again = parse_config(cfg.to_dict(), check_model=False)
    assert again == cfg


@pytest.mark.parametrize("raw, msg", [
    ({"train": {"epoch": 3}}, r"train\.epoch: unknown key; allowed keys of train: epochs, lr"),
    ({"trian": {}}, r"trian: unknown section; allowed sections: data, model, train, output"),
    ({"train": {"lr": "fast"}}, r"train\.lr: expected a number, got str 'fast'"),
    ({"train": {"epochs": 2.5}}, r"train\.epochs: expected an integer"),
    ({"train": {"progress": "yes"}}, r"train\.progress: expected true or false"),
    ({"data": {"task": "regression"}}, r"data\.task: expected one of 'classification' \| 'survival'"),
    ({"data": {"k": 1}}, r"data\.k: must be >= 2"),
    ({"train": {"selection": "val_auc"}, "data": {"task": "survival"}}, r"train\.selection: val_auc is for classification"),
    ({"train": {"device": "tpu"}}, r"train\.device"),
    ({"data": {"label_map": [1]}}, r"data\.label_map: expected"),
])
def test_rejections_name_the_key(raw, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(raw, check_model=False)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["epochs5"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["epochs=5"])
    assert apply_overrides({"train": {"epochs": 1}}, ["train.epochs=7"]) == {"train": {"epochs": 7}}


def test_model_kwargs_checked_against_the_constructor():
    check_model_kwargs("x", {"dim": 4, "layers": 2}, cls=_Model)
    with pytest.raises(ConfigError, match=r"model\.width: unknown argument of _Model; allowed keys of model: "
                                          r"name, dim, dropout, layers"):
        check_model_kwargs("x", {"width": 4}, cls=_Model)
    with pytest.raises(ConfigError, match=r"model\.in_dim: set by the run"):
        check_model_kwargs("x", {"in_dim": 4}, cls=_Model)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_manifest_contents(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,slide_id,label\na,a1,0\n")
    big = tmp_path / "big.h5"
    big.write_bytes(b"\0" * 5000)
    cfg = parse_config({"train": {"seed": 7}}, check_model=False)
    path = write_manifest(tmp_path / "run", config=cfg.to_dict(), device="cpu", seeds={"train": 7},
                          scan_backend="kernel", label_files=[labels], feature_files=[big, tmp_path / "gone.h5"],
                          start="s", hash_limit=1000)
    import json

    m = json.loads(path.read_text())
    assert m["config"]["train"]["seed"] == 7 and m["seeds"] == {"train": 7} and m["scan_backend"] == "kernel"
    assert m["packages"]["torch"] == torch.__version__.split("+")[0] or m["packages"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert set(m["packages"]) >= {"ssm2d-nn", "ssm2d-path", "numpy", "h5py", "lifelines"}
    assert m["python"].count(".") == 2 and m["platform"] and m["device"]["device"] == "cpu"
    assert m["inputs"]["labels"][0]["sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    f = m["inputs"]["features"]
    assert f[0]["size"] == 5000 and "mtime" in f[0] and "sha256" not in f[0]
    assert f[1]["missing"] is True
    assert m["start"] == "s" and m["end"]
    assert file_record(labels)["sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()


def test_real_model_kwargs_follow_kwargs_to_the_base_class():
    cfg = parse_config({"model": {"name": "2dmambamil", "dim": 16, "d_state": 4, "backend": "reference"},
                        "train": {"recipe": "paper"}})
    assert cfg.model.kwargs == {"dim": 16, "d_state": 4, "backend": "reference"}
    with pytest.raises(ConfigError, match=r"model\.dimm: unknown argument of TwoDMambaMIL; allowed keys of model: "
                                          r"name, dim, d_inner, d_state"):
        parse_config({"model": {"name": "2dmambamil", "dimm": 16}})
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'resnet'"):
        parse_config({"model": {"name": "resnet"}})
