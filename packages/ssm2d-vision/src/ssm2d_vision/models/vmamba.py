"""VMamba v2 and 2DVMamba as timm models.

VMamba v2 ("v05_noz" blocks, channel-first with LayerNorm2d) and 2DVMamba (the same network with
the four 1D cross-scan routes of every SS2D replaced by the four 2D scans of 2DMamba; no parameter
added). Layout, all NCHW:

    stem:     conv3x3/s2 (3 -> C/2) + LN + GELU + conv3x3/s2 (C/2 -> C) + LN          stride 4
    stage i:  [downsample: conv3x3/s2 + LN, for i > 0] + depths[i] x VSSBlock          stride 4 * 2^i
    VSSBlock: x + drop_path(SS2D(LN(x))), then x + drop_path(MLP(LN(x))), MLP ratio 4, GELU
    head:     LN -> global average pool -> Linear

Dense prediction: ``timm.create_model(name, features_only=True)`` returns the four stage outputs
(strides 4, 8, 16, 32) each through its own LayerNorm2d (``out_norms.{i}``), as the released
detection/segmentation backbone does (its ``outnorm{i}``). Pass ``out_norms=False`` to get the raw
stage outputs instead. Released checkpoints convert with :mod:`ssm2d_vision.convert`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_module
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from ssm2d_nn.layers.conv1x1 import Mlp1x1
from ssm2d_nn.layers.norms import LayerNorm2d
from ssm2d_nn.layers.ss2d import SS2D

from ._common import check_in_chans, check_num_classes, check_out_indices, not_scriptable

__all__ = ["VMamba", "VSSBlock", "VMambaStage", "Stem", "Downsample", "MODEL_ARGS"]

LN_EPS = 1e-5  # nn.LayerNorm's default, which the released LayerNorm2d inherits

# SS2D is one leaf of torch.fx traces (timm's FX feature extraction, create_feature_extractor): its
# scans are autograd functions over the compiled kernels and it checks its input's shape in Python.
register_notrace_module(SS2D)


class Stem(nn.Module):
    """Two 3x3 stride-2 convs with LN (+ GELU) between: (B, in_chans, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_chans: int, dim: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1, **dd)
        self.norm1 = LayerNorm2d(dim // 2, eps=LN_EPS, **dd)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1, **dd)
        self.norm2 = LayerNorm2d(dim, eps=LN_EPS, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """3x3 stride-2 conv + LN: (B, C_in, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))."""

    def __init__(self, in_dim: int, out_dim: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, device=device, dtype=dtype)
        self.norm = LayerNorm2d(out_dim, eps=LN_EPS, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class VSSBlock(nn.Module):
    """VMamba v2 block on (B, C, H, W): SS2D mixer and a 1x1-conv MLP, pre-norm, with drop path."""

    def __init__(self, dim: int, drop_path: float = 0.0, d_state: int = 1, ssm_ratio: float = 1.0,
                 mlp_ratio: float = 4.0, scan: str = "cross1d", backend: str = "auto", drop_rate: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = LayerNorm2d(dim, eps=LN_EPS, **dd)
        self.ssm = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, scan=scan, backend=backend, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim, eps=LN_EPS, **dd)
        # timm's Mlp(use_conv=True) with its 1x1 convolutions run as GEMMs (same parameter names).
        self.mlp = Mlp1x1(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop_rate, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ssm(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VMambaStage(nn.Module):
    """Optional downsample, then ``depth`` VSSBlocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, drop_path: Sequence[float], downsample: bool,
                 device=None, dtype=None, **block_kw):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.downsample = Downsample(in_dim, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[VSSBlock(dim, drop_path=drop_path[i], **block_kw, **dd) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class VMamba(nn.Module):
    """VMamba v2 / 2DVMamba.

    Args:
        in_chans, num_classes, global_pool, drop_rate: as in timm (``num_classes=0``: no classifier;
            ``global_pool=""``: no pooling, which timm's ClassifierHead allows without a classifier).
        depths: blocks per stage; dims: channels per stage (an int C means C, 2C, 4C, 8C).
        d_state: SSM state size N; ssm_ratio: d_inner / C; mlp_ratio: MLP width / C.
        scan: "cross1d" (VMamba) or "2d" (2DVMamba); backend: scan2d backend.
        drop_path_rate: stochastic depth, increasing linearly from 0 over all blocks.
        out_norms: add one LayerNorm2d per stage (``out_norms.{i}``) that ``forward_intermediates``
            applies with ``norm=True`` (the released dense-prediction backbone's ``outnorm{i}``).
        device, dtype: PyTorch's factory arguments for every parameter (e.g. ``device="meta"``).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 depths: Sequence[int] = (2, 2, 8, 2), dims: Union[int, Sequence[int]] = 96, d_state: int = 1,
                 ssm_ratio: float = 1.0, mlp_ratio: float = 4.0, scan: str = "cross1d", backend: str = "auto",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.2, out_norms: bool = False,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_num_classes(num_classes, "VMamba")
        check_in_chans(in_chans, "VMamba")
        if isinstance(dims, int):
            dims = [dims * 2 ** i for i in range(len(depths))]
        dims = [int(d) for d in dims]
        if len(dims) != len(depths) or not depths:
            raise ValueError(f"VMamba: depths and dims must have the same non-zero length, got {depths}, {dims}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.dims = dims
        self.scan = scan
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, dims[0], **dd)
        # float32 linspace like the released model (explicitly on the CPU: also under a meta device context)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        block_kw = dict(d_state=d_state, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio, scan=scan, backend=backend)
        stages, self.feature_info, start = [], [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stages.append(VMambaStage(dims[max(i - 1, 0)], dim, depth, dpr[start:start + depth], downsample=i > 0,
                                      **block_kw, **dd))
            start += depth
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.out_norms = nn.ModuleList([LayerNorm2d(d, eps=LN_EPS, **dd) for d in dims]) if out_norms else None
        self.norm = LayerNorm2d(self.num_features, eps=LN_EPS, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The released model inits every Linear (its 1x1 projections are Linear2d) trunc-normal(0.02);
        # 3x3 convs keep PyTorch's default. SS2D initialises its own SSM parameters.
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ---- timm API -------------------------------------------------------------------------------
    def __prepare_scriptable__(self):
        raise not_scriptable("VMamba")  # torch.jit.script calls this first: a clear error, not a compiler trace

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """SSM parameters kept out of weight decay as in Mamba: A_logs, Ds and the dt biases."""
        return {n for n, _ in self.named_parameters() if n.endswith((".A_logs", ".Ds", ".dt_projs_bias"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm|^out_norms", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """A new classifier for ``num_classes`` (0: none), on the model's device and in its dtype;
        ``global_pool`` changes the pooling ("" none, None keeps it); ``reset_other`` drops the final norm."""
        check_num_classes(num_classes, "VMamba.reset_classifier")
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if reset_other:
            self.norm = nn.Identity().train(self.training)
        self.head.reset(num_classes, pool_type=global_pool, **dd)

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage outputs (B, dims[i], H / 4*2^i, W / 4*2^i) for the taken indices.

        norm: with ``out_norms`` each intermediate goes through its stage's LayerNorm2d (the
        released dense-prediction backbone); without, the final norm is applied to the last stage's
        intermediate (timm's convention).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"VMamba.forward_intermediates: output_fmt must be 'NCHW', got {output_fmt!r}")
        check_out_indices(indices, len(self.stages), "VMamba.forward_intermediates", name="indices")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self.stem(x)
        for idx, stage in enumerate(stages):
            x = stage(x)
            if idx in take_indices:
                if norm and self.out_norms is not None:
                    intermediates.append(self.out_norms[idx](x))
                elif norm and idx == last_idx:
                    intermediates.append(self.norm(x))
                else:
                    intermediates.append(x)
        if intermediates_only:
            return intermediates
        if idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drops the stages after the last taken index (and the head / final norm); returns the indices."""
        check_out_indices(indices, len(self.stages), "VMamba.prune_intermediate_layers", name="indices")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if self.out_norms is not None:
            for i in range(max_index + 1, len(self.out_norms)):
                self.out_norms[i] = nn.Identity()  # keeps the indices of the kept norms
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        # With per-stage norms the final norm only serves the head, so it goes with it.
        if prune_norm or prune_end or (prune_head and self.out_norms is not None):
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> normed last stage (B, dims[-1], H/32, W/32)."""
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# The released configurations (vmamba_tiny_s1l8, vmamba_small_s2l15, vmamba_base_s2l15).
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "vmamba_tiny": dict(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, d_state=1, drop_path_rate=0.2),
    "vmamba_small": dict(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, d_state=1, drop_path_rate=0.3),
    "vmamba_base": dict(depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, d_state=1, drop_path_rate=0.6),
    "vmamba2d_tiny": dict(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, d_state=1, drop_path_rate=0.2, scan="2d"),
    "vmamba2d_small": dict(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, d_state=1, drop_path_rate=0.3,
                           scan="2d"),
}


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: VMamba) -> Dict[str, Tensor]:
    """timm's pretrained-weights hook (``pretrained=True`` with a ``file``, ``url`` or hub id).

    Our state dicts (what ``python -m ssm2d_vision.convert`` writes) pass unchanged; a checkpoint in
    the authors' layout (classification ``model`` or mmseg/mmdet ``backbone.`` keys) is converted with
    :func:`ssm2d_vision.convert.vmamba.released_to_ours`. A model with per-stage norms
    (``features_only``) keeps their initial values when the checkpoint has none, as the released
    dense-prediction backbone starts its ``outnorm{i}`` from a classification checkpoint.
    """
    from ..convert.vmamba import _released_to_ours, is_released_layout, unwrap_checkpoint

    sd = unwrap_checkpoint(state_dict)
    if is_released_layout(sd):
        sd, _ = _released_to_ours(sd)  # keys without a counterpart stay out: the strict load names what is missing
    if model.out_norms is not None and not any(k.startswith("out_norms.") for k in sd):
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("out_norms.")})
    return sd


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs) -> VMamba:
    if "out_indices" in kwargs:
        check_out_indices(kwargs["out_indices"], len(kwargs["depths"]), variant)
    # Dense prediction follows the released backbone: per-stage LayerNorms on the outputs (through
    # forward_intermediates: timm's default "getter" features; FX features are the stage outputs).
    getter = kwargs.get("feature_cls", "getter") == "getter"
    if kwargs.get("features_only", False) and getter:
        kwargs.setdefault("out_norms", True)
    feature_cfg = dict(feature_cls="getter", out_indices=(0, 1, 2, 3))
    if getter:
        feature_cfg["norm"] = bool(kwargs.get("out_norms", False))
    return build_model_with_cfg(VMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=feature_cfg, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    # Evaluation as released: resize to 256, centre crop 224 (crop_pct 0.875), bicubic.
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="stem.conv1", classifier="head.fc", license="mit", **kwargs)


default_cfgs = generate_default_cfgs({name: _cfg() for name in MODEL_ARGS})


def _make(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> VMamba:
    return _create_vmamba(name, pretrained=pretrained, **dict(MODEL_ARGS[name], **kwargs))


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-T v2 (vmamba_tiny_s1l8): depths 2,2,8,2, C 96, ssm_ratio 1, 30,249,064 parameters."""
    return _make("vmamba_tiny", pretrained, kwargs)


@register_model
def vmamba_small(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-S v2 (vmamba_small_s2l15): depths 2,2,15,2, C 96, ssm_ratio 2, 50,147,752 parameters."""
    return _make("vmamba_small", pretrained, kwargs)


@register_model
def vmamba_base(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-B v2 (vmamba_base_s2l15): depths 2,2,15,2, C 128, ssm_ratio 2, 88,557,800 parameters."""
    return _make("vmamba_base", pretrained, kwargs)


@register_model
def vmamba2d_tiny(pretrained: bool = False, **kwargs) -> VMamba:
    """2DVMamba-T: VMamba-T with the four 2D scans (same parameters)."""
    return _make("vmamba2d_tiny", pretrained, kwargs)


@register_model
def vmamba2d_small(pretrained: bool = False, **kwargs) -> VMamba:
    """2DVMamba-S: VMamba-S with the four 2D scans (same parameters)."""
    return _make("vmamba2d_small", pretrained, kwargs)
