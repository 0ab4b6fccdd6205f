"""2DMambaMIL, its Mamba2D variant (M2DMIL) and the 1D MambaMIL baseline.

All three: Linear(in_dim, dim) - ReLU - dropout per patch; then, per slide of the bag, n_layers
pre-norm residual SSM layers ``h = h + layer(RMSNorm(h))`` run on the slide's own tissue-cropped grid
(2D models) or on its tissue patches in raster order (MambaMIL); a final LayerNorm; gated attention
pooling over the tissue patches of all slides of the bag (empty grid cells never reach the
pooling: the grid is gathered back to patches first); a linear classifier. Scores: the attention
logits.

Memory: the dense grid of a slide is its tissue bounding box only (M = H*W cells, not a canvas).
With the defaults (dim 128, d_inner 256) and bf16 autocast, one training step at N = 150k patches
(M = 237k cells, 63% fill) keeps between forward and backward (``benchmarks/mil_memory.py``):
the embedding output N x 128 (73 MiB in float32; on CUDA without TF32 the Linear runs in bf16
and keeps its bf16 output, 37 MiB, beside the float32 residual stream; either way it keeps a
reference to the input features, not a bf16 copy; ReLU and dropout are fused and save nothing more), the residual sum
before the LayerNorm (73 MiB), one bf16 copy of the normed patches and the gated attention's
tanh, sigmoid and product (4 x 37 MiB), and per layer its grid input M x 128 bf16 (58 MiB) and
x_proj output M x 40 bf16 (18 MiB): ~374 MiB. The peak is reached in the layer's backward (see
:class:`ssm2d_nn.layers.TwoDMambaLayer`: its channel-chunked scan2d path holds one chunk of inner
channels at a time, 128 by default): measured on an H100, 849 MiB beyond the inputs (0.77 GiB
counted with 32-channel chunks, which are 3x slower). Before these measures: 649 MiB kept and a
~2.0 GiB peak.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ssm2d_nn.layers import TwoDMambaLayer

from ..bag import Bag, SlideGrid
from .base import MILModel, MILOutput
from .common import GatedAttention, check_bag, embed_patches, embedding, init_linear_
from .cooc import COOC_OPS, neighbour_cooc

__all__ = ["M2DMIL", "MambaMIL", "TwoDMambaMIL"]


def _to_autocast_dtype(x: Tensor) -> Tensor:
    """Under autocast, hand the SSM layer a low-precision grid: norms return float32 under autocast,
    and a float32 (cells x dim) grid would be the largest thing the checkpoint keeps."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return x.to(torch.get_autocast_dtype(dev))
    return x


class _RMSNormLowp(torch.autograd.Function):
    """RMSNorm in float32 (float64 for float64) returned in a lower dtype, saving only its input and
    the (N, 1) inverse RMS. nn.RMSNorm under autocast keeps the float32 normalized x for the weight
    gradient (N x dim x 4 bytes, 73 MiB at 150k x 128) besides its input; here the backward
    recomputes x * rstd from the input, which the residual stream keeps anyway."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xa = x.to(acc)
        rstd = torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xa * rstd * weight.to(acc)).to(dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype
        xhat = x.to(acc) * rstd
        gw = grad.to(acc) * weight.to(acc)
        dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        dweight = (grad.to(acc) * xhat).sum(0) if weight.requires_grad else None
        return dx.to(x.dtype), None if dweight is None else dweight.to(weight.dtype), None, None


def _norm_to_grid(norm: nn.RMSNorm, h: Tensor) -> Tensor:
    """norm(h) (N, dim) in the dtype the SSM grid runs in: autocast's under autocast (see
    _RMSNormLowp), else h's."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev) and h.dim() == 2 and norm.weight is not None:
        return _RMSNormLowp.apply(h, norm.weight, norm.eps if norm.eps is not None else torch.finfo(h.dtype).eps,
                                  torch.get_autocast_dtype(dev))
    return norm(h)


POOLS = ("attention", "topk", "channels")
CHANNEL_SOURCES = ("input", "hidden", "both")
CHANNEL_POOLS = ("topk", "lme")
SSM_INPUTS = ("model", "features")


class _SSMMIL(MILModel):
    layout = "grid"

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 128, d_inner: int = 256, d_state: int = 16,
                 n_layers: int = 1, dropout: float = 0.25, *, scan: str = "scan2d", dt_rank: Optional[int] = None,
                 d_conv: Union[int, tuple[int, int]] = 3, attn_dim: int = 128, backend: str = "auto",
                 checkpoint: Union[bool, str] = "auto", input_norm: bool = False, local_mix: int = 0,
                 pool: str = "attention", pool_k: int = 1, input_ica: int = 0,
                 input_shrink: float = 0.0, input_cooc: Union[bool, str] = False,
                 channel_source: Optional[str] = None, channel_pool: Optional[str] = None,
                 pool_tau: Optional[float] = None, input_ica_restarts: int = 1, ssm_input: str = "model"):
        super().__init__()
        name = type(self).__name__
        if n_layers < 1:
            raise ValueError(f"{name}: n_layers must be >= 1, got {n_layers}")
        if not isinstance(input_norm, bool):
            raise ValueError(f"{name}: input_norm must be true or false, got {input_norm!r}")
        if isinstance(local_mix, bool) or not isinstance(local_mix, int) or local_mix < 0 or (
                local_mix and local_mix % 2 == 0):
            raise ValueError(f"{name}: local_mix must be 0 (off) or an odd kernel size >= 1, got {local_mix!r}")
        if pool not in POOLS:
            raise ValueError(f"{name}: pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if isinstance(pool_k, bool) or not isinstance(pool_k, int) or pool_k < 1:
            raise ValueError(f"{name}: pool_k must be an integer >= 1, got {pool_k!r}")
        if isinstance(input_ica, bool) or not isinstance(input_ica, int) or not 0 <= input_ica <= in_dim:
            raise ValueError(f"{name}: input_ica must be 0 (off) or a number of components in [1, in_dim={in_dim}], "
                             f"got {input_ica!r}")
        if isinstance(input_ica_restarts, bool) or not isinstance(input_ica_restarts, int) or input_ica_restarts < 1 or (
                input_ica_restarts > 1 and not input_ica):
            raise ValueError(f"{name}: input_ica_restarts must be an integer >= 1 (> 1 only with input_ica), "
                             f"got {input_ica_restarts!r}")
        if isinstance(input_shrink, bool) or not isinstance(input_shrink, (int, float)) or not (
                math.isfinite(input_shrink) and input_shrink >= 0):
            raise ValueError(f"{name}: input_shrink must be a finite number >= 0, got {input_shrink!r}")
        if input_cooc is True:
            input_cooc = "min"
        if input_cooc is not False and input_cooc not in COOC_OPS:
            raise ValueError(f"{name}: input_cooc must be false (off), true (= 'min') or one of "
                             f"{', '.join(COOC_OPS)}, got {input_cooc!r}")
        if pool != "channels":
            for arg, val in (("channel_source", channel_source), ("channel_pool", channel_pool), ("pool_tau", pool_tau)):
                if val is not None:
                    raise ValueError(f"{name}: {arg} is an argument of pool='channels' (pool is {pool!r}), got {val!r}")
        else:
            channel_source = "hidden" if channel_source is None else channel_source
            channel_pool = "topk" if channel_pool is None else channel_pool
            if channel_source not in CHANNEL_SOURCES:
                raise ValueError(f"{name}: channel_source must be one of {', '.join(CHANNEL_SOURCES)}, "
                                 f"got {channel_source!r}")
            if channel_pool not in CHANNEL_POOLS:
                raise ValueError(f"{name}: channel_pool must be one of {', '.join(CHANNEL_POOLS)}, got {channel_pool!r}")
            if channel_pool != "lme" and pool_tau is not None:
                raise ValueError(f"{name}: pool_tau is the temperature of channel_pool='lme' (channel_pool is "
                                 f"{channel_pool!r}), got {pool_tau!r}")
            pool_tau = 1.0 if pool_tau is None else pool_tau
            if isinstance(pool_tau, bool) or not isinstance(pool_tau, (int, float)) or not (
                    math.isfinite(pool_tau) and pool_tau > 0):
                raise ValueError(f"{name}: pool_tau must be a finite number > 0, got {pool_tau!r}")
        if ssm_input not in SSM_INPUTS:
            raise ValueError(f"{name}: ssm_input must be one of {', '.join(SSM_INPUTS)}, got {ssm_input!r}")
        if ssm_input == "features" and channel_source != "both":
            # with any other read-out the transformed channels would reach nothing (attention, hidden)
            # or the SSM layer nothing (input)
            raise ValueError(f"{name}: ssm_input='features' needs pool='channels' and channel_source='both', "
                             f"got pool={pool!r}, channel_source={channel_source!r}")
        self.ssm_input = ssm_input
        self.in_dim, self.n_outputs = in_dim, n_outputs
        self.pool_name, self.pool_k = pool, pool_k
        self.channel_source, self.channel_pool = channel_source, channel_pool
        self.pool_tau = None if pool_tau is None else float(pool_tau)
        self.input_shrink = float(input_shrink)
        # Options (off by default, i.e. the published model): a LayerNorm of the input features (no
        # affine), a dense local_mix x local_mix convolution of the embedded grid before the SSM layers
        # (h + ReLU(conv(h)), empty cells 0), top-k pooling of per-patch logits instead of attention.
        self.input_norm = nn.LayerNorm(in_dim, elementwise_affine=False) if input_norm else None
        # input_ica: the features enter as their input_ica independent components, fitted on the
        # training patches before training (fit_input_transform; the trainer calls it); until then
        # the transform keeps the first input_ica features.
        self.input_ica, self.input_ica_restarts = input_ica, input_ica_restarts
        if input_ica:
            self.register_buffer("ica_mean", torch.zeros(in_dim))
            self.register_buffer("ica_unmix", torch.eye(in_dim, input_ica))
            self.register_buffer("ica_fitted", torch.zeros((), dtype=torch.bool))
        # input_cooc: next to the (transformed) inputs z (N, n), their n * n co-occurrences with the
        # 4-neighbours' (models/cooc.py: max over neighbours j of op(z_i[c], z_j[d])), before the embedding.
        self.input_cooc = input_cooc or None
        n_in = input_ica or in_dim
        n_model = n_in + (n_in * n_in if self.input_cooc else 0)
        # ssm_input="features": the SSM layers embed the input features themselves (after input_norm),
        # as the published model; the transformed channels (ICA, co-occurrences) reach only the read-out.
        self.embed = embedding(in_dim if ssm_input == "features" else n_model, dim, dropout)
        self.local = nn.Conv2d(dim, dim, local_mix, padding=local_mix // 2) if local_mix else None
        self.norms = nn.ModuleList(nn.RMSNorm(dim, eps=1e-5) for _ in range(n_layers))
        self.layers = nn.ModuleList(
            TwoDMambaLayer(dim, d_inner, d_state, dt_rank, d_conv, scan=scan, backend=backend, checkpoint=checkpoint)
            for _ in range(n_layers))
        self.pool = GatedAttention(dim, attn_dim) if pool == "attention" else None
        if pool == "channels":
            # pool="channels": each per-patch channel (the model's transformed input x, its residual
            # stream h after the SSM layers, or both) is pooled over the bag's patches on its own, and a
            # linear layer, zero at the start, reads the pooled channels (see channel_readout).
            self.norm = None
            n_read = {"input": n_model, "hidden": dim}
            self.classifier = nn.Linear(sum(n_read[s] for s in n_read if channel_source in (s, "both")), n_outputs)
            init_linear_(self.embed)
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)
        else:
            self.norm = nn.LayerNorm(dim)
            self.classifier = nn.Linear(dim, n_outputs)
            # embed, pool, classifier: the order of the published model's initialisation (the random
            # draws follow it; another order gives other initial weights for the same seed)
            init_linear_(self.embed, *([self.pool] if self.pool is not None else []), self.classifier)

    @property
    def scan_backend(self) -> Optional[str]:
        """"kernel" or "reference": the backend the scan ran on in the last forward (None before)."""
        return self.layers[0].last_backend

    def forward(self, bag: Bag) -> MILOutput:
        check_bag(self, bag)
        x = self._model_input(bag)
        if self.pool_name == "channels":
            parts = [x] if self.channel_source in ("input", "both") else []
            if self.channel_source in ("hidden", "both"):
                parts.append(self._hidden(bag, self._ssm_features(bag) if self.ssm_input == "features" else x))
            u = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            return channel_readout(u, self.classifier, self.channel_pool, self.pool_k, self.pool_tau)
        h = self._hidden(bag, x)
        if self.pool is None:
            return topk_instance_pool(self.classifier(self.norm(h)), self.pool_k)
        # One low-precision copy of the normed patches under autocast: attention_v, attention_u and
        # the pooling matmul would each cast (and save) their own bf16 copy of a float32 input.
        scores, pooled = self.pool(_to_autocast_dtype(self.norm(h)))
        return MILOutput(self.classifier(pooled)[None], scores)

    def _model_input(self, bag: Bag) -> Tensor:
        """(N, n_in): the bag's features after the input transform, with the co-occurrence channels
        (input_cooc) appended: what the embedding reads."""
        x = self._transform_input(bag.features)
        if self.input_cooc:
            x = torch.cat([x, torch.cat([neighbour_cooc(slide, xs, self.input_cooc)
                                         for slide, xs in zip(bag.slides, bag.split(x))])], 1)
        return x

    def _ssm_features(self, bag: Bag) -> Tensor:
        """(N, in_dim): what the embedding reads with ssm_input="features": the features after input_norm."""
        x = bag.features
        return self.input_norm(x) if self.input_norm is not None else x

    def _hidden(self, bag: Bag, x: Tensor) -> Tensor:
        """(N, dim): the residual stream after the SSM layers (before the final LayerNorm) for the
        embedding's input ``x`` (:meth:`_model_input`, or :meth:`_ssm_features` with ssm_input="features")."""
        dev = bag.features.device.type
        h = embed_patches(self.embed, x)
        if torch.is_autocast_enabled(dev):
            h = h.float()  # the residual stream stays float32 (N x dim, small); the grids go low-precision
        if self.local is not None:
            h = torch.cat([self._local(slide, hs) for slide, hs in zip(bag.slides, bag.split(h))])
        return torch.cat([self._mix(slide, hs) for slide, hs in zip(bag.slides, bag.split(h))])

    def _transform_input(self, x: Tensor) -> Tensor:
        """input_norm, then the ICA transform, where the model has them."""
        if self.input_norm is not None:
            x = self.input_norm(x)
        if self.input_ica:
            x = (x - self.ica_mean.to(x.dtype)) @ self.ica_unmix.to(x.dtype)
        if self.input_shrink:
            x = torch.relu(x - self.input_shrink)
        return x

    @property
    def needs_input_fit(self) -> bool:
        """Whether the model has an input transform fitted on training patches (input_ica)."""
        return bool(self.input_ica)

    @torch.no_grad()
    def fit_input_transform(self, features: Tensor, seed: int = 0) -> None:
        """Fit the input_ica transform on (N, in_dim) training patch features (no labels). A no-op
        without input_ica. Raises ValueError naming ``features`` for a wrong shape."""
        if not self.input_ica:
            return
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"features: expected (N, in_dim={self.in_dim}), got {tuple(features.shape)}")
        from .ica import fit_ica

        x = features.to(self.ica_mean.device, torch.float64)
        if self.input_norm is not None:
            x = self.input_norm(x)
        mean, unmix, _ = fit_ica(x, self.input_ica, seed=seed, restarts=self.input_ica_restarts)
        self.ica_mean.copy_(mean)
        self.ica_unmix.copy_(unmix)
        self.ica_fitted.fill_(True)

    def _local(self, slide: SlideGrid, h: Tensor) -> Tensor:
        """h + ReLU(conv(h)) on the slide's grid (empty cells 0 in and ignored out): (N, dim) -> (N, dim)."""
        grid = slide.scatter(h)[None]
        return h + torch.relu(slide.gather(self.local(grid.to(self.local.weight.dtype))[0]).to(h.dtype))

    def _mix(self, slide: SlideGrid, h: Tensor) -> Tensor:
        """(N, dim) patches of one slide -> (N, dim) after the residual SSM layers."""
        mask = slide.mask[None]
        for norm, layer in zip(self.norms, self.layers):
            grid = slide.scatter(_norm_to_grid(norm, h))[None]  # (1, dim, H, W), empty cells 0
            out = layer(grid, mask)
            del grid  # the layer keeps its own reference; nothing else needs the dense grid
            h = h + slide.gather(out[0])
            del out  # the dense output grid (C x H x W) is not needed once gathered (next layer's peak)
        return h


def topk_instance_pool(patch_logits: Tensor, k: int) -> MILOutput:
    """Bag logits = the mean of the ``k`` largest per-patch logits of each output (k = 1: max pooling;
    all patches when the bag has fewer). Scores: each patch's logit of the class the bag predicts.

    Args: patch_logits (N, n_outputs); k >= 1."""
    if k < 1:
        raise ValueError(f"k: need >= 1, got {k}")
    kk = min(k, patch_logits.shape[0])
    logits = patch_logits.topk(kk, dim=0).values.mean(0)[None]
    return MILOutput(logits, patch_logits[:, int(logits.argmax(dim=1))])


def pool_channels(u: Tensor, how: str, k: int = 1, tau: float = 1.0) -> Tensor:
    """Pools each channel of per-patch values ``u`` (N, C) over the N patches on its own -> (C,).

    ``how``: "topk", the mean of the ``k`` largest values of the channel (all N when N < k; k = 1 is the
    maximum); "lme", the log-mean-exp ``log(mean_i exp(tau * u[i, c])) / tau`` (a soft maximum: the mean
    as tau -> 0, the maximum as tau -> inf). Computed in float32 at least.
    Raises ValueError naming ``u``, ``how``, ``k`` or ``tau``."""
    if how not in CHANNEL_POOLS:
        raise ValueError(f"how: must be one of {', '.join(CHANNEL_POOLS)}, got {how!r}")
    if not isinstance(u, Tensor) or u.dim() != 2 or u.shape[0] < 1:
        raise ValueError(f"u: expected an (N, C) tensor with N >= 1, got {getattr(u, 'shape', type(u).__name__)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be an integer >= 1, got {k!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau: must be a finite number > 0, got {tau!r}")
    ua = u if u.dtype == torch.float64 else u.float()
    if how == "topk":
        return ua.topk(min(k, ua.shape[0]), dim=0).values.mean(0)
    return (torch.logsumexp(tau * ua, dim=0) - math.log(ua.shape[0])) / tau


def channel_readout(u: Tensor, classifier: nn.Linear, how: str, k: int = 1, tau: float = 1.0) -> MILOutput:
    """The bag logits ``classifier(pool_channels(u))`` (1, n_outputs) for per-patch channels ``u``
    (N, C); scores: each patch's ``u_i . w`` with w the classifier's weight row of the class the bag
    predicts (what the patch's channels weigh towards that class where they are pooled)."""
    pooled = pool_channels(u, how, k, tau)
    logits = classifier(pooled.to(classifier.weight.dtype))[None]
    w = classifier.weight[int(logits.argmax(dim=1))]
    return MILOutput(logits, u.to(w.dtype) @ w)


class TwoDMambaMIL(_SSMMIL):
    """2DMambaMIL: the 2DMamba scan (rows then columns) on each slide's tissue-cropped grid.

    Args: in_dim (encoder feature dim), n_outputs (classes, or time bins for survival), dim 128,
    d_inner 256, d_state 16, n_layers 1, dropout 0.25 (the published setting); keyword-only:
    dt_rank (ceil(dim/16)), d_conv 3 (depthwise 3x3), attn_dim 128, backend ("auto"/"kernel"/
    "reference"), checkpoint (True/False/"auto": recompute each layer in the backward when the plain
    layer would keep more than 4 GiB for it; TwoDMambaLayer.plain_layer_saved_bytes). forward(bag) -> MILOutput(logits (1, n_outputs), scores (N_total,)).

    Options, off by default (the published model): input_norm (LayerNorm of the input features,
    no affine), local_mix (odd kernel size k: h + ReLU(conv_k x k(h)) on the embedded grid before
    the SSM layers, a dense convolution over dim channels; 0 off), pool ("attention": gated
    attention; "topk": a per-patch classifier whose logits are averaged over the pool_k highest
    patches of each output, pool_k 1 being max pooling), input_ica (n: the features enter as their
    n independent components of highest kurtosis, fitted on the training patches before training;
    see :mod:`ssm2d_path.models.ica`; 0 off; input_ica_restarts r: FastICA from r random starts, the
    one of largest summed |kurtosis| kept, default 1), input_shrink (t > 0: each input value x enters as
    max(x - t, 0), after the ICA when there is one: only the upper tail of each component; 0 off),
    input_cooc ("min" or "prod", true meaning "min": next to the n transformed input channels z,
    n * n local co-occurrence channels, max over the 4-neighbours j of op(z_i[c], z_j[d]), see
    :mod:`ssm2d_path.models.cooc`; meant after input_ica with a few components; false off).
    pool="channels": a per-channel bag read-out: every per-patch channel named by channel_source
    ("hidden", the default: the dim channels of the residual stream after the SSM layers, before the
    final LayerNorm; "input": the model's input channels, i.e. the transformed features and their
    co-occurrences, without the SSM; "both") is pooled over the bag's patches on its own by
    channel_pool ("topk", the default: mean of the pool_k largest values; "lme": log-mean-exp at
    temperature pool_tau, default 1) and a linear layer (zero-initialised) reads the pooled channels;
    see :func:`pool_channels`, :func:`channel_readout`. ssm_input ("model", the default: the SSM layers
    embed the model's input channels, i.e. what channel_source="input" reads; "features": they embed
    the input features themselves, after input_norm, as the published model does, and the transformed
    channels reach only the read-out; needs channel_source="both").
    """

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 128, d_inner: int = 256, d_state: int = 16,
                 n_layers: int = 1, dropout: float = 0.25, **kwargs):
        kwargs.setdefault("scan", "scan2d")
        if kwargs["scan"] != "scan2d":
            raise ValueError("TwoDMambaMIL: scan is 'scan2d' (use M2DMIL for the Mamba2D scan)")
        super().__init__(in_dim, n_outputs, dim, d_inner, d_state, n_layers, dropout, **kwargs)


class M2DMIL(_SSMMIL):
    """TwoDMambaMIL with the Mamba2D (wavefront2d) scan; same arguments. The grid is the
    tissue-cropped one (that scan is not transparent to empty rows/columns before the tissue)."""

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 128, d_inner: int = 256, d_state: int = 16,
                 n_layers: int = 1, dropout: float = 0.25, **kwargs):
        if kwargs.setdefault("scan", "wavefront2d") != "wavefront2d":
            raise ValueError("M2DMIL: scan is 'wavefront2d'")
        super().__init__(in_dim, n_outputs, dim, d_inner, d_state, n_layers, dropout, **kwargs)


class MambaMIL(_SSMMIL):
    """The 1D baseline: Mamba's selective scan over each slide's tissue patches in raster order
    (row, then column), i.e. scan2d on a 1 x N grid with no empty cells; depthwise conv (1, 3) along
    the sequence. Same arguments and pooling as TwoDMambaMIL."""

    layout = "sequence"

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 128, d_inner: int = 256, d_state: int = 16,
                 n_layers: int = 1, dropout: float = 0.25, **kwargs):
        kwargs.setdefault("d_conv", (1, 3))
        if kwargs.setdefault("scan", "scan2d") != "scan2d":
            raise ValueError("MambaMIL: scan is 'scan2d' (on a 1 x N grid)")
        if kwargs.get("local_mix", 0):
            raise ValueError("MambaMIL: local_mix is a 2D convolution of the slide's grid; the 1D model takes 0")
        super().__init__(in_dim, n_outputs, dim, d_inner, d_state, n_layers, dropout, **kwargs)

    def _mix(self, slide: SlideGrid, h: Tensor) -> Tensor:
        order, inverse = slide.raster_order()
        for norm, layer in zip(self.norms, self.layers):
            seq = _norm_to_grid(norm, h)[order].t()[None, :, None, :]  # (1, dim, 1, N) raster order
            out = layer(seq, None)
            h = h + out[0, :, 0, :].t()[inverse]
        return h
