"""Class-conditional diffusers UNet2DModel presets. The null (unconditional) class is index
`num_classes`, so the embedding table has `num_classes + 1` rows (SPEC section 1)."""
from __future__ import annotations

from typing import Dict

from diffusers import UNet2DModel

UNET_PRESETS: Dict[str, dict] = {
    # CPU-sized: the embedded default and the tests (about 0.18M parameters at 16x16).
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8),
    # About 1M parameters: the larger benchmark model (32x32).
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=16, attention_head_dim=16),
    # Rank-1 paper: 128 then 256 channels, 4 blocks.
    "rank1-paper": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32),
    # CCD: 128-256-256-256, attention in the 3rd down block.
    "ccd-paper": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                      down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32),
}


def build_unet(preset: str = "tiny", *, num_classes: int = 10, in_channels: int = 1, sample_size: int = 16) -> UNet2DModel:
    if preset not in UNET_PRESETS:
        raise ValueError(f"preset: expected one of {sorted(UNET_PRESETS)}, got {preset!r}")
    for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("sample_size", sample_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    # each block but the last halves the resolution and the up path doubles it back: a size that does
    # not divide evenly fails at the first skip connection of a forward pass
    factor = 2 ** (len(UNET_PRESETS[preset]["block_out_channels"]) - 1)
    if sample_size % factor:
        raise ValueError(f"sample_size: expected a multiple of {factor} for preset {preset!r}, got {sample_size}")
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                       num_class_embeds=num_classes + 1, **UNET_PRESETS[preset])


def tiny_unet(num_classes: int = 10, in_channels: int = 1, sample_size: int = 16) -> UNet2DModel:
    return build_unet("tiny", num_classes=num_classes, in_channels=in_channels, sample_size=sample_size)
