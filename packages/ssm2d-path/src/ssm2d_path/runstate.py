"""Which configuration made a run folder, and what a new run may do with it.

Every fold of a cross-validation carries the description of what produced it (its *run config*: the
config keys that change the result, the label table's hash, the feature dimension, and the fold's own
split) and a fingerprint of it (sha256 of the canonical JSON): in ``results.json``, in every
``last.pt`` checkpoint and in the manifests. Before anything is trained, :func:`plan_folds` compares
the folds on disk with the folds this run would make:

* same fingerprint: a finished fold is skipped, an interrupted one resumes from its checkpoint;
* another fingerprint (or none: a fold from before fingerprints existed): the run is refused with
  the differing keys, unless ``overwrite`` is given; then those folds start afresh (or, for folds
  this run does not make, are removed), so a folder never mixes configurations.

Keys that do not change results are left out: ``train.device``, ``train.progress``,
``data.split_dir`` (the splits themselves are in each fold's description), ``data.skip_bad_files``
and ``data.max_grid_cells`` (the slides they leave out change the split's ids, which are in it),
``output`` and the slide-pipeline sections.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["FoldPlan", "RunConflictError", "config_diff", "fingerprint", "fold_run_config", "plan_folds",
           "read_fold_state", "run_config"]

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
_IGNORED = {"train": ("device", "progress"), "data": ("split_dir", "skip_bad_files", "max_grid_cells")}
_FOLD_DIR = re.compile(r"^fold_(\d+)$")


class RunConflictError(ValueError):
    """The output folder holds results of another configuration (the message names the differing keys)."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(config: Mapping) -> str:
    """sha256 (hex, first 16 characters) of the canonical JSON of a run config."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()[:16]


def _file_sha256(path) -> Optional[str]:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def run_config(cfg, *, feature_dim: Optional[int] = None, label_files: Sequence = ()) -> dict:
    """The part of ``cfg`` (a :class:`~ssm2d_path.config.Config`) that changes a run's results, as plain
    JSON types, with the label table's sha256 and the feature dimension."""
    d = json.loads(_canonical(cfg.to_dict()))
    out = {}
    for section in ("data", "model", "train"):
        out[section] = {k: v for k, v in d[section].items() if k not in _IGNORED.get(section, ())}
    out["inputs"] = {"feature_dim": feature_dim,
                     "labels_sha256": [_file_sha256(p) for p in label_files if p is not None]}
    out["version"] = FINGERPRINT_VERSION
    return out


def fold_run_config(base: Mapping, fold: int, split, ids: Optional[Sequence[str]] = None) -> dict:
    """``base`` plus the fold: its index and the sha256 of its train/val/test ids (only those the
    dataset holds when ``ids`` is given: a slide left out changes the fold)."""
    have = None if ids is None else set(ids)
    parts = {name: sorted(i for i in getattr(split, name) if have is None or i in have)
             for name in ("train", "val", "test")}
    split_hash = hashlib.sha256(_canonical(parts).encode()).hexdigest()[:16]
    return {**json.loads(_canonical(base)),
            "fold": {"index": int(fold), "split_sha256": split_hash,
                     "n_train": len(parts["train"]), "n_val": len(parts["val"]), "n_test": len(parts["test"])}}


def _flatten(obj: Any, prefix: str = "") -> dict:
    if isinstance(obj, Mapping) and obj:
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def config_diff(old: Optional[Mapping], new: Mapping) -> list[tuple[str, Any, Any]]:
    """[(dotted key, old value, new value)] where the two run configs differ (missing: ``<unset>``)."""
    if old is None:
        return []
    a, b = _flatten(old), _flatten(new)
    missing = "<unset>"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if _canonical(a.get(k, missing)) != _canonical(b.get(k, missing))]


def _short(v: Any, n: int = 40) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 3] + "..."


def describe_diff(diff: Sequence[tuple[str, Any, Any]], limit: int = 8) -> str:
    parts = [f"{k} {_short(a)} -> {_short(b)}" for k, a, b in diff[:limit]]
    if len(diff) > limit:
        parts.append(f"and {len(diff) - limit} more")
    return ", ".join(parts)


@dataclass
class FoldState:
    """What ``fold_<i>`` holds: ``status`` "finished" (results.json), "partial" (last.pt only) or "empty";
    the run config and fingerprint recorded there (None for files from before fingerprints); the
    epochs done (partial)."""

    status: str
    config: Optional[dict] = None
    fingerprint: Optional[str] = None
    epoch: Optional[int] = None
    error: Optional[str] = None


def read_fold_state(fold_dir: Path) -> FoldState:
    from .train import CHECKPOINT_FILE, RESULTS_FILE, load_checkpoint

    fold_dir = Path(fold_dir)
    res = fold_dir / RESULTS_FILE
    if res.is_file():
        try:
            r = json.loads(res.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return FoldState("finished", error=f"{res} cannot be read ({e})")
        return FoldState("finished", r.get("run_config"), r.get("fingerprint"), r.get("reported_epoch"))
    ckpt = fold_dir / CHECKPOINT_FILE
    if ckpt.is_file():
        try:
            c = load_checkpoint(ckpt)
        except (OSError, ValueError) as e:
            return FoldState("partial", error=str(e))
        return FoldState("partial", c.get("run_config"), c.get("fingerprint"), int(c.get("epoch", 0)))
    return FoldState("empty")


@dataclass
class FoldPlan:
    """What a run does with each fold: ``actions[i]`` is "skip" (finished with this configuration),
    "resume" (from ``epochs[i]``), "start" or "restart" (another configuration, ``--overwrite``);
    ``removed``: folds of another configuration this run does not make, deleted under ``overwrite``;
    ``diffs``: fold -> differing keys of what was there."""

    actions: dict = field(default_factory=dict)
    epochs: dict = field(default_factory=dict)
    removed: list = field(default_factory=list)
    diffs: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One line per fold resumed, restarted or removed; one for all folds started, one for all skipped."""
        def folds(fs):
            return (f"fold {fs[0]}" if len(fs) == 1 else "folds " + ", ".join(map(str, fs)))

        out = []
        skipped = sorted(f for f, a in self.actions.items() if a == "skip")
        if skipped:
            out.append(f"{folds(skipped)}: finished with this configuration, skipped")
        for f, a in sorted(self.actions.items()):
            if a == "resume":
                out.append(f"fold {f}: resumed after epoch {self.epochs[f]} (same configuration)")
            elif a == "restart":
                out.append(f"fold {f}: made with another configuration ({self.diffs.get(f, 'unknown')}); "
                           f"overwritten, started afresh")
        started = sorted(f for f, a in self.actions.items() if a == "start")
        if started:
            out.append(f"{folds(started)}: started")
        for f in self.removed:
            out.append(f"fold {f}: made with another configuration ({self.diffs.get(f, 'unknown')}); removed")
        return out


def fold_dirs(out_dir: Path) -> dict[int, Path]:
    """fold index -> ``fold_<i>`` folder in ``out_dir``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return {}
    found = {}
    for p in out_dir.iterdir():
        m = _FOLD_DIR.match(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    return found


def _why(state: FoldState, expected: Optional[dict], reference: Optional[dict]) -> Optional[str]:
    """None when the fold on disk was made by ``expected``; else what differs. ``reference``: any fold
    of this run, to name the differing keys of a fold this run does not make."""
    if state.error:
        return f"unreadable: {state.error}"
    if state.fingerprint is None or state.config is None:
        return "made before run configurations were recorded (no fingerprint)"
    if expected is None:
        why = "not a fold of this run"
        strip = lambda c: {k: v for k, v in (c or {}).items() if k != "fold"}  # noqa: E731
        diff = config_diff(strip(state.config), strip(reference))
        return why + (f" ({describe_diff(diff)})" if diff else "")
    if state.fingerprint == fingerprint(expected):
        return None
    diff = config_diff(state.config, expected)
    return describe_diff(diff) if diff else "fingerprint differs"


def plan_folds(out_dir: Path, expected: Mapping[int, dict], folds: Sequence[int], *,
               overwrite: bool = False) -> FoldPlan:
    """Compare every ``fold_<i>`` of ``out_dir`` with ``expected`` (fold -> run config of this run) and
    decide what to do with ``folds`` (the folds to run now).

    Raises:
        RunConflictError naming each fold of another configuration and the keys that differ (old ->
        new), unless ``overwrite``; then those folds are emptied (folds to run) or removed (others).
    """
    out_dir = Path(out_dir)
    plan = FoldPlan()
    conflicts: dict[int, str] = {}
    states = {i: read_fold_state(p) for i, p in fold_dirs(out_dir).items()}
    reference = next(iter(expected.values()), None)
    for i, state in sorted(states.items()):
        if state.status == "empty":
            continue
        why = _why(state, expected.get(i), reference)
        if why is not None:
            conflicts[i] = why
    if conflicts and not overwrite:
        grouped: dict[str, list] = {}
        for i, why in sorted(conflicts.items()):
            grouped.setdefault(why, []).append(i)
        lines = [f"{'fold' if len(fs) == 1 else 'folds'} {', '.join(map(str, fs))}: {why}" for why, fs in grouped.items()]
        raise RunConflictError(
            f"output folder {str(out_dir)!r} holds results of another configuration: " + "; ".join(lines)
            + ". Use another output.dir, restore the old settings, or pass --overwrite (overwrite=True) to "
              "discard those folds and start them afresh")
    dirs = fold_dirs(out_dir)
    for i, why in sorted(conflicts.items()):
        plan.diffs[i] = why
        if i in folds:
            _empty_dir(dirs[i])
        else:
            shutil.rmtree(dirs[i])
            plan.removed.append(i)
    for f in folds:
        st = states.get(f)
        if f in conflicts:
            plan.actions[f] = "restart"
        elif st is None or st.status == "empty":
            plan.actions[f] = "start"
        elif st.status == "finished":
            plan.actions[f] = "skip"
        else:
            plan.actions[f], plan.epochs[f] = "resume", st.epoch
    return plan


def _empty_dir(path: Path) -> None:
    for p in Path(path).iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def finished_folds(out_dir: Path, expected: Mapping[int, dict]) -> dict[int, dict]:
    """fold -> results.json of every finished fold on disk made by ``expected`` (whatever ran this time)."""
    from .train import RESULTS_FILE

    out = {}
    for i, p in sorted(fold_dirs(out_dir).items()):
        if i not in expected or not (p / RESULTS_FILE).is_file():
            continue
        try:
            r = json.loads((p / RESULTS_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if r.get("fingerprint") == fingerprint(expected[i]):
            out[i] = r
    return out
