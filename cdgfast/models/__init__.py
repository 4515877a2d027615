"""UNet presets and LoRA helpers."""
from .unet import UNET_PRESETS, build_unet, tiny_unet

__all__ = ["UNET_PRESETS", "build_unet", "tiny_unet"]
