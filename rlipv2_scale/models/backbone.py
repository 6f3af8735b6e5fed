"""Image backbones (timm) returning three feature levels with strides 8 / 16 / 32.

- `resnet50`: torchvision-layout ResNet-50 (timm), every BatchNorm frozen (weights become buffers)
  and the stem + layer1 frozen, as in the original (`models/DDETR_backbone.py`).
- `swin_tiny` / `swin_large`: timm Swin (window 7) accepting any input size (padding to the patch
  size here, to window multiples inside timm), stages 2-4 each followed by its own LayerNorm; all
  norms and relative-position tables frozen, as in the original.
- `tiny_resnet`: a small ResNet of basic blocks with GroupNorm, randomly initialised and fully
  trainable (a frozen random backbone cannot learn).

The timm model is held as `body`, so checkpoint keys read `backbone.body.<timm name>`.
"""
from __future__ import annotations

from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.models.resnet import BasicBlock, ResNet
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlipv2_scale.errors import ConfigError, UserError
from rlipv2_scale.models.config import BackboneConfig

_SWIN_ARCH = {"swin_tiny": "swin_tiny_patch4_window7_224", "swin_large": "swin_large_patch4_window7_224"}
_SWIN_FROZEN = ("norm", "relative_position_bias_table", "absolute_pos_embed")


def _downsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


def _timm_model(arch: str, weights: str | None, pretrained: bool, **kwargs) -> nn.Module:
    """`weights` is a timm id such as "resnet50.tv_in1k"; downloaded only when `pretrained`."""
    name = weights if weights else arch
    if weights and weights.split(".")[0] != arch:
        raise ConfigError(f"backbone.pretrained_weights '{weights}' is not a checkpoint of '{arch}'; "
                          f"use an id of the form '{arch}.<tag>'")
    if not (pretrained and weights):
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except OSError as exc:   # not cached and no Hub (LocalEntryNotFoundError), download failed (HTTP / URL errors)
        hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or name
        raise UserError(f"the backbone weights '{name}' (model.backbone.pretrained_weights) are not in the Hugging "
                        f"Face cache and could not be downloaded ({type(exc).__name__}): download them where the Hub "
                        f"is reachable (`huggingface-cli download {hub_id}`, into the cache this machine uses: "
                        f"HF_HOME / HF_HUB_CACHE), or train the backbone from scratch with "
                        f"model.backbone.pretrained_weights=null (and model.backbone.freeze_pretrained_parts=false)") \
            from None


class PadThenShiftSwinBlock(SwinTransformerBlock):
    """Swin block that pads to window multiples *before* the cyclic shift, as the original detection
    backbone does, so the shift wraps around the padded map and the shifted-window mask matches
    it (timm shifts first and pads after). Identical to timm when the map is a window multiple.
    """

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, c = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        _, hp, wp, _ = x.shape
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        mask = self.get_attn_mask(x) if shifted else None
        windows = window_partition(x, self.window_size).view(-1, self.window_area, c)
        windows = self.attn(windows, mask=mask).view(-1, wh, ww, c)
        x = window_reverse(windows, self.window_size, hp, wp)
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :h, :w, :].contiguous()


def _group_norm(num_channels: int, **kwargs) -> nn.GroupNorm:
    # GroupNorm rather than BatchNorm: the tiny model trains with batches of a few padded images.
    return nn.GroupNorm(min(8, num_channels), num_channels, **kwargs)


def _stage_width(stage: nn.Sequential) -> int:
    block = stage[-1]
    conv = block.conv2 if isinstance(block, BasicBlock) else block.conv3   # timm: BasicBlock or Bottleneck
    assert isinstance(conv, nn.Conv2d)
    return conv.out_channels


class Backbone(nn.Module):
    """Backbone + padding masks per level: `forward(images, pixel_mask) -> [(feature, mask)] * 3`.

    `body` is the timm model (keys `backbone.body.<timm name>`); Swin adds `norms`, one LayerNorm
    per output stage.
    """

    def __init__(self, cfg: BackboneConfig, pretrained: bool = True):
        super().__init__()
        self.checkpointing = cfg.checkpointing
        self.is_swin = cfg.name in _SWIN_ARCH
        if cfg.name == "resnet50":
            body = _timm_model("resnet50", cfg.pretrained_weights, pretrained)
            self.body = freeze_batch_norm_2d(body)   # the original's FrozenBatchNorm2d everywhere
            if cfg.freeze_pretrained_parts:
                for name, p in self.body.named_parameters():
                    if name.startswith(("conv1.", "bn1.", "layer1.")):
                        p.requires_grad_(False)
        elif self.is_swin:
            self.body = _timm_model(_SWIN_ARCH[cfg.name], cfg.pretrained_weights, pretrained,
                                    strict_img_size=False, always_partition=True, drop_path_rate=cfg.drop_path)
            self.body.norm = nn.Identity()   # the classification norm is not used
            for stage in self.body.layers:
                for block in stage.blocks:
                    block.__class__ = PadThenShiftSwinBlock
            dims = [int(self.body.embed_dim * 2 ** i) for i in range(len(self.body.layers))]
            self.norms = nn.ModuleList(nn.LayerNorm(d) for d in dims[1:])
            if cfg.checkpointing:
                self.body.set_grad_checkpointing(True)
            if cfg.freeze_pretrained_parts:
                for name, p in self.named_parameters():
                    if any(key in name for key in _SWIN_FROZEN):
                        p.requires_grad_(False)
        elif cfg.name == "tiny_resnet":
            c = cfg.channels
            # timm annotates `block` as an instance (Union[BasicBlock, Bottleneck]); it takes the class
            self.body = ResNet(BasicBlock, (1, 1, 1, 1), channels=c, stem_width=c[0], num_classes=0,  # type: ignore[arg-type]
                               norm_layer=_group_norm)
        else:  # pragma: no cover - Literal-checked by the config loader
            raise ConfigError(f"unknown backbone.name '{cfg.name}'")
        if self.is_swin:
            self.num_channels = dims[1:]
        else:
            self.num_channels = [_stage_width(self.body.layer2), _stage_width(self.body.layer3),
                                 _stage_width(self.body.layer4)]

    def _resnet(self, images: torch.Tensor) -> list[torch.Tensor]:
        b = self.body
        x = b.maxpool(b.act1(b.bn1(b.conv1(images))))
        outs = []
        for i, stage in enumerate((b.layer1, b.layer2, b.layer3, b.layer4)):
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            if i >= 1:
                outs.append(x)
        return outs

    def _swin(self, images: torch.Tensor) -> list[torch.Tensor]:
        ph, pw = self.body.patch_embed.patch_size
        h, w = images.shape[-2:]
        images = F.pad(images, (0, (pw - w % pw) % pw, 0, (ph - h % ph) % ph))
        x = self.body.patch_embed(images)   # NHWC
        outs = []
        for i, stage in enumerate(self.body.layers):
            x = stage(x)
            if i >= 1:
                outs.append(self.norms[i - 1](x).permute(0, 3, 1, 2).contiguous())
        return outs

    def forward(self, images: torch.Tensor, pixel_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        feats = self._swin(images) if self.is_swin else self._resnet(images)
        return [(f, _downsample_mask(pixel_mask, f.shape[-2:])) for f in feats]
