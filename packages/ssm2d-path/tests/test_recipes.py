"""Training recipes (defaults by name, recorded in the run config), early stopping, augmentation in training."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TinyMIL, make_examples  # noqa: E402

from ssm2d_path.config import ConfigError, TrainConfig, parse_config
from ssm2d_path.recipes import DEFAULT_RECIPE, RECIPES
from ssm2d_path.runstate import run_config
from ssm2d_path.tasks import ClassificationTask
from ssm2d_path.train import Trainer


def test_train_config_defaults_are_the_default_recipe():
    defaults = TrainConfig()
    assert defaults.recipe == DEFAULT_RECIPE
    for key, value in RECIPES[DEFAULT_RECIPE].train.items():
        assert getattr(defaults, key) == value, key


def test_recipe_fills_only_the_keys_not_given_and_is_recorded():
    paper = parse_config({"train": {"recipe": "paper", "epochs": 7}, "model": {"name": "2dmambamil"}})
    assert paper.train.epochs == 7  # given: wins
    assert paper.train.lr == pytest.approx(1e-4) and paper.train.weight_decay == pytest.approx(1e-5)
    assert paper.train.selection == "auto" and paper.resolved_selection() == "val_auc"
    assert not paper.train.dihedral and paper.train.feature_noise == 0 and paper.train.patience is None
    assert paper.to_dict()["train"]["recipe"] == "paper"
    default = parse_config({"model": {"name": "abmil"}})
    assert default.train.recipe == "default" and default.resolved_selection() == "val_loss"
    assert default.train.dihedral and default.train.patience == 15
    # the run config (what results.json, checkpoints and manifests record) names the recipe
    assert run_config(default, feature_dim=4)["train"]["recipe"] == "default"
    assert run_config(paper, feature_dim=4)["train"]["recipe"] == "paper"
    assert parse_config(default.to_dict()) == default


@pytest.mark.parametrize("name", ["2dmambamil", "m2dmil", "mambamil"])
def test_default_recipe_gives_the_ssm_models_the_local_pairs_readout_as_one_set(name):
    from ssm2d_path.recipes import LOCAL_PAIRS

    cfg = parse_config({"model": {"name": name, "dim": 16}})
    assert cfg.model.kwargs == {"dim": 16, **LOCAL_PAIRS}
    assert run_config(cfg, feature_dim=8)["model"]["input_cooc"] == "min"  # recorded
    # a config that gives any key of the set chooses its own model: none of the others is added
    own = parse_config({"model": {"name": name, "pool": "attention"}})
    assert own.model.kwargs == {"pool": "attention"}
    own = parse_config({"model": {"name": name, "pool_k": 5}})
    assert own.model.kwargs == {"pool_k": 5}
    # the paper's recipe: the published model
    assert parse_config({"model": {"name": name}, "train": {"recipe": "paper"}}).model.kwargs == {}
    # the set builds, and the model it builds has the read-out
    from ssm2d_path.models import build_model

    m = build_model(name, in_dim=8, n_outputs=2, **cfg.model.kwargs)
    assert m.pool_name == "channels" and m.input_ica == 4 and m.input_ica_restarts == 4
    assert m.embed[0].in_features == 4 + 16 and m.classifier.in_features == 4 + 16 + 16


@pytest.mark.parametrize("name", ["abmil", "transmil", "mean"])
def test_default_recipe_leaves_models_without_the_options_alone(name):
    assert parse_config({"model": {"name": name}}).model.kwargs == {}


@pytest.mark.parametrize("raw, msg", [
    ({"train": {"recipe": "fast"}}, r"train\.recipe: unknown recipe 'fast'; allowed: default, paper"),
    ({"train": {"recipe": 3}}, r"train\.recipe: expected a string"),
    ({"train": {"patience": 0}}, r"train\.patience: must be >= 1"),
    ({"train": {"crop": 0.0}}, r"train\.crop: must be in \(0, 1\]"),
    ({"train": {"feature_noise": -0.1}}, r"train\.feature_noise: must be >= 0"),
    ({"train": {"min_epochs": 0}}, r"train\.min_epochs: must be >= 1"),
    ({"train": {"dihedral": "yes"}}, r"train\.dihedral: expected true or false"),
])
def test_bad_recipe_keys_are_refused_by_name(raw, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(raw, check_model=False)


def _fit(tmp_path, name, **kw):
    data = make_examples(24, seed=3)
    cfg = dataclasses.replace(TrainConfig(), progress=False, device="cpu", seed=1, **kw)
    torch.manual_seed(0)
    tr = Trainer(TinyMIL(6, 2), ClassificationTask(2), data[:14], data[14:19], data[19:], cfg=cfg,
                 out_dir=tmp_path / name)
    return tr.fit()


def test_early_stopping_stops_patience_epochs_after_the_best(tmp_path):
    res = _fit(tmp_path, "es", epochs=30, lr=0.2, patience=2, min_epochs=1, dihedral=False, feature_noise=0.0)
    losses = [h["val_loss"] for h in res["history"]]
    best = min(range(len(losses)), key=losses.__getitem__) + 1
    assert res["reported_epoch"] == best
    assert res["epochs_run"] == len(res["history"]) < 30
    assert res["epochs_run"] - best == 2
    assert res["recipe"] == "default"
    # resuming a run that stopped early does not train on
    again = Trainer(TinyMIL(6, 2), ClassificationTask(2), *_split(), cfg=dataclasses.replace(
        TrainConfig(), progress=False, device="cpu", seed=1, epochs=30, lr=0.2, patience=2, min_epochs=1,
        dihedral=False, feature_noise=0.0), out_dir=tmp_path / "es").fit()
    assert len(again["history"]) == res["epochs_run"]


def _split():
    data = make_examples(24, seed=3)
    return data[:14], data[14:19], data[19:]


def test_min_epochs_holds_off_early_stopping(tmp_path):
    res = _fit(tmp_path, "min", epochs=8, lr=0.2, patience=1, min_epochs=8, dihedral=False, feature_noise=0.0)
    assert len(res["history"]) == 8


def test_augmentation_changes_training_and_is_reproducible(tmp_path):
    plain = _fit(tmp_path, "plain", epochs=2, dihedral=False, feature_noise=0.0)
    noisy_a = _fit(tmp_path, "a", epochs=2, dihedral=True, feature_noise=0.5)
    noisy_b = _fit(tmp_path, "b", epochs=2, dihedral=True, feature_noise=0.5)
    loss = lambda r: [h["train_loss"] for h in r["history"]]  # noqa: E731
    assert loss(noisy_a) == loss(noisy_b)
    assert loss(noisy_a) != loss(plain)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["run_config"]["train"]["feature_noise"] == 0.5
