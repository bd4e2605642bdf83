"""DBC (paper section 3) and its baselines (cls, CAM, TS-CAM) on the Conformer backbone.

``create_model(arch, num_classes, method="dbc", **options)``; ``model(images, labels=None, map_classes=None)``
returns a dict (see docs/model.md). The DBC head's pooling and contrastive losses go through
``dbc_fast.ops`` (one ``masked_pool`` call for both masks, one ``contrastive_losses`` call) so the fused
Triton/CUDA backends are used where available.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .conformer import ARCH_CONFIGS, Conformer, build_conformer, check_images

METHODS = ("dbc", "cls", "cam", "tscam")
CLASS_SPECIFIC_METHODS = ("cam", "tscam")  # their map depends on the class asked for (map_classes)

# option name -> paper default (section 3 / 4.1)
DEFAULT_OPTIONS: Dict[str, object] = {
    "fstar_block": 11,        # CNN block whose output is F* (the last 14x14 one at 224 input)
    "mc_kernel_size": 3,      # kernel of the one-channel conv that gives M_c (Eq. 6): 1, 3 or 5
    "norm": "minmax",         # normalisation of M_c: "minmax" per image, or "sigmoid"
    "lambda_pos": 1.0,        # weight of L_pos (Eq. 13)
    "lambda_neg": 0.1,        # weight of L_neg = L_neg^c + L_neg^t (Eq. 13)
    "negatives": "cross",     # "cross": all n x n pairs (Eq. 11); "within": i = j only
    "gather_negatives": False,  # under torch.distributed: pairs span every rank's images (global batch)
    "cls_loss": "auto",       # Eq. 3 NLL of log((p_t+p_c)/2) "prob_mean"; "ce_mean" (official Conformer);
                              # "logit_sum" (TS-CAM); auto = logit_sum for tscam, prob_mean otherwise
    "contrastive_eps": 5e-4,  # cosines clamped to [eps, 1-eps] (as C2AM)
    "map_source": "auto",     # dbc/cls map: "sum" (M_a+M_c, Eq. 7), "a" (M_a), "c" (M_c); auto = sum (dbc), a (cls)
    "ops_backend": "auto",    # dbc_fast.ops backend: auto | eager | triton | cpp
    "drop_path_rate": 0.1,    # stochastic depth of the transformer blocks
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "pretrained": None,       # path of an official Conformer ImageNet checkpoint (load_pretrained)
}

_CHOICES = {
    "mc_kernel_size": (1, 3, 5),
    "norm": ("minmax", "sigmoid"),
    "negatives": ("cross", "within"),
    "cls_loss": ("auto", "prob_mean", "ce_mean", "logit_sum"),
    "map_source": ("auto", "sum", "a", "c"),
    "ops_backend": ops.BACKEND_NAMES,
}

_MINMAX_EPS = 1e-12


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of [n, h, w] maps to [0, 1] (a constant map becomes 0)."""
    flat = x.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    return (x - lo) / (hi - lo).clamp_min(_MINMAX_EPS)


def _validate_options(method: str, options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options: {sorted(DEFAULT_OPTIONS)}")
    opts = dict(DEFAULT_OPTIONS)
    opts.update(options)
    for name, allowed in _CHOICES.items():
        if opts[name] not in allowed:
            raise ValueError(f"option {name}={opts[name]!r} is not one of {list(allowed)}")
    if not isinstance(opts["gather_negatives"], bool):
        raise ValueError(f"option gather_negatives must be True or False, got {opts['gather_negatives']!r}")
    fb = opts["fstar_block"]
    if isinstance(fb, bool) or not isinstance(fb, int) or not 1 <= fb <= 12:
        raise ValueError(f"option fstar_block must be an int in 1..12 (a Conformer block), got {fb!r}")
    for name in ("lambda_pos", "lambda_neg", "drop_path_rate", "drop_rate", "attn_drop_rate", "contrastive_eps"):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"option {name} must be a finite number >= 0, got {value!r}")
        opts[name] = float(value)
    for name in ("drop_path_rate", "drop_rate", "attn_drop_rate"):
        if opts[name] >= 1:
            raise ValueError(f"option {name} must be < 1, got {opts[name]}")
    if not opts["contrastive_eps"] < 0.5:
        raise ValueError(f"option contrastive_eps must be < 0.5, got {opts['contrastive_eps']}")
    if method == "cls":
        # cls = DBC with both contrastive losses off (paper Table 6)
        for name in ("lambda_pos", "lambda_neg"):
            if name in options and opts[name] != 0.0:
                raise ValueError(f"method 'cls' has no contrastive losses; {name}={options[name]} is not allowed")
            opts[name] = 0.0
    if opts["map_source"] == "auto":
        opts["map_source"] = "a" if method == "cls" else "sum"
    if opts["cls_loss"] == "auto":
        # TS-CAM trains and ranks classes with the sum of its two heads' logits
        opts["cls_loss"] = "logit_sum" if method == "tscam" else "prob_mean"
    return opts


class _GatherRows(torch.autograd.Function):
    """Every rank's rows of x [n_r, ...] concatenated in rank order (n_r may differ between ranks).

    Each rank then computes the same global loss from the gathered rows, so the gradient of this rank's rows
    is the slice of the incoming gradient that belongs to them; it is multiplied by the world size because
    DistributedDataParallel averages gradients over ranks (the average then is the global loss's gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        count = torch.tensor([x.shape[0]], device=x.device)
        counts = [torch.empty_like(count) for _ in range(world)]
        torch.distributed.all_gather(counts, count)
        counts = torch.cat(counts).tolist()  # the row counts are needed on the host to pad and slice
        padded = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        ctx.start, ctx.rows, ctx.world = sum(counts[:rank]), x.shape[0], world
        return torch.cat([part[:c] for part, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.start: ctx.start + ctx.rows] * ctx.world


def _distributed_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DBCModel(nn.Module):
    """Conformer + DBC head (method dbc/cls) or a CAM / TS-CAM baseline on the same backbone."""

    def __init__(self, arch: str, num_classes: int, method: str = "dbc", **options):
        super().__init__()
        if arch not in ARCH_CONFIGS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCH_CONFIGS)}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        opts = _validate_options(method, options)
        self.arch, self.method, self.num_classes, self.options = arch, method, num_classes, opts

        self.backbone: Conformer = build_conformer(
            arch, num_classes=num_classes, drop_path_rate=opts["drop_path_rate"], drop_rate=opts["drop_rate"],
            attn_drop_rate=opts["attn_drop_rate"])
        if method == "tscam":
            # TS-CAM on Conformer: the class-token classifier becomes a 3x3 conv over the patch-token map
            # whose per-class maps are the semantic-aware maps; trans logits = their GAP.
            head = nn.Conv2d(self.backbone.embed_dim, num_classes, kernel_size=3, stride=1, padding=1)
            Conformer._init_weights(head)
            self.backbone.trans_cls_head = head
        if method in ("dbc", "cls"):
            fstar_channels = self._fstar_channels(opts["fstar_block"])
            k = opts["mc_kernel_size"]
            self.mc_conv = nn.Conv2d(fstar_channels, 1, kernel_size=k, stride=1, padding=k // 2)
        if opts["pretrained"] is not None:
            from .pretrained import load_pretrained
            load_pretrained(self, opts["pretrained"])

    def no_weight_decay(self) -> set:
        """Parameter names timm's optimizer factory (create_optimizer_v2) keeps out of weight decay, besides the
        1-d ones (biases, norms) it leaves out itself: the backbone's class token, as official Conformer (which
        has no position embedding) and TS-CAM (class token and position embedding) do."""
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    def _fstar_channels(self, block: int) -> int:
        cnn = self.backbone.conv_1 if block == 1 else getattr(self.backbone, f"conv_trans_{block}").fusion_block
        return cnn.conv3.out_channels

    # ------------------------------------------------------------------------------------------------------
    def _class_log_probs(self, conv_logits: torch.Tensor, trans_logits: torch.Tensor) -> torch.Tensor:
        """The ``logits`` output: log((p_t+p_c)/2), or conv+trans logits for cls_loss="logit_sum"."""
        if self.options["cls_loss"] == "logit_sum":
            return conv_logits.float() + trans_logits.float()
        both = torch.stack([conv_logits.float().log_softmax(-1), trans_logits.float().log_softmax(-1)])
        return torch.logsumexp(both, dim=0) - math.log(2.0)

    def _cls_loss(self, logits, conv_logits, trans_logits, labels) -> torch.Tensor:
        if self.options["cls_loss"] == "ce_mean":
            return 0.5 * (F.cross_entropy(conv_logits.float(), labels) + F.cross_entropy(trans_logits.float(), labels))
        if self.options["cls_loss"] == "logit_sum":
            return F.cross_entropy(logits, labels)
        return F.nll_loss(logits, labels)

    @staticmethod
    def _check_classes(t: Optional[torch.Tensor], n: int, name: str) -> None:
        if t is None:
            return
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n or t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an integer tensor of shape [{n}], got {shape}")

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                map_classes: Optional[torch.Tensor] = None, return_features: bool = False) -> Dict[str, torch.Tensor]:
        check_images(images, 32)
        n, out_h, out_w = images.shape[0], images.shape[2] // 16, images.shape[3] // 16
        self._check_classes(labels, n, "labels")
        self._check_classes(map_classes, n, "map_classes")
        method, opts, bb = self.method, self.options, self.backbone
        dbc_like = method in ("dbc", "cls")

        feats = bb.forward_features(images, need_cls_attn=method != "cam",
                                    fstar_block=opts["fstar_block"] if dbc_like else 0)
        conv_feat, tokens = feats["conv_feat"], feats["tokens"]
        conv_logits = bb.conv_cls_head(bb.pooling(conv_feat).flatten(1))
        tokens = bb.trans_norm(tokens)
        gh, gw = bb.token_grid(images.shape[2], images.shape[3])
        semantic = None
        if method == "tscam":
            patch = tokens[:, 1:].transpose(1, 2).reshape(n, tokens.shape[2], gh, gw)
            semantic = bb.trans_cls_head(patch)  # [n, S, gh, gw]
            trans_logits = semantic.mean(dim=(2, 3))
        else:
            trans_logits = bb.trans_cls_head(tokens[:, 0])
        logits = self._class_log_probs(conv_logits, trans_logits)
        out: Dict[str, torch.Tensor] = {"logits": logits, "conv_logits": conv_logits, "trans_logits": trans_logits}

        # class-agnostic attention map: class-token row averaged over heads (in the block) and layers (Eq. 5)
        attn_map = None
        if method != "cam":
            attn_map = feats["cls_attn"].mean(dim=1)[:, 1:].reshape(n, gh, gw)

        if dbc_like:
            fstar = feats["fstar"]
            size = (fstar.shape[2], fstar.shape[3])
            if (gh, gw) != size:  # patch 32 or an early fstar_block: bring M_a to F*'s grid
                attn_map = F.interpolate(attn_map[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            map_a = minmax_normalize(attn_map)
            mc_raw = self.mc_conv(fstar)[:, 0].float()
            map_c = minmax_normalize(mc_raw) if opts["norm"] == "minmax" else torch.sigmoid(mc_raw)
            source = opts["map_source"]
            final = map_a if source == "a" else map_c if source == "c" else minmax_normalize(map_a + map_c)
            out.update(map=final, map_a=map_a, map_c=map_c)
            if return_features:
                out["feat_star"] = fstar
        else:
            if map_classes is None:
                map_classes = logits.argmax(dim=1)
            if method == "cam":
                # CAM (Zhou et al. 2016) of the CNN branch: conv classifier weights over the final CNN features
                weights = bb.conv_cls_head.weight[map_classes]  # [n, C]
                cam = torch.einsum("nc,nchw->nhw", weights.to(conv_feat.dtype), conv_feat).float()
            else:
                # TS-CAM semantic coupling: attention map x semantic-aware map of the class
                sem = semantic[torch.arange(n, device=semantic.device), map_classes].float()
                cam = attn_map * sem
            if cam.shape[1:] != (out_h, out_w):
                cam = F.interpolate(cam[:, None], size=(out_h, out_w), mode="bilinear", align_corners=False)[:, 0]
            out["map"] = minmax_normalize(cam)
            if return_features:
                out["feat_star"] = conv_feat

        if labels is not None:
            loss_cla = self._cls_loss(logits, conv_logits, trans_logits, labels)
            zero = loss_cla.new_zeros(())
            loss_neg_c = loss_neg_t = loss_pos = zero
            if dbc_like:
                # Eq. 8-9 with one masked_pool call for both masks, Eq. 11-12 with one contrastive_losses call
                fstar = feats["fstar"]
                masks = torch.stack([out["map_c"], out["map_a"]], dim=1).to(fstar.dtype)
                fg, bg = ops.masked_pool(fstar, masks, backend=opts["ops_backend"])
                if opts["gather_negatives"] and _distributed_world() > 1:
                    # the global batch: every rank's f and b, this rank's rows keeping their gradients
                    both = _GatherRows.apply(torch.stack([fg, bg], dim=1).contiguous())
                    fg, bg = both[:, 0], both[:, 1]
                loss_neg_c, loss_neg_t, loss_pos = ops.contrastive_losses(
                    fg[:, 0], bg[:, 0], fg[:, 1], bg[:, 1], negatives=opts["negatives"],
                    eps=opts["contrastive_eps"], backend=opts["ops_backend"])
                loss_neg_c, loss_neg_t, loss_pos = loss_neg_c.float(), loss_neg_t.float(), loss_pos.float()
            loss_neg = loss_neg_c + loss_neg_t
            # for cls the lambdas are 0: the terms are reported for monitoring and keep every parameter in the
            # graph (DDP needs no find_unused_parameters), but do not change the loss value or gradients
            loss = loss_cla + opts["lambda_neg"] * loss_neg + opts["lambda_pos"] * loss_pos
            out.update(loss=loss, loss_cla=loss_cla, loss_neg=loss_neg, loss_pos=loss_pos,
                       loss_neg_c=loss_neg_c, loss_neg_t=loss_neg_t)
        return out


def create_model(arch: str, num_classes: int, method: str = "dbc", **options) -> DBCModel:
    """A DBC model (method dbc | cls) or a baseline (cam | tscam) on Conformer ``arch``; see DEFAULT_OPTIONS."""
    return DBCModel(arch, num_classes, method=method, **options)
