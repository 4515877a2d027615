"""UNet presets and LoRA helpers."""
from .unet import UNET_ALIASES, UNET_CONFIGS, UNET_PRESETS, UnconditionalUNet2DModel, build_unet, tiny_unet, unet_config

__all__ = ["UNET_CONFIGS", "UNET_ALIASES", "UNET_PRESETS", "build_unet", "tiny_unet", "unet_config",
           "UnconditionalUNet2DModel"]
