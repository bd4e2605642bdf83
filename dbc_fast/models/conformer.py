"""Conformer (Peng et al., ICCV 2021) written to match the official implementation module for module.

The module tree, parameter/buffer names and shapes, initialisation scheme and numerics follow
pengzhiliang/Conformer ``conformer.py``, so official ImageNet checkpoints load with strict checks
(``dbc_fast.load_pretrained``). Differences that do not change the state_dict or the results:

* attention uses ``F.scaled_dot_product_attention`` and can also return the class-token row of the
  attention probabilities (softmax(q_cls K^T / sqrt(d)) averaged over heads) without forming the full
  N x N matrix; that row is what DBC's M_a and TS-CAM's attention map are built from;
* the stages ``conv_trans_2 .. conv_trans_12`` are reached by name (getattr), not ``eval``, so
  ``torch.compile`` traces the forward;
* ``forward`` returns a tuple ``(conv_logits, trans_logits)`` (the official code returns a 2-list);
* ``forward_features`` exposes the intermediate tensors DBC needs (F*, class-token attention rows).

The four registered variants are also timm models (``timm.create_model("conformer_tiny_patch16")``).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

# name -> constructor arguments of the official variants (models.py of the official repo)
ARCH_CONFIGS: Dict[str, dict] = {
    "conformer_tiny_patch16": dict(patch_size=16, channel_ratio=1, embed_dim=384, depth=12, num_heads=6),
    "conformer_small_patch16": dict(patch_size=16, channel_ratio=4, embed_dim=384, depth=12, num_heads=6),
    "conformer_small_patch32": dict(patch_size=32, channel_ratio=4, embed_dim=384, depth=12, num_heads=6),
    "conformer_base_patch16": dict(patch_size=16, channel_ratio=6, embed_dim=576, depth=12, num_heads=9),
}

# the two classifier heads, re-initialised when a checkpoint's class count differs from the model's
CLASSIFIER_PREFIXES = ("conv_cls_head", "trans_cls_head")


def check_images(x: torch.Tensor, multiple: int = 32) -> None:
    """Raises ValueError unless ``x`` is an [n, 3, H, W] float batch with H and W multiples of ``multiple``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor [n,3,H,W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"images must have 4 dims [n,3,H,W], got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (RGB, ImageNet-normalised), got shape {tuple(x.shape)}")
    h, w = x.shape[2], x.shape[3]
    if h % multiple != 0 or w % multiple != 0 or h == 0 or w == 0:
        raise ValueError(f"image height and width must be positive multiples of {multiple}, got {h}x{w}")
    if not x.is_floating_point():
        raise ValueError(f"images must be a floating point tensor, got {x.dtype}")


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention; optionally also the head-averaged class-token row of the probabilities."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, need_cls_attn: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [b, heads, n, d]; one backward (stack) instead of three zero-filled selects
        drop = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
        cls_attn: Optional[torch.Tensor] = None
        if need_cls_attn:
            # row 0 of softmax(q k^T * scale): [b, heads, 1, n] -> mean over heads -> [b, n]; O(n) memory
            logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)
            cls_attn = logits.float().softmax(dim=-1).mean(dim=1).squeeze(1)
        return out, cls_attn


class Block(nn.Module):
    """Pre-norm transformer block (official ``Block``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, need_cls_attn: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        attn_out, cls_attn = self.attn(self.norm1(x), need_cls_attn)
        x = x + self.drop_path(attn_out)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, cls_attn


class ConvBlock(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1, expansion 4); the 3x3 input can get the transformer's features added."""

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1, res_conv: bool = False, groups: int = 1):
        super().__init__()
        med_planes = outplanes // 4
        norm_layer = partial(nn.BatchNorm2d, eps=1e-6)
        self.conv1 = nn.Conv2d(inplanes, med_planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = norm_layer(med_planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(med_planes, med_planes, kernel_size=3, stride=stride, groups=groups, padding=1,
                               bias=False)
        self.bn2 = norm_layer(med_planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(med_planes, outplanes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.act3 = nn.ReLU(inplace=True)
        if res_conv:
            self.residual_conv = nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, padding=0, bias=False)
            self.residual_bn = norm_layer(outplanes)
        self.res_conv = res_conv

    def forward(self, x: torch.Tensor, x_t: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (block output, the 3x3 branch's activation x2 that feeds the FCU down path)."""
        residual = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.conv2(x) if x_t is None else self.conv2(x + x_t)
        x2 = self.act2(self.bn2(x))
        x = self.bn3(self.conv3(x2))
        if self.res_conv:
            residual = self.residual_bn(self.residual_conv(residual))
        x = self.act3(x + residual)
        return x, x2


class FCUDown(nn.Module):
    """CNN feature map -> patch tokens (1x1 conv, average pool, LayerNorm, GELU), class token prepended."""

    def __init__(self, inplanes: int, outplanes: int, dw_stride: int):
        super().__init__()
        self.dw_stride = dw_stride
        self.conv_project = nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=1, padding=0)
        self.sample_pooling = nn.AvgPool2d(kernel_size=dw_stride, stride=dw_stride)
        self.ln = nn.LayerNorm(outplanes, eps=1e-6)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        x = self.sample_pooling(self.conv_project(x)).flatten(2).transpose(1, 2)
        x = self.act(self.ln(x))
        return torch.cat([x_t[:, :1], x], dim=1)


class FCUUp(nn.Module):
    """Patch tokens -> CNN feature map (1x1 conv, BatchNorm, ReLU, nearest upsampling)."""

    def __init__(self, inplanes: int, outplanes: int, up_stride: int):
        super().__init__()
        self.up_stride = up_stride
        self.conv_project = nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=1, padding=0)
        self.bn = nn.BatchNorm2d(outplanes, eps=1e-6)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x_r = x[:, 1:].transpose(1, 2).reshape(b, c, h, w)
        x_r = self.act(self.bn(self.conv_project(x_r)))
        return F.interpolate(x_r, size=(h * self.up_stride, w * self.up_stride))


class ConvTransBlock(nn.Module):
    """One Conformer stage: CNN block, FCU down, transformer block, FCU up, fusion CNN block."""

    def __init__(self, inplanes: int, outplanes: int, res_conv: bool, stride: int, dw_stride: int, embed_dim: int,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 last_fusion: bool = False, groups: int = 1):
        super().__init__()
        self.cnn_block = ConvBlock(inplanes, outplanes, stride=stride, res_conv=res_conv, groups=groups)
        if last_fusion:
            self.fusion_block = ConvBlock(outplanes, outplanes, stride=2, res_conv=True, groups=groups)
        else:
            self.fusion_block = ConvBlock(outplanes, outplanes, groups=groups)
        self.squeeze_block = FCUDown(outplanes // 4, embed_dim, dw_stride=dw_stride)
        self.expand_block = FCUUp(embed_dim, outplanes // 4, up_stride=dw_stride)
        self.trans_block = Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                 qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=drop_path_rate)
        self.dw_stride = dw_stride
        self.embed_dim = embed_dim
        self.last_fusion = last_fusion

    def forward(self, x: torch.Tensor, x_t: torch.Tensor, need_cls_attn: bool = False):
        x, x2 = self.cnn_block(x)
        h, w = x2.shape[2], x2.shape[3]
        x_st = self.squeeze_block(x2, x_t)
        x_t, cls_attn = self.trans_block(x_st + x_t, need_cls_attn)
        x_t_r = self.expand_block(x_t, h // self.dw_stride, w // self.dw_stride)
        x, _ = self.fusion_block(x, x_t_r)
        return x, x_t, cls_attn


class Conformer(nn.Module):
    """Conformer backbone; ``forward(x) -> (conv_logits, trans_logits)`` like the official model."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000, base_channel: int = 64,
                 channel_ratio: int = 4, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if depth % 3 != 0:
            raise ValueError(f"Conformer depth must be a multiple of 3, got {depth}")
        if patch_size not in (16, 32):
            raise ValueError(f"Conformer patch_size must be 16 or 32, got {patch_size}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.depth = depth
        self.num_heads = num_heads

        # Registration order below is the official one: same state_dict order, and the same random
        # initialisation for the same seed.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.trans_dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # stochastic depth

        self.trans_norm = nn.LayerNorm(embed_dim)
        self.trans_cls_head = nn.Linear(embed_dim, num_classes)
        self.pooling = nn.AdaptiveAvgPool2d(1)
        self.conv_cls_head = nn.Linear(int(256 * channel_ratio), num_classes)

        # stem: 1/4 resolution, 64 channels
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # stage 1
        stage_channels = [int(base_channel * channel_ratio * m) for m in (1, 2, 4)]
        trans_dw_stride = patch_size // 4
        self.conv_1 = ConvBlock(64, stage_channels[0], stride=1, res_conv=True)
        self.trans_patch_conv = nn.Conv2d(64, embed_dim, kernel_size=trans_dw_stride, stride=trans_dw_stride,
                                          padding=0)
        self.trans_1 = Block(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                             qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                             drop_path=self.trans_dpr[0])

        # stages 2 .. depth, in three groups: CNN resolution 1/4, 1/8, 1/16 (the last fusion goes to 1/32)
        per_group = depth // 3
        self.stage_names: List[str] = []
        for i in range(2, depth + 1):
            group = (i - 1) // per_group  # 0, 1, 2
            first_of_group = group > 0 and (i - 1) % per_group == 0
            in_channel = stage_channels[group - 1] if first_of_group else stage_channels[group]
            block = ConvTransBlock(
                in_channel, stage_channels[group], res_conv=first_of_group, stride=2 if first_of_group else 1,
                dw_stride=trans_dw_stride // (2 ** group), embed_dim=embed_dim, num_heads=num_heads,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate,
                attn_drop_rate=attn_drop_rate, drop_path_rate=self.trans_dpr[i - 1], last_fusion=(i == depth))
            name = f"conv_trans_{i}"
            self.add_module(name, block)
            self.stage_names.append(name)
        self.fin_stage = depth + 1

        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"cls_token"}

    def reset_classifier(self, num_classes: int) -> None:
        """New randomly initialised heads (official init) for ``num_classes`` classes."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        device = self.conv_cls_head.weight.device
        self.num_classes = num_classes
        self.trans_cls_head = nn.Linear(self.embed_dim, num_classes, device=device)
        self.conv_cls_head = nn.Linear(self.conv_cls_head.in_features, num_classes, device=device)
        for head in (self.trans_cls_head, self.conv_cls_head):
            self._init_weights(head)

    def token_grid(self, h: int, w: int) -> Tuple[int, int]:
        """Patch-token grid (rows, cols) for an input of h x w pixels."""
        return h // self.patch_size, w // self.patch_size

    def forward_features(self, x: torch.Tensor, need_cls_attn: bool = False,
                         fstar_block: int = 0) -> Dict[str, torch.Tensor]:
        """Runs both branches.

        Returns a dict with ``conv_feat`` (final CNN map [n,C,H/32,W/32]), ``tokens`` (final tokens, before
        ``trans_norm``, [n,1+N,D]); ``fstar`` (CNN output of block ``fstar_block``, 1 = stage 1 .. depth) when
        fstar_block > 0; ``cls_attn`` [n, depth, 1+N] (class-token attention row of every transformer block,
        averaged over heads, fp32) when need_cls_attn.
        """
        check_images(x, 32 if self.patch_size == 32 else 16)
        if fstar_block < 0 or fstar_block > self.depth:
            raise ValueError(f"fstar_block must be in 1..{self.depth} (0 = not needed), got {fstar_block}")
        out: Dict[str, torch.Tensor] = {}
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x_base = self.maxpool(self.act1(self.bn1(self.conv1(x))))

        x, _ = self.conv_1(x_base)
        x_t = self.trans_patch_conv(x_base).flatten(2).transpose(1, 2)
        x_t = torch.cat([cls_tokens.to(x_t.dtype), x_t], dim=1)
        x_t, cls_attn = self.trans_1(x_t, need_cls_attn)
        attn_rows: List[torch.Tensor] = []
        if cls_attn is not None:
            attn_rows.append(cls_attn)
        if fstar_block == 1:
            out["fstar"] = x

        for index, name in enumerate(self.stage_names):
            x, x_t, cls_attn = getattr(self, name)(x, x_t, need_cls_attn)
            if cls_attn is not None:
                attn_rows.append(cls_attn)
            if fstar_block == index + 2:
                out["fstar"] = x

        out["conv_feat"] = x
        out["tokens"] = x_t
        if need_cls_attn:
            out["cls_attn"] = torch.stack(attn_rows, dim=1)
        return out

    def forward_head(self, conv_feat: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        conv_logits = self.conv_cls_head(self.pooling(conv_feat).flatten(1))
        trans_logits = self.trans_cls_head(self.trans_norm(tokens)[:, 0])
        return conv_logits, trans_logits

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feats = self.forward_features(x)
        return self.forward_head(feats["conv_feat"], feats["tokens"])


def build_conformer(arch: str, num_classes: int = 1000, **kwargs) -> Conformer:
    """One of ``ARCH_CONFIGS``' variants (qkv_bias=True, mlp_ratio=4, as the official registrations)."""
    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown Conformer arch {arch!r}; choose one of {', '.join(ARCH_CONFIGS)}")
    allowed = {"in_chans", "drop_rate", "attn_drop_rate", "drop_path_rate", "qk_scale"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown Conformer option(s) {unknown}; allowed: {sorted(allowed)}")
    return Conformer(num_classes=num_classes, mlp_ratio=4.0, qkv_bias=True, **ARCH_CONFIGS[arch], **kwargs)

