"""UNet presets, LoRA helpers and the text-to-image model layer (transformers optional: `text` extra)."""
from .text import (CROSS_ATTENTION_KV, ModifierTokenEmbedding, StableDiffusionParts, add_modifier_token, encode_prompts,
                   fold_modifier_tokens, freeze_modifier_tokens,
                   load_stable_diffusion, modifier_token_ids, tiny_text_models, tiny_text_unet,
                   tiny_tokenizer)
from .unet import UNET_ALIASES, UNET_CONFIGS, UNET_PRESETS, UnconditionalUNet2DModel, build_unet, tiny_unet, unet_config

__all__ = ["UNET_CONFIGS", "UNET_ALIASES", "UNET_PRESETS", "build_unet", "tiny_unet", "unet_config",
           "UnconditionalUNet2DModel", "CROSS_ATTENTION_KV", "StableDiffusionParts", "ModifierTokenEmbedding",
           "load_stable_diffusion", "tiny_text_models", "tiny_text_unet", "tiny_tokenizer", "add_modifier_token",
           "freeze_modifier_tokens", "fold_modifier_tokens", "modifier_token_ids", "encode_prompts"]
