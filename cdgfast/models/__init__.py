"""UNet presets and LoRA helpers."""
from .unet import UNET_ALIASES, UNET_CONFIGS, UNET_PRESETS, build_unet, tiny_unet

__all__ = ["UNET_CONFIGS", "UNET_ALIASES", "UNET_PRESETS", "build_unet", "tiny_unet"]
