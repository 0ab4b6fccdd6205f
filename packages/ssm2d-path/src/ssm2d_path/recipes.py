"""Named training recipes: the values that the ``train`` keys (and some model arguments) take when the
config does not give them.

``train.recipe`` picks one (default :data:`DEFAULT_RECIPE`); keys given in the config, or with
``--set``, always win. The resolved values are what the run records (``run_config``, ``manifest.json``,
``results.json``), together with the recipe's name.

* ``default``: made for cohorts of one or two hundred slides, where the published recipe lets a
  2D model memorise its training slides, and where a sparse arrangement of rare patch types (two
  types side by side) is the signal. For the SSM models (2DMambaMIL, M2DMIL, MambaMIL) it adds a
  read-out of explicit neighbour co-occurrences next to the SSM layer (:data:`LOCAL_PAIRS`). See the
  package README ("Training recipes") for the evidence.
* ``paper``: the 2DMamba paper's (Zhang et al., CVPR 2025) setting: 20 epochs of AdamW at lr 1e-4,
  weight decay 1e-5, cosine schedule, the epoch of the best validation AUC (C-index), no augmentation,
  the models' published sizes (2DMambaMIL: dim 128, dropout 0.25).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["DEFAULT_RECIPE", "LOCAL_PAIRS", "RECIPES", "Recipe", "apply_recipe"]


@dataclass(frozen=True)
class Recipe:
    """``train``: values of TrainConfig keys; ``model``: constructor arguments that go together, applied
    as one set to a model whose constructor takes every one of them and whose config gives none of
    them (a config that chooses any of them chooses its own model: its own defaults elsewhere);
    ``about``: one line for the docs."""

    train: Mapping = field(default_factory=dict)
    model: Mapping = field(default_factory=dict)
    about: str = ""


# The SSM models' read-out of the default recipe: the model's input is the features' 4 most heavy-tailed
# independent components (FastICA, 4 restarts) and their co-occurrences with each 4-neighbour's; these
# channels and the SSM layer's residual stream on them are each pooled over the bag on its own (mean of
# the 3 largest) and read by a linear layer. Models: TwoDMambaMIL's docstring.
LOCAL_PAIRS: Mapping = {"input_ica": 4, "input_ica_restarts": 4, "input_cooc": "min", "pool": "channels",
                        "channel_source": "both", "pool_k": 3}

RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        train={"epochs": 40, "lr": 2e-3, "weight_decay": 1e-2, "scheduler": "cosine", "warmup_epochs": 1.0,
               "min_lr": 0.0, "selection": "val_loss", "patience": 15, "min_epochs": 20,
               "dihedral": True, "crop": 1.0, "feature_noise": 0.0},
        model=LOCAL_PAIRS,
        about="model selection and early stopping on the validation loss, weight decay 1e-2, random flips "
              "and 90-degree rotations of each slide's grid; SSM models: the local-pairs read-out",
    ),
    "paper": Recipe(
        train={"epochs": 20, "lr": 1e-4, "weight_decay": 1e-5, "scheduler": "cosine", "warmup_epochs": 0.0,
               "min_lr": 0.0, "selection": "auto", "patience": None, "min_epochs": 1,
               "dihedral": False, "crop": 1.0, "feature_noise": 0.0},
        model={},
        about="the 2DMamba paper's: 20 epochs at lr 1e-4, weight decay 1e-5, best validation AUC / C-index",
    ),
}
DEFAULT_RECIPE = "default"


def apply_recipe(raw: dict, accepts=None) -> dict:
    """A copy of the raw config mapping with the recipe's values filled in where the config gives none.

    Args:
        raw: the config as read from YAML (sections as mappings).
        accepts: ``fn(model_name, key) -> bool``, whether the model takes a constructor argument
            (default: every key of the recipe's ``model`` is offered). The recipe's ``model`` set is
            applied whole when the model takes every key and the config gives none, else not at all.
    Raises:
        ValueError naming ``train.recipe`` for an unknown recipe.
    """
    raw = dict(raw or {})
    train = raw.get("train")
    train = dict(train) if isinstance(train, dict) else train
    if train is None:
        train = {}
    if not isinstance(train, dict):
        return raw  # the section check reports it
    name = train.get("recipe", DEFAULT_RECIPE)
    if name not in RECIPES:
        raise ValueError(f"train.recipe: unknown recipe {name!r}; allowed: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    raw["train"] = {**recipe.train, **train, "recipe": name}
    model = raw.get("model")
    if recipe.model and (model is None or isinstance(model, dict)):
        model = dict(model or {})
        mname = str(model.get("name", "2dmambamil")).lower()
        chosen = any(key in model for key in recipe.model)
        if not chosen and (accepts is None or all(accepts(mname, key) for key in recipe.model)):
            model.update(recipe.model)
        raw["model"] = model
    return raw
