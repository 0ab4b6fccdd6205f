"""1x1 convolutions run as matrix products, with ``nn.Conv2d``'s parameters.

A 1x1 convolution is a GEMM over the channels, but ``F.conv2d`` runs it through the convolution
machinery: on CUDA a cuDNN call whose host side costs several times a GEMM's, plus layout
transposes around it when the input is not in the layout cuDNN picked, and a convolution backward
of the same cost. For models whose kernels are short (VMamba's 1x1 projections and MLP) that host
time bounds the step. Here the product runs on a free view of the input instead:

* channels-last input (B, C, H, W) with strides of (B, H, W, C) (or H = W = 1): ``F.linear`` on the
  (B, H, W, C) view, one GEMM over B*H*W rows; the result is channels-last like the input;
* any other input: a batched product ``W @ x`` on the (B, C, H*W) view (made contiguous first if it
  is not), the weight broadcast over B; the result is contiguous (NCHW). Its weight gradient is
  B per-image (C_out, C_in) products summed (a transient of B * C_out * C_in values).

The parameters, their names, shapes ((out, in, 1, 1)) and state-dict keys are those of
``nn.Conv2d``, so checkpoints and code that reads ``.weight`` are unchanged. Grouped 1x1 products
(the SS2D projections) are in :func:`grouped_1x1`; :class:`Mlp1x1` is timm's 1x1-conv MLP on top.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norms import _as_dtype, _autocast_dtype

__all__ = ["Conv1x1", "Mlp1x1", "batched_gemm", "block_diagonal", "conv1x1", "grouped_1x1"]


def _rows_are_channels(x: Tensor) -> bool:
    """Whether the (B, H, W, C) view of x is contiguous (channels-last strides), i.e. the product is
    one plain GEMM. With H = W = 1 x is both layouts and so is the result: this route then avoids the
    batched product, whose weight gradient sums B per-image (C_out, C_in) products."""
    if x.shape[2] * x.shape[3] == 1:
        return True
    # is_contiguous(memory_format=channels_last) answers what permute(0, 2, 3, 1).is_contiguous()
    # does without making a view (an op per call on the host: 56 per VMamba-T step).
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@torch.fx.wrap
def conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 kernel (stride 1, no padding, groups 1) as a GEMM.

    One leaf call of torch.fx traces (``torch.fx.wrap``): its shape checks and the choice of route
    run on real tensors when the traced graph runs (timm's FX feature extraction traces the MLPs).

    Args:
        x: (B, C_in, H, W), any strides.
        weight: (C_out, C_in, 1, 1) or (C_out, C_in).
        bias: (C_out,) or None.

    Returns:
        (B, C_out, H, W): channels-last when x is channels-last (and not also contiguous), else
        contiguous (with H = W = 1 both). Under autocast the product runs in the autocast dtype, as
        the convolution would.
    """
    if weight.dim() == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError(f"conv1x1: weight must have shape (C_out, C_in, 1, 1), got {tuple(weight.shape)}")
        weight = weight.view(weight.shape[0], weight.shape[1])
    elif weight.dim() != 2:
        raise ValueError(f"conv1x1: weight must have shape (C_out, C_in, 1, 1) or (C_out, C_in), "
                         f"got {tuple(weight.shape)}")
    if x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv1x1: x must have shape (B, {weight.shape[1]}, H, W), got {tuple(x.shape)}")
    b, c, h, w = x.shape
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv1x1: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if _rows_are_channels(x):
        # (B, H, W, C) is a free view; linear's result (B, H, W, C_out) is contiguous, i.e. the
        # permuted-back output is channels-last.
        return F.linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)
    return batched_gemm(weight, x.reshape(b, c, h * w), bias).view(b, weight.shape[0], h, w)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matrix product of x runs in: autocast's when it is on for x's device, else x's."""
    dt = _autocast_dtype(x.device.type)
    return x.dtype if dt is None else dt


def batched_gemm(weight: Tensor, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``weight @ x[i] (+ bias[:, None])`` for every i: (M, K) and (B, K, L) -> (B, M, L), contiguous.

    One batched GEMM with the weight broadcast over the batch (batch stride 0, no copy). Not
    ``torch.matmul``: for a 2D @ 3D product it folds the batch into the rows of x's transpose,
    which copies x (and the output back) whenever x is not already (B, L, K)-contiguous. The weight is
    cast before it is broadcast: autocast would otherwise cast the broadcast (B, M, K) tensor, i.e.
    materialise B copies of it.
    """
    dt = _compute_dtype(x)
    weight, x = _as_dtype(weight, dt), _as_dtype(x, dt)
    wb = weight.expand(x.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(wb, x)
    return torch.baddbmm(bias.to(dt).view(1, -1, 1), wb, x)


class Conv1x1(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` whose forward is a GEMM (see the module docstring).

    Same constructor arguments as ``nn.Conv2d`` with the kernel size fixed to 1; stride, padding,
    dilation and groups other than their defaults are refused (they are not a plain 1x1 product).
    Parameters: weight (out_channels, in_channels, 1, 1), bias (out_channels,) or none.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W), in the input's memory format.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        for name, value in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
            if torch.nn.modules.utils._pair(value) != (1, 1):
                raise ValueError(f"Conv1x1: {name} must be 1, got {value!r}")
        if torch.nn.modules.utils._pair(padding) != (0, 0) or groups != 1:
            raise ValueError(f"Conv1x1: padding must be 0 and groups 1, got padding={padding!r}, groups={groups!r}")
        super().__init__(in_channels, out_channels, 1, bias=bias, padding_mode=padding_mode, device=device,
                         dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return conv1x1(x, self.weight, self.bias)  # checks x's shape


_IDENTITIES: dict = {}


def _identity(g: int, like: Tensor) -> Tensor:
    """The (g, g) identity in like's dtype and device; kept per (g, dtype, device) for plain eager
    calls (building it is four ops), built afresh under tracing, fake tensors or dispatch modes."""
    plain = (type(like) in (torch.Tensor, nn.Parameter) and like.device.type in ("cpu", "cuda")
             and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0)
    if not plain:
        return torch.eye(g, dtype=like.dtype, device=like.device)
    key = (g, like.dtype, like.device)
    eye = _IDENTITIES.get(key)
    if eye is None:
        with torch.inference_mode(False):  # a normal tensor: autograd saves it for the weight's gradient
            eye = _IDENTITIES[key] = torch.eye(g, dtype=like.dtype, device=like.device)
    return eye


def block_diagonal(weight: Tensor) -> Tensor:
    """(..., G, M, K) -> the (..., G*M, G*K) block-diagonal matrices with ``weight[..., g, :, :]`` as
    block g (leading dimensions: one matrix each).

    Built as one broadcast product with a 0/1 mask (exact: each entry is w*1 or w*0), so the grouped
    product becomes one GEMM; its backward is one product and one sum.
    """
    *lead, g, m, k = weight.shape
    eye = _identity(g, weight)
    return (weight.unsqueeze(-2) * eye.view(g, 1, g, 1)).reshape(*lead, g * m, g * k)


def grouped_1x1(x: Tensor, weight: Tensor) -> Tensor:
    """The grouped 1x1 convolution ``F.conv1d(x, weight.reshape(G*M, K, 1), groups=G)`` on (B, G*K, L).

    Args:
        x: (B, G*K, L) (or (B, G, K, L)), contiguous along L.
        weight: (G, M, K), already in x's dtype.

    Returns:
        (B, G*M, L), contiguous. With G > 1 the product runs as one GEMM with the block-diagonal
        (G*M, G*K) weight: a batched product over (B, G) would have to copy the weight B times
        (its batch dimensions do not merge), and G separate products cost G times the host time.
        The zero blocks add exact zeros, so the result equals the grouped convolution's up to the
        summation order (for finite inputs).
    """
    g, m, k = weight.shape
    b, L = x.shape[0], x.shape[-1]
    if x.numel() != b * g * k * L:
        raise ValueError(f"grouped_1x1: x must have shape (B, {g * k}, L) for weight {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}")
    w2 = weight.view(m, k) if g == 1 else block_diagonal(weight)
    return batched_gemm(w2, x.reshape(b, g * k, L))


class Mlp1x1(nn.Module):
    """timm's ``Mlp(..., use_conv=True)`` with its 1x1 convolutions run as GEMMs (:class:`Conv1x1`).

    fc1 (1x1, in -> hidden) -> act -> drop1 -> norm (identity) -> fc2 (1x1, hidden -> out) -> drop2,
    with timm's module names, so the state-dict keys (``fc1.weight`` (hidden, in, 1, 1), ``fc1.bias``,
    ``fc2.weight``, ``fc2.bias``) and the order in which the parameters are created (hence their
    seeded initial values) are the same. A zero dropout is an ``nn.Identity`` (no op per call).

    Shapes: (B, in_features, H, W) -> (B, out_features, H, W), in the input's memory format.
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer=nn.GELU, bias: bool = True, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        drops = tuple(drop) if isinstance(drop, (tuple, list)) else (drop, drop)
        self.fc1 = Conv1x1(in_features, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drops[0]) if drops[0] > 0 else nn.Identity()
        self.norm = nn.Identity()
        self.fc2 = Conv1x1(hidden_features, out_features, bias=bias, **dd)
        self.drop2 = nn.Dropout(drops[1]) if drops[1] > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))
