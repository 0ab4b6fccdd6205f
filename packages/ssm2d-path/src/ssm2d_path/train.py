"""Training one split: one bag per step, gradient accumulation, AdamW, cosine schedule, model selection,
a checkpoint per epoch and exact resume.

Data: any sequence of examples with attributes ``bag`` (:class:`~ssm2d_path.bag.Bag`), ``label``,
``time``, ``censorship`` (``ssm2d_path.data.Example`` or anything alike); :class:`SplitView` selects a
split's ids from a dataset indexed by bag id.

Reproducibility: the data order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)`` alone; dropout and other global randomness follow the torch/numpy/python generators, which
are seeded once at the start and saved in every checkpoint. Resuming from the checkpoint of epoch ``k``
therefore continues exactly as the uninterrupted run would (bitwise on CPU with the same thread count).

Files written into ``out_dir``: ``last.pt`` (checkpoint after every epoch: model, optimizer, scheduler,
RNG states, epoch, best-so-far with its weights, history; written atomically, loaded with
``weights_only=True``), ``model.pt`` (the selected weights), ``predictions_val.csv`` /
``predictions_test.csv`` (per bag: id, label or time/censorship, probabilities or risk) and
``results.json`` (written last: its presence marks a finished run).

Checkpoints and ``results.json`` carry the run's description (``run_config``: the config keys that
change the result, see :mod:`ssm2d_path.runstate`) and its ``fingerprint``; a checkpoint is resumed only
by a run of the same fingerprint, anything else is refused with the keys that differ.

Progress bars are drawn only when the output is a terminal: in a log file they would be thousands of
carriage-return updates.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time as _time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._progress import progress_bar
from .config import TrainConfig
from .manifest import write_json_atomic
from .tasks import SurvivalTask, Task
from ssm2d_nn.fileio import atomic_output

__all__ = ["SplitView", "Trainer", "check_device", "evaluate", "load_checkpoint", "progress_bar", "resolve_device",
           "rng_state", "set_rng_state", "seed_everything", "metrics_from_predictions", "SELECTION_RULES"]

log = logging.getLogger(__name__)

SELECTION_RULES = ("val_auc", "val_loss", "val_cindex", "last")
RESULTS_FILE = "results.json"
CHECKPOINT_FILE = "last.pt"
INPUT_FIT_ROWS = 262_144  # patches an input transform is fitted on at most


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_device(name: str, key: str = "train.device") -> torch.device:
    """The device ``name`` names, checked to exist here. Raises ValueError naming ``key`` for a CUDA
    device on a CPU-only build or machine, or an index beyond the visible GPUs."""
    try:
        dev = resolve_device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{key}: {name!r} is not a device ({e}); expected auto, cpu, cuda or cuda:<i>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"{key}: {name!r} requested but {why}; use cpu or auto")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{key}: {name!r} requested but only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1})")
    elif dev.type != "cpu":
        raise ValueError(f"{key}: {name!r}: expected auto, cpu, cuda or cuda:<i>")
    return dev


class SplitView:
    """The examples of ``ids`` from ``dataset`` (indexed by bag id), in the given order.

    Ids the dataset does not hold (no feature file, empty slide) are dropped with a log message and
    listed in ``missing``.
    """

    def __init__(self, dataset, ids: Sequence[str]):
        have = set(getattr(dataset, "ids", ids))
        self.dataset = dataset
        self.ids = [i for i in ids if i in have]
        self.missing = [i for i in ids if i not in have]
        if self.missing:
            log.warning("%d bag(s) of the split have no features and are left out: %s", len(self.missing),
                        ", ".join(self.missing[:10]) + (" ..." if len(self.missing) > 10 else ""))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.dataset[self.ids[i]]


# ----------------------------------------------------------------------------------------------- RNG

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """torch (CPU and every CUDA device), numpy and python generator states as tensors and plain types,
    so the checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, pstate, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(pstate, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def augment_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the augmentation of training step ``step`` of epoch ``epoch`` (0-based): a function
    of (seed, epoch, step) only, so a resumed run draws the same augmentations."""
    return (int(seed) * 1_000_003 + int(epoch)) * 1_000_033 + int(step)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation depending on (seed, epoch) only."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


# ----------------------------------------------------------------------------------------------- I/O

def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _atomic_csv(df, path: Path) -> None:
    with atomic_output(path) as tmp:
        df.to_csv(tmp, index=False)


def load_checkpoint(path: os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint (or a ``model.pt``) with ``weights_only=True``: tensors and plain containers
    only. Raises FileNotFoundError, or ValueError saying what is wrong with the file."""
    from ssm2d_nn.fileio import load_weights

    return load_weights(path, map_location=map_location, what="checkpoint")


# ----------------------------------------------------------------------------------------------- eval

def _record(task: Task, example, logits: torch.Tensor) -> dict:
    rec = {"bag_id": example.bag.bag_id}
    if task.kind == "classification":
        rec["label"] = int(example.label)
    else:
        rec["time"] = float(example.time)
        rec["censorship"] = int(example.censorship)
    rec.update(task.prediction(logits))
    return rec


def metrics_from_predictions(task: Task, df) -> dict:
    """Task metrics from a predictions table (see :func:`evaluate`)."""
    from .metrics import classification_metrics, survival_metrics

    if len(df) == 0:
        return {}
    if task.kind == "classification":
        probs = df[[f"prob_{i}" for i in range(task.n_outputs)]].to_numpy()
        return classification_metrics(df["label"].to_numpy(), probs)
    return survival_metrics(df["time"].to_numpy(), df["risk"].to_numpy(), df["censorship"].to_numpy())


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, data, device, *, progress: bool = False, desc: str = "eval"):
    """Predictions and metrics of ``model`` on ``data``.

    Returns:
        (predictions DataFrame with one row per bag, metrics dict with ``loss`` and the task's metrics).
        Cox: the loss is the partial likelihood over the whole split.
    """
    import pandas as pd

    was_training = model.training
    model.eval()
    rows, logits_all, targets = [], [], []
    for i in progress_bar(range(len(data)), enabled=progress, desc=desc, leave=False):
        ex = data[i]
        out = model(ex.bag.to(device, torch.float32))
        lg = out.logits.float()
        rows.append(_record(task, ex, lg))
        logits_all.append(lg)
        targets.append(task.target(ex))
    model.train(was_training)
    df = pd.DataFrame(rows)
    metrics = metrics_from_predictions(task, df)
    if rows:
        metrics["loss"] = float(task.loss(torch.cat(logits_all), targets))
    return df, metrics


# ----------------------------------------------------------------------------------------------- schedule

def lr_factor(step: int, total: int, warmup: int, min_ratio: float, kind: str) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps,
    then cosine from 1 to ``min_ratio`` over the remaining steps (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------- trainer

@dataclass
class _Best:
    epoch: Optional[int] = None
    score: Optional[float] = None


class Trainer:
    """Train ``model`` on ``train_data``, select an epoch on ``val_data``, report on ``test_data``.

    Args:
        model: an :class:`~ssm2d_path.models.base.MILModel` (built and seeded by the caller).
        task: the :class:`~ssm2d_path.tasks.Task`.
        train_data, val_data, test_data: sequences of examples (val/test may be empty or None).
        cfg: :class:`~ssm2d_path.config.TrainConfig`.
        out_dir: where checkpoints, predictions and results go.
        selection: "val_auc" | "val_loss" | "val_cindex" | "last" (``cfg.selection`` "auto" is resolved by
            the caller, see :meth:`Config.resolved_selection`).
        callbacks: ``fn(trainer, epoch, record)`` called after each epoch's checkpoint is written
            (an exception raised there stops training; the checkpoint stays).
        run_config: what produced this run (plain JSON types; cross-validation gives the config keys
            that change results and the fold's split, :func:`ssm2d_path.runstate.fold_run_config`).
            Default: the training settings, the model's class and parameter shapes and the split sizes.
            Saved with its fingerprint in checkpoints and results; a checkpoint of another run config
            is not resumed (ValueError naming the differing keys).
        record: further entries for ``results.json`` (e.g. the slides left out of the cohort).
    """

    def __init__(self, model: nn.Module, task: Task, train_data, val_data=None, test_data=None, *,
                 cfg: TrainConfig, out_dir: os.PathLike, selection: Optional[str] = None,
                 device=None, callbacks: Sequence[Callable] = (), run_config: Optional[dict] = None,
                 record: Optional[dict] = None):
        from .models.params import param_groups

        self.cfg = cfg
        self.task = task
        self.train_data = train_data
        self.val_data = val_data if val_data is not None else []
        self.test_data = test_data if test_data is not None else []
        self.out_dir = Path(out_dir)
        self.device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.callbacks = list(callbacks)
        sel = selection or cfg.selection
        if sel == "auto":
            sel = "val_auc" if task.kind == "classification" else "val_cindex"
        if sel not in SELECTION_RULES:
            raise ValueError(f"train.selection: expected one of {SELECTION_RULES}, got {sel!r}")
        if sel != "last" and len(self.val_data) == 0:
            raise ValueError(f"train.selection={sel!r} needs a validation split, but it is empty; "
                             "use selection 'last' or give a val split")
        self.selection = sel
        if len(train_data) == 0:
            raise ValueError("the training split is empty")
        self.is_cox = isinstance(task, SurvivalTask) and task.loss_name == "cox"
        if self.is_cox and cfg.accumulation < 2:
            raise ValueError("train.accumulation: the Cox loss is computed over an accumulation window of bags; "
                             "use accumulation >= 2 (16-64 typical)")
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        self.steps_per_epoch = math.ceil(len(train_data) / cfg.accumulation)
        total = cfg.epochs * self.steps_per_epoch
        warm = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        min_ratio = cfg.min_lr / cfg.lr
        kind = cfg.scheduler
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warm, min_ratio, kind))
        from .augment import BagAugment

        self.augment = BagAugment.from_train_config(cfg)
        self.history: list[dict] = []
        self.best = _Best()
        self.best_state: Optional[dict] = None
        self.start_epoch = 0
        self.record = dict(record or {})
        if run_config is None:
            train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "progress")}
            run_config = {"train": train, "selection": sel,
                          "model": {"class": type(model).__qualname__,
                                    "parameters": {k: list(v.shape) for k, v in model.state_dict().items()}},
                          "data": {"n_train": len(self.train_data), "n_val": len(self.val_data),
                                   "n_test": len(self.test_data)}}
        from .runstate import fingerprint

        self.run_config = run_config
        self.fingerprint = fingerprint(run_config)

    # -- selection ------------------------------------------------------------------------------
    def _score(self, val_metrics: dict) -> Optional[float]:
        if self.selection == "last":
            return None
        key = {"val_auc": "auc", "val_loss": "loss", "val_cindex": "cindex"}[self.selection]
        v = float(val_metrics.get(key, float("nan")))
        return -v if key == "loss" else v  # higher is better

    def _improved(self, score: Optional[float]) -> bool:
        if self.selection == "last":
            return True
        if score is None or math.isnan(score):
            return self.best.epoch is None  # keep the first epoch rather than none at all
        return self.best.score is None or math.isnan(self.best.score) or score > self.best.score

    # -- checkpoints ------------------------------------------------------------------------------
    def _state_dict_cpu(self) -> dict:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def save_checkpoint(self, epoch: int) -> Path:
        ckpt = {
            "format": 1,
            "epoch": epoch,
            "model": self._state_dict_cpu(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "best": {"epoch": self.best.epoch, "score": self.best.score},
            "best_model": self.best_state,
            "history": self.history,
            "selection": self.selection,
            "fingerprint": self.fingerprint,
            "run_config": self.run_config,
        }
        path = self.out_dir / CHECKPOINT_FILE
        _atomic_torch_save(ckpt, path)
        return path

    def load_checkpoint(self, path: os.PathLike) -> int:
        """Restore everything from a checkpoint; returns the number of finished epochs."""
        from .runstate import RunConflictError, config_diff, describe_diff

        ckpt = load_checkpoint(path, map_location="cpu")
        if ckpt.get("fingerprint") != self.fingerprint:
            if ckpt.get("fingerprint") is None:
                why = "it was made before run configurations were recorded (no fingerprint)"
            else:
                diff = config_diff(ckpt.get("run_config"), self.run_config)
                why = f"it was made with another configuration ({describe_diff(diff) or 'fingerprint differs'})"
            raise RunConflictError(f"checkpoint {str(path)!r} cannot be resumed by this run: {why}; "
                                   f"remove it (or use --overwrite) to start afresh")
        if ckpt.get("selection") != self.selection:
            raise ValueError(f"checkpoint {str(path)!r} was made with selection {ckpt.get('selection')!r}, "
                             f"this run uses {self.selection!r}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.best = _Best(**ckpt["best"])
        self.best_state = ckpt["best_model"]
        self.history = list(ckpt["history"])
        return int(ckpt["epoch"])

    # -- training -------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> float:
        cfg = self.cfg
        self.model.train()
        order = epoch_order(len(self.train_data), cfg.seed, epoch)
        n = len(order)
        total_loss, count = 0.0, 0
        window_logits, window_targets = [], []
        bar = progress_bar(order, enabled=cfg.progress, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                           dynamic_ncols=True)
        self.optimizer.zero_grad(set_to_none=True)
        for step, idx in enumerate(bar):
            ex = self.train_data[idx]
            target = self.task.target(ex)
            bag = ex.bag
            if self.augment is not None:
                bag = self.augment(bag, seed=augment_seed(cfg.seed, epoch, step))
            out = self.model(bag.to(self.device, torch.float32))
            window_start = (step // cfg.accumulation) * cfg.accumulation
            window_len = min(cfg.accumulation, n - window_start)
            last_in_window = step == window_start + window_len - 1
            if self.is_cox:
                window_logits.append(out.logits.float())
                window_targets.append(target)
                if last_in_window:
                    loss = self.task.loss(torch.cat(window_logits), window_targets)
                    loss.backward()
                    total_loss += float(loss.detach()) * len(window_targets)
                    count += len(window_targets)
                    window_logits, window_targets = [], []
            else:
                loss = self.task.loss(out.logits.float(), [target])
                (loss / window_len).backward()
                total_loss += float(loss.detach())
                count += 1
            if last_in_window:
                if cfg.max_grad_norm:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if count:
                bar.set_postfix(loss=f"{total_loss / count:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                refresh=False)
        bar.close()
        return total_loss / max(count, 1)

    def _fit_input_transform(self) -> None:
        """Models with an input transform fitted on training patches (``needs_input_fit``, e.g.
        2DMambaMIL's input_ica) get it fitted here, before the first epoch, on the features of the
        training split (no labels; at most INPUT_FIT_ROWS patches, drawn with the run's seed)."""
        if not getattr(self.model, "needs_input_fit", False):
            return
        from .models.ica import subsample_rows

        feats = torch.cat([self.train_data[i].bag.features.float() for i in range(len(self.train_data))])
        self.model.fit_input_transform(subsample_rows(feats, INPUT_FIT_ROWS, self.cfg.seed), seed=self.cfg.seed)

    def fit(self, resume: bool = True) -> dict:
        """Train (resuming from ``out_dir/last.pt`` when present and ``resume``), then evaluate the selected
        weights on val and test and write predictions and ``results.json``. Returns the results dict."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.out_dir / CHECKPOINT_FILE
        t0 = _time.time()
        if resume and ckpt_path.is_file():
            self.start_epoch = self.load_checkpoint(ckpt_path)
            log.info("resuming %s after epoch %d", self.out_dir, self.start_epoch)
        else:
            seed_everything(self.cfg.seed)
            self._fit_input_transform()
        # A run that stopped early and was interrupted before finishing does not train on.
        stopped = self.start_epoch > 0 and self.should_stop(self.start_epoch)
        for epoch in range(self.start_epoch, self.start_epoch if stopped else self.cfg.epochs):
            te = _time.time()
            train_loss = self._train_epoch(epoch)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "lr": self.optimizer.param_groups[0]["lr"]}
            if len(self.val_data):
                _, vm = evaluate(self.model, self.task, self.val_data, self.device)
                record.update({f"val_{k}": float(v) for k, v in vm.items()})
            else:
                vm = {}
            score = self._score(vm)
            if self.selection == "last":
                self.best = _Best(epoch + 1, None)  # the weights in the model are the selected ones
            elif self._improved(score):
                self.best = _Best(epoch + 1, score)
                self.best_state = self._state_dict_cpu()
            record["seconds"] = _time.time() - te
            self.history.append(record)
            self.save_checkpoint(epoch + 1)
            log.info("epoch %d: %s", epoch + 1, record)
            for cb in self.callbacks:
                cb(self, epoch + 1, record)
            if self.should_stop(epoch + 1):
                log.info("early stop after epoch %d: no better %s since epoch %s", epoch + 1, self.selection,
                         self.best.epoch)
                break
        return self.finish(seconds=_time.time() - t0)

    def should_stop(self, epoch: int) -> bool:
        """Early stopping: ``train.patience`` epochs after the selected one without a better selection
        score (never under selection "last", never before ``train.min_epochs``)."""
        patience = self.cfg.patience
        if patience is None or self.selection == "last" or self.best.epoch is None:
            return False
        return epoch >= self.cfg.min_epochs and epoch - self.best.epoch >= patience

    def finish(self, seconds: float = float("nan")) -> dict:
        """Load the selected weights, evaluate val and test, write predictions, model.pt and results.json."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        _atomic_torch_save(self._state_dict_cpu(), self.out_dir / "model.pt")
        results = {"selection": self.selection, "reported_epoch": self.best.epoch, "epochs": self.cfg.epochs,
                   "epochs_run": len(self.history), "recipe": getattr(self.cfg, "recipe", None),
                   "n_train": len(self.train_data), "n_val": len(self.val_data), "n_test": len(self.test_data),
                   "history": self.history, "seconds": seconds}
        for name, data in (("val", self.val_data), ("test", self.test_data)):
            if len(data) == 0:
                results[name] = {}
                continue
            df, m = evaluate(self.model, self.task, data, self.device, progress=self.cfg.progress, desc=name)
            _atomic_csv(df, self.out_dir / f"predictions_{name}.csv")
            results[name] = {k: float(v) for k, v in m.items()}
        results["scan_backend"] = getattr(self.model, "scan_backend", None)
        results["fingerprint"] = self.fingerprint
        results["run_config"] = self.run_config
        results.update(self.record)
        write_json_atomic(self.out_dir / RESULTS_FILE, results)
        return results
