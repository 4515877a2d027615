"""Diffusers UNet2DModel presets. A class-conditional model's null (unconditional) class is index
`num_classes`, so the embedding table has `num_classes + 1` rows (SPEC section 1). An unconditional model
(the generative-distillation paper's) is an `UnconditionalUNet2DModel`: no class embedding, and the class
labels every method passes (replay, distillation, evaluation) are not read."""
from __future__ import annotations

from typing import Dict

from diffusers import UNet2DModel

UNET_CONFIGS: Dict[str, dict] = {
    # CPU-sized: the embedded default and the tests (about 0.18M parameters at 16x16).
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8),
    # About 1M parameters: the larger benchmark model (32x32).
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=16, attention_head_dim=16),
    # The papers' UNet (the rank-1 paper and CCD use the same one): 128-256-256-256 channels, two
    # layers a block, attention in the 3rd down block, resnet down/upsampling (rank-1 official code,
    # src/ddim.py, ConditionalDDIM; CLoG's UNet config). Its dropout (0.1 in both) comes from the
    # preset's ScaleConfig.dropout, not from here.
    "paper": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32,
                  downsample_type="resnet", upsample_type="resnet"),
    # The generative-distillation paper's UNet: 64-128-256-512 channels, one layer a block, attention
    # in the last down block (and the first up block).
    "gd-paper": dict(block_out_channels=(64, 128, 256, 512), layers_per_block=1,
                     down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                     up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32),
}
# The names the paper-scale presets use, kept (they are in results.json and in run fingerprints).
UNET_ALIASES: Dict[str, str] = {"rank1-paper": "paper", "ccd-paper": "paper"}
# Every name build_unet accepts: the configurations and their aliases.
UNET_PRESETS: Dict[str, dict] = {**UNET_CONFIGS, **{a: UNET_CONFIGS[c] for a, c in UNET_ALIASES.items()}}


class UnconditionalUNet2DModel(UNet2DModel):
    """A UNet2DModel without class embedding whose forward does not read `class_labels`: the methods and
    the driver pass the task labels everywhere (replay pools, distillation, evaluation), and for an
    unconditional model they carry no information (sampling it with labels is sampling it without)."""

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        return super().forward(sample, timestep, class_labels=None, return_dict=return_dict)


def unet_config(preset: str = "tiny", *, num_classes: int = 10, in_channels: int = 1, sample_size: int = 16,
                dropout: float = 0.0, class_conditional: bool = True) -> Dict[str, object]:
    """The diffusers UNet2DModel configuration `build_unet` builds (the one source of what a run's
    model is; `--print-config` shows it)."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"preset: expected one of {sorted(UNET_PRESETS)}, got {preset!r}")
    for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("sample_size", sample_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    if not isinstance(class_conditional, bool):
        raise ValueError(f"class_conditional: expected True or False, got {class_conditional!r}")
    # each block but the last halves the resolution and the up path doubles it back: a size that does
    # not divide evenly fails at the first skip connection of a forward pass
    factor = 2 ** (len(UNET_PRESETS[preset]["block_out_channels"]) - 1)
    if sample_size % factor:
        raise ValueError(f"sample_size: expected a multiple of {factor} for preset {preset!r}, got {sample_size}")
    cfg: Dict[str, object] = dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                                  num_class_embeds=num_classes + 1 if class_conditional else None,
                                  **UNET_PRESETS[preset])
    if dropout:  # only when set, so the default models' configurations stay as they were
        cfg["dropout"] = float(dropout)
    return cfg


def build_unet(preset: str = "tiny", *, num_classes: int = 10, in_channels: int = 1, sample_size: int = 16,
               dropout: float = 0.0, class_conditional: bool = True) -> UNet2DModel:
    cfg = unet_config(preset, num_classes=num_classes, in_channels=in_channels, sample_size=sample_size,
                      dropout=dropout, class_conditional=class_conditional)
    return (UNet2DModel if class_conditional else UnconditionalUNet2DModel)(**cfg)


def tiny_unet(num_classes: int = 10, in_channels: int = 1, sample_size: int = 16) -> UNet2DModel:
    return build_unet("tiny", num_classes=num_classes, in_channels=in_channels, sample_size=sample_size)
