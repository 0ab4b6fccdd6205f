"""AdamW parameter groups: weight decay on weights, none on SSM parameters, biases and norms."""

from __future__ import annotations

from torch import nn

__all__ = ["NO_DECAY_NAMES", "param_groups"]

# SSM parameters whose size must not be pulled towards 0 (A = -exp(A_log), the skip D), tokens.
NO_DECAY_NAMES = frozenset({"A_log", "A_logs", "AT_log", "AL_log", "D", "Ds", "cls_token"})
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups for ``torch.optim.AdamW``: [{"params": decayed, "weight_decay": weight_decay},
    {"params": the rest, "weight_decay": 0.0}]. No decay for: parameters named A_log/A_logs/AT_log/
    AL_log/D/Ds/cls_token or flagged ``_no_weight_decay``, every bias, every parameter of a norm
    layer, and any other parameter with fewer than 2 dimensions. Frozen parameters are left out."""
    if weight_decay < 0:
        raise ValueError(f"param_groups: weight_decay must be >= 0, got {weight_decay}")
    in_norm = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (leaf in NO_DECAY_NAMES or leaf == "bias" or getattr(p, "_no_weight_decay", False)
                or id(p) in in_norm or p.ndim < 2):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
