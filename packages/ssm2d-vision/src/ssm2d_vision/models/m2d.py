"""Mamba2D (M2D-N/T/S) backbones for timm.

The architecture of the released Mamba2D models (MetaFormer layout, channels last inside):

* stem: Conv 7x7 / stride 4 (padding 2) + LayerNorm; stages 2-4 start with a Conv 3x3 / stride 2.
* blocks: ``x = s1*x + drop_path(mixer(LN(x)))``, ``x = s2*x + drop_path(MLP(LN(x)))`` with
  per-channel *residual* scales s1, s2 (init 1; MetaFormer's "res scale": they scale the shortcut),
  MLP ratio 4 with GELU. Mixer: :class:`ssm2d_nn.layers.M2DMixer` (SSM + local path) in stages 1-2,
  odd blocks of a stage scanning from the bottom-right; :class:`ssm2d_nn.layers.RoPEAttention2d`
  (head dim 32, 2D RoPE, QK-LayerNorm) in stages 3-4.
* a LayerNorm ends every stage (its output is the stage's feature map).
* head: global average pool -> LayerNorm -> MLP head (Linear 4x, GELU, LayerNorm, dropout, Linear).

Features (``features_only=True`` or ``forward_intermediates``): four NCHW maps with strides
4/8/16/32 and dims[i] channels (channels-last-strided views of the stage outputs, no copy).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.layers import DropPath, Mlp, get_device_dtype
from timm.models import (build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model,
                         register_notrace_module)
from timm.models._features import feature_take_indices

from ssm2d_nn.layers import M2DMixer, RoPEAttention2d
from ssm2d_nn.layers.norms import LayerNorm

from ._common import check_in_chans, check_num_classes, check_out_indices, not_scriptable

__all__ = ["Mamba2D", "M2DBlock", "M2DStage", "MlpHead", "Scale"]

MIXERS = ("m2d", "attention")
POOLS = ("avg", "")

# The token mixers are leaves of torch.fx traces (timm's FX feature extraction): the M2D mixer's scan
# is an autograd function over the compiled kernels, the attention builds its RoPE tables from the
# grid's Python size, and both check their input's shape in Python.
register_notrace_module(M2DMixer)
register_notrace_module(RoPEAttention2d)


class Scale(nn.Module):
    """Learnable per-channel scale on the last dim (channels last): x * scale, scale (C,) init ``init_value``."""

    def __init__(self, dim: int, init_value: float = 1.0, *, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value), device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # In x's dtype: a float32 scale would promote a bf16 residual stream to float32 under autocast.
        return x * self.scale.to(x.dtype)


class M2DBlock(nn.Module):
    """One MetaFormer block with residual scales, (batch, H, W, C) -> (batch, H, W, C)."""

    def __init__(self, dim: int, mixer: str = "m2d", *, origin: str = "tl", mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, res_scale_init_value: Optional[float] = 1.0, d_state: int = 16,
                 head_dim: int = 32, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        self.norm1 = LayerNorm(dim, **dd)
        if mixer == "m2d":
            self.token_mixer = M2DMixer(dim, d_state=d_state, local_path=True, origin=origin, backend=backend, **dd)
        else:
            self.token_mixer = RoPEAttention2d(dim, head_dim=head_dim, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.res_scale1 = Scale(dim, res_scale_init_value, **dd) if res_scale_init_value else nn.Identity()
        self.norm2 = LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.res_scale2 = Scale(dim, res_scale_init_value, **dd) if res_scale_init_value else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.res_scale1(x) + self.drop_path1(self.token_mixer(self.norm1(x)))
        x = self.res_scale2(x) + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class Downsample(nn.Module):
    """Conv 3x3 / stride 2 (padding 1, with bias) on channels-last tensors:
    (batch, H, W, Cin) -> (batch, ceil(H/2), ceil(W/2), Cout); the conv sees a channels-last NCHW view."""

    def __init__(self, in_chs: int, out_chs: int, *, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class M2DStage(nn.Module):
    """[downsample] -> blocks -> LayerNorm, channels last."""

    def __init__(self, in_chs: int, dim: int, depth: int, mixer: str, *, downsample: bool, dp_rates: Sequence[float],
                 inter_flip: bool = True, device=None, dtype=None, **block_kwargs):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        self.downsample = Downsample(in_chs, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            M2DBlock(dim, mixer, origin="br" if inter_flip and i % 2 == 1 else "tl", drop_path=dp_rates[i],
                     **block_kwargs, **dd)
            for i in range(depth)
        ])
        self.norm = LayerNorm(dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


class Stem(nn.Module):
    """Conv 7x7 / stride 4 (padding 2) + LayerNorm: (batch, Cin, H, W) -> (batch, H', W', C) channels last."""

    def __init__(self, in_chs: int, dim: int, *, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, dim, 7, stride=4, padding=2, device=device, dtype=dtype)
        self.norm = LayerNorm(dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        # A channels-last input makes the conv write channels last: the permute is then free.
        x = self.conv(x.contiguous(memory_format=torch.channels_last))
        return self.norm(x.permute(0, 2, 3, 1))


class MlpHead(nn.Module):
    """Linear(C, 4C) -> GELU -> LayerNorm -> Dropout -> Linear(4C, classes): (batch, C) -> (batch, classes)."""

    def __init__(self, dim: int, num_classes: int, mlp_ratio: float = 4.0, drop_rate: float = 0.0, *,
                 device=None, dtype=None):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.norm = LayerNorm(hidden, device=device, dtype=dtype)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(hidden, num_classes, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.head_drop(self.norm(self.act(self.fc1(x)))))


class _Head(nn.Module):
    """Global average pool -> LayerNorm -> fc (MlpHead or Identity)."""

    def __init__(self, dim: int, fc: nn.Module, *, device=None, dtype=None):
        super().__init__()
        self.norm = LayerNorm(dim, device=device, dtype=dtype)
        self.fc = fc


class Mamba2D(nn.Module):
    """Mamba2D image classifier / backbone (timm API).

    Args:
        depths, dims: blocks and channels per stage.  mixers: "m2d" or "attention" per stage.
        num_classes: classes of the MLP head (0: no head).  in_chans: input channels.
        global_pool: "avg" (the released head: average pool, LayerNorm, MLP) or "" (no pooling:
            the head's LayerNorm and MLP map every position, NCHW in and out).
        drop_rate: dropout inside the MLP head.  drop_path_rate: stochastic depth, linear over all
        blocks from 0 to this.  res_scale_init_value: init of the residual scales (None: none).
        inter_flip: odd blocks of M2D stages scan from the bottom-right.  d_state, head_dim: of the
        mixers.  backend: wavefront2d backend of the M2D mixers ("auto", "kernel", "reference").
        device, dtype: PyTorch's factory arguments for every parameter (e.g. ``device="meta"``).

    Input (batch, in_chans, H, W); forward_features returns (batch, dims[-1], H/32, W/32) NCHW.
    """

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (64, 128, 320, 512),
                 mixers: Sequence[str] = ("m2d", "m2d", "attention", "attention"), num_classes: int = 1000,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 res_scale_init_value: Optional[float] = 1.0, inter_flip: bool = True, d_state: int = 16,
                 head_dim: int = 32, mlp_ratio: float = 4.0, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if not (len(depths) == len(dims) == len(mixers)):
            raise ValueError(f"depths, dims and mixers need one entry per stage, got {depths}, {dims}, {mixers}")
        self._check_pool(global_pool)
        check_num_classes(num_classes, "Mamba2D")
        check_in_chans(in_chans, "Mamba2D")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, dims[0], **dd)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, self.feature_info, start = [], [], 0
        for i, (depth, dim, mixer) in enumerate(zip(depths, dims, mixers)):
            stages.append(M2DStage(dims[max(i - 1, 0)], dim, depth, mixer, downsample=i > 0,
                                   dp_rates=rates[start:start + depth], inter_flip=inter_flip,
                                   mlp_ratio=mlp_ratio, res_scale_init_value=res_scale_init_value, d_state=d_state,
                                   head_dim=head_dim, backend=backend, **dd))
            start += depth
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.head = _Head(self.num_features, self._make_fc(num_classes, **dd), **dd)

    @staticmethod
    def _check_pool(global_pool):
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be 'avg' (the released head's average pool) or '' (no pooling), "
                             f"got {global_pool!r}")

    def _make_fc(self, num_classes: int, **dd) -> nn.Module:
        return MlpHead(self.num_features, num_classes, drop_rate=self.drop_rate, **dd) if num_classes > 0 else nn.Identity()

    # --- timm model API -------------------------------------------------------------------------
    def __prepare_scriptable__(self):
        raise not_scriptable("Mamba2D")  # torch.jit.script calls this first: a clear error, not a compiler trace

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The SSM's A logs and D (as released); timm also skips every 1-D parameter. Found by module
        type, not by the parameters' ``_no_weight_decay`` flag, which a deepcopy (e.g. EMA) drops."""
        return {f"{name}.{p}" for name, mod in self.named_modules() if isinstance(mod, M2DMixer)
                for p in ("AT_log", "AL_log", "D")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False,
                         device=None, dtype=None) -> None:
        """A fresh MLP head for ``num_classes`` (0: none), on the model's device and in its dtype unless
        given; ``global_pool`` "avg" or "" (None keeps it); ``reset_other`` also drops the head's LayerNorm."""
        check_num_classes(num_classes, "Mamba2D.reset_classifier")
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        dd = get_device_dtype(self, device=device, dtype=dtype)
        self.num_classes = num_classes
        if reset_other:
            self.head.norm = nn.Identity().train(self.training)
        self.head.fc = self._make_fc(num_classes, **dd).train(self.training)

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage outputs (already LayerNorm-ed by their stage, so ``norm`` changes nothing).

        output_fmt "NCHW" (channels-last-strided views) or "NHWC". Returns the intermediates, or
        (final NCHW features, intermediates).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        check_out_indices(indices, len(self.stages), "Mamba2D.forward_intermediates", name="indices")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early or intermediates_only else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x.permute(0, 3, 1, 2) if output_fmt == "NCHW" else x)
        if intermediates_only:
            return intermediates
        return x.permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drops the stages after the last wanted one (and the head); returns the absolute indices."""
        check_out_indices(indices, len(self.stages), "Mamba2D.prune_intermediate_layers", name="indices")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True
        if prune_head:
            norm = self.head.norm
            keep_norm = (not prune_norm and isinstance(norm, nn.LayerNorm)
                         and norm.normalized_shape[0] == self.num_features)
            if not keep_norm:
                self.head.norm = nn.Identity()
            self.num_classes = 0
            self.head.fc = nn.Identity()
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """(batch, in_chans, H, W) -> (batch, dims[-1], H/32, W/32), NCHW (a channels-last view)."""
        x = self.stem(x)
        x = self.stages(x)
        return x.permute(0, 3, 1, 2)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(batch, C, h, w) NCHW -> logits (batch, classes), or the pooled, normed (batch, C).

        Without pooling (``global_pool=""``) the head runs at every position: (batch, classes, h, w),
        or the normed map (batch, C, h, w) with ``pre_logits``.
        """
        if self.global_pool == "avg":
            x = self.head.norm(x.mean((2, 3)))
            return x if pre_logits else self.head.fc(x)
        x = self.head.norm(x.permute(0, 2, 3, 1))  # channels last: the norm and MLP act on the last dim
        if not pre_logits:
            x = self.head.fc(x)
        return x.permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.conv", "classifier": "head.fc.fc2", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "m2d_nano": _cfg(),
    "m2d_tiny": _cfg(),
    "m2d_small": _cfg(),
})

# The released configurations (configs/M2D-{N,T,S}-ImageNet.yaml): depths, dims, drop path, head dropout.
M2D_CONFIGS = {
    "m2d_nano": dict(depths=(3, 3, 9, 3), dims=(32, 64, 160, 256), drop_path_rate=0.0, drop_rate=0.0),
    "m2d_tiny": dict(depths=(3, 3, 9, 3), dims=(64, 128, 320, 512), drop_path_rate=0.175, drop_rate=0.15),
    "m2d_small": dict(depths=(3, 12, 14, 3), dims=(96, 192, 384, 576), drop_path_rate=0.4, drop_rate=0.4),
}


def _create_m2d(variant: str, pretrained: bool = False, **kwargs) -> Mamba2D:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    check_out_indices(out_indices, len(kwargs["depths"]), variant)
    return build_model_with_cfg(
        Mamba2D, variant, pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _model_args(variant: str, kwargs: dict) -> dict:
    return dict(M2D_CONFIGS[variant], **kwargs)


@register_model
def m2d_nano(pretrained: bool = False, **kwargs) -> Mamba2D:
    """M2D-N: depths 3/3/9/3, dims 32/64/160/256, 7,178k parameters with the 1000-class head."""
    return _create_m2d("m2d_nano", pretrained, **_model_args("m2d_nano", kwargs))


@register_model
def m2d_tiny(pretrained: bool = False, **kwargs) -> Mamba2D:
    """M2D-T: depths 3/3/9/3, dims 64/128/320/512, 26,523k parameters with the 1000-class head."""
    return _create_m2d("m2d_tiny", pretrained, **_model_args("m2d_tiny", kwargs))


@register_model
def m2d_small(pretrained: bool = False, **kwargs) -> Mamba2D:
    """M2D-S: depths 3/12/14/3, dims 96/192/384/576, 50,274k parameters with the 1000-class head."""
    return _create_m2d("m2d_small", pretrained, **_model_args("m2d_small", kwargs))
