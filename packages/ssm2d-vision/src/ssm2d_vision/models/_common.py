"""Argument checks shared by the model families: each raises a ValueError that names the argument
and says what was expected, rather than building a model that fails later (or silently has no head)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

__all__ = ["check_num_classes", "check_in_chans", "check_out_indices", "not_scriptable"]


def not_scriptable(owner: str) -> RuntimeError:
    """The error ``torch.jit.script`` raises for our models (from their ``__prepare_scriptable__``)."""
    return RuntimeError(
        f"{owner} is not TorchScript-scriptable: its mixers run Python that TorchScript cannot compile (the "
        "scan ops' backend selection and autograd wrappers); use torch.compile, or torch.fx with the mixers as "
        "leaves (timm's notrace registry)")


def check_num_classes(num_classes: int, owner: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"{owner}: num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}")


def check_in_chans(in_chans: int, owner: str) -> None:
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"{owner}: in_chans must be an int >= 1 (input image channels), got {in_chans!r}")


def check_out_indices(indices: Optional[Union[int, Sequence[int]]], num_stages: int, owner: str,
                      name: str = "out_indices") -> None:
    """timm's index forms: None (all stages), an int n (the last n stages, 1 <= n <= num_stages) or a
    non-empty sequence of distinct stage indices in [-num_stages, num_stages) (negative: from the end)."""
    if indices is None:
        return
    expected = (f"an int n in 1..{num_stages} (the last n stages) or a non-empty sequence of distinct stage "
                f"indices in [-{num_stages}, {num_stages})")
    if isinstance(indices, bool):
        raise ValueError(f"{owner}: {name} must be {expected}, got {indices!r}")
    if isinstance(indices, int):
        if not 1 <= indices <= num_stages:
            raise ValueError(f"{owner}: {name} must be {expected}, got {indices!r}")
        return
    try:
        items = list(indices)
    except TypeError:
        raise ValueError(f"{owner}: {name} must be {expected}, got {indices!r}") from None
    if not items:
        raise ValueError(f"{owner}: {name} must be {expected}, got an empty {type(indices).__name__}")
    if any(isinstance(i, bool) or not isinstance(i, int) or not -num_stages <= i < num_stages for i in items):
        raise ValueError(f"{owner}: {name} must be {expected}, got {indices!r}")
    absolute = [i % num_stages for i in items]
    if len(set(absolute)) != len(absolute):
        dup = sorted({i for i in absolute if absolute.count(i) > 1})
        raise ValueError(f"{owner}: {name} must be {expected}, got {indices!r} (stage(s) {dup} more than once)")
