"""Presets of the continual-personalization benchmark (the DC-score paper, SPEC 2.2 / 2.3; PROTOCOLS.md).

`dc-digits` runs offline on the CPU: a tiny text-conditional UNet (pixel space, 16 x 16 grey digits) is
pretrained by the run on all ten digits, captioned with their names and with a generic prompt (cached), as
SD knows the word "dog" before it is taught *your* dog, then personalized on one digit per task (4, 5, ...,
9: six tasks, as Custom Concept has six concepts; 20 images of it), each with its own
modifier token ("a photo of a <v1> digit"), prior preservation on images the base model generates from
"a photo of a digit", and metrics on the shipped digits classifier's features.

`dc-custom-concept`, `dc-landmarks`, `dc-ti`, `dc-celeba` are the paper's four setups: a local Stable
Diffusion v1.x directory (`--pretrained`), concept folders (`--concepts DIR`: DIR/<concept>/*.jpg) and a
local CLIP directory for the metrics (`--clip`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# The paper's Table 1 rows in its order (the method names of cdgfast.methods).
TEXT_METHODS: Tuple[str, ...] = ("textual_inversion", "custom_diffusion", "cd_ewc", "lora_seq", "lora_merge", "clora",
                                 "ewc", "ewc_dc", "dsc", "dsc+ewc", "dsc+ewc_dc")
# Methods that train their own UNet parameters (Textual Inversion: none; Custom Diffusion: the K/V weights)
# or their own adapter (the LoRA methods add it in begin_task); every other Table-1 row trains one LoRA of
# the trainer's on the cross-attention K/V, carried from task to task (the paper's EWC / DSC rows).
OWN_PARAMETERS: Tuple[str, ...] = ("textual_inversion", "custom_diffusion", "cd_ewc", "lora_seq", "lora_merge", "clora")
# Methods whose UNet parameters are full weights (the paper's "5e-6 for non-LoRA methods").
FULL_WEIGHT_METHODS: Tuple[str, ...] = ("custom_diffusion", "cd_ewc")
# Methods whose prompts name the concept after its token (paper Sec. 4: "For CD and TI, we additionally
# include the concept name after the modifier token"; CD EWC is a Custom Diffusion variant).
NAMED_PROMPT_METHODS: Tuple[str, ...] = ("textual_inversion", "custom_diffusion", "cd_ewc")

# Table 1 of the DC-score paper (Custom Concept, end of 6 tasks, mean of 3 seeds), in the table's units:
# N_param % of the U-Net, KID x 1e5, A_MMD x 1e3, BWT_MMD and F_MMD as printed, CLIP I2I x 100.
PAPER_TABLE1: Dict[str, Dict[str, float]] = {
    "textual_inversion": dict(nparam_train=0.0, nparam_store=100.0, kid=205.69, a_mmd=185.74, bwt_mmd=0.0,
                              clip_i2i=60.74, f_mmd=0.0),
    "custom_diffusion": dict(nparam_train=2.23, nparam_store=100.0, kid=179.4, a_mmd=121.89, bwt_mmd=-273.41,
                             clip_i2i=69.53, f_mmd=0.62),
    "cd_ewc": dict(nparam_train=2.23, nparam_store=101.34, kid=177.99, a_mmd=121.02, bwt_mmd=-245.7, clip_i2i=69.44,
                   f_mmd=0.506),
    "lora_seq": dict(nparam_train=0.09, nparam_store=100.0, kid=203.11, a_mmd=176.38, bwt_mmd=-118.56,
                     clip_i2i=61.30, f_mmd=0.052),
    "lora_merge": dict(nparam_train=0.09, nparam_store=100.54, kid=261.74, a_mmd=312.44, bwt_mmd=-338.06,
                       clip_i2i=58.29, f_mmd=0.043),
    "clora": dict(nparam_train=0.09, nparam_store=100.54, kid=173.8, a_mmd=117.2, bwt_mmd=-107.47, clip_i2i=64.89,
                  f_mmd=0.034),
    "ewc": dict(nparam_train=0.09, nparam_store=100.54, kid=156.91, a_mmd=105.07, bwt_mmd=-99.34, clip_i2i=73.19,
                f_mmd=0.008),
    "ewc_dc": dict(nparam_train=0.09, nparam_store=100.54, kid=154.25, a_mmd=102.81, bwt_mmd=-102.53,
                   clip_i2i=73.41, f_mmd=0.0005),
    "dsc": dict(nparam_train=0.09, nparam_store=100.54, kid=187.2, a_mmd=198.45, bwt_mmd=-105.79, clip_i2i=73.36,
                f_mmd=0.049),
    "dsc+ewc": dict(nparam_train=0.09, nparam_store=100.54, kid=143.92, a_mmd=98.0, bwt_mmd=-94.63, clip_i2i=72.92,
                    f_mmd=0.02),
    "dsc+ewc_dc": dict(nparam_train=0.09, nparam_store=100.54, kid=140.18, a_mmd=94.1, bwt_mmd=-92.44,
                       clip_i2i=73.17, f_mmd=0.003),
}
PAPER_TABLE1_SOURCE = ("Continual Personalization for Diffusion Models (DC scores), Table 1: Custom Concept, "
                       "end of 6 tasks, mean of 3 seeds")
# The ordering the issue asks to compare with (Table 1, A_MMD, lower is better).
PAPER_A_MMD_ORDER: Tuple[str, ...] = ("dsc+ewc_dc", "dsc+ewc", "ewc_dc", "ewc", "clora", "lora_seq", "lora_merge")


@dataclass
class TextScale:
    """Sizes of one scale of a personalization preset (PROTOCOLS.md gives each value's source)."""

    steps_per_task: int = 1000               # optimizer steps per task (paper: 1000 iterations, Celeb-A 2000)
    batch_size: int = 1                      # concept images per micro-batch (paper: 1)
    prior_batch_size: int = 1                # prior-preservation images per micro-batch (paper: 1)
    grad_accumulation: int = 8               # micro-batches per optimizer step (paper: 8)
    lr_lora: float = 5e-4                    # LoRA methods and the modifier tokens (paper App. H)
    lr_full: float = 5e-6                    # full K/V weights (Custom Diffusion, CD EWC; paper App. H)
    lora_rank: int = 16                      # rank of every LoRA (paper: 16)
    prior_images: int = 200                  # images the base model generates from the prior prompt (paper: 200)
    train_images_per_concept: Optional[int] = None  # None: all of the concept's images
    eval_samples_per_concept: int = 400      # generated images per seen concept after every task (paper: 400)
    sampler: str = "ddpm"                    # "ddpm" (paper: 50 steps) | "ddim"
    sampler_steps: int = 50
    guidance: float = 7.5                    # classifier-free guidance scale (paper: 7.5)
    resolution: int = 512                    # image size (SD v1.4: 512; latents resolution / 8)
    kid_subsets: int = 100
    # dc-digits only: the base model the run pretrains (cached under --cache-dir).
    pretrain_steps: int = 0
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    unet_width: int = 32                     # block_out_channels (w, 2w) of the tiny pixel-space UNet
    unet_cross_attention_levels: int = 1     # 1: cross-attention at 16 px (+ mid block); 2: also at 8 px
    pretrain_named_fraction: float = 0.45    # of a named digit's images, the share captioned with its name
    pretrain_ema_decay: Optional[float] = None  # EMA of the base's weights (cdgfast.train.ema; None: off)
    fisher_max_samples: Optional[int] = None  # cap on the EWC / EWC-DC Fisher samples (None: the whole task)
    consolidation_iterations: Optional[int] = None  # DSC phase (None: 1/5 of steps_per_task, the paper)


@dataclass
class TextPreset:
    name: str
    description: str
    source: str                              # "digits" (embedded, offline) | "folders" (--concepts, --pretrained)
    num_concepts: int                        # tasks (one concept each)
    prior_prompt: str
    scales: Dict[str, TextScale]
    # Sampling and training prompts (paper Sec. 4, "Evaluation"): "a photo of a V*_i"; for CD and TI the
    # concept name follows the modifier token (NAMED_PROMPT_METHODS).
    prompt_template: str = "a photo of a {token}"
    named_prompt_template: str = "a photo of a {token} {noun}"
    paper: Dict[str, Dict[str, float]] = field(default_factory=dict)
    paper_source: str = ""

    def scale(self, scale: str) -> TextScale:
        if scale not in self.scales:
            raise ValueError(f"scale: preset {self.name!r} has the scales {list(self.scales)}, got {scale!r}")
        return copy.deepcopy(self.scales[scale])


# dc-digits: the digits the base model can name (all ten: a base that could not name a digit drew the
# few-image concept of that digit for only 6-36 % of the samples after personalization, PROTOCOLS.md), and the
# ones it is personalized on (one per task).
DIGITS_BASE_CLASSES: Tuple[int, ...] = tuple(range(10))
DIGITS_CONCEPTS: Tuple[int, ...] = (4, 5, 6, 7, 8, 9)
DIGIT_NAMES: Tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_DIGITS_SMOKE = TextScale(steps_per_task=4, batch_size=4, prior_batch_size=4, grad_accumulation=1, lr_lora=5e-3,
                          lr_full=1e-3, lora_rank=2, prior_images=8, train_images_per_concept=8,
                          eval_samples_per_concept=6, sampler="ddim", sampler_steps=4, guidance=3.0, resolution=16,
                          kid_subsets=5, pretrain_steps=20, pretrain_batch_size=32, unet_width=16,
                          unet_cross_attention_levels=2, pretrain_named_fraction=0.6, pretrain_ema_decay=0.9,
                          fisher_max_samples=4, consolidation_iterations=2)
_DIGITS_CPU = TextScale(steps_per_task=100, batch_size=8, prior_batch_size=8, grad_accumulation=1, lr_lora=3e-3,
                        lr_full=3e-4, lora_rank=4, prior_images=64, train_images_per_concept=20,
                        eval_samples_per_concept=32, sampler="ddpm", sampler_steps=20, guidance=3.0, resolution=16,
                        kid_subsets=50, pretrain_steps=1500, pretrain_batch_size=64, unet_width=32,
                        unet_cross_attention_levels=2, pretrain_named_fraction=0.6, pretrain_ema_decay=0.999)

_FOLDER_SMOKE = TextScale(steps_per_task=2, grad_accumulation=1, prior_images=2, train_images_per_concept=2,
                          eval_samples_per_concept=3, sampler="ddim", sampler_steps=2, resolution=64, kid_subsets=3,
                          fisher_max_samples=2, consolidation_iterations=1)


def _folder_paper(steps: int) -> TextScale:
    return TextScale(steps_per_task=steps)


def _folder(name: str, n: int, what: str, prior: str, steps: int = 1000) -> TextPreset:
    return TextPreset(
        name=name, source="folders", num_concepts=n, prior_prompt=prior,
        description=f"DC-score paper, {what}: {n} concepts from --concepts DIR on a local SD v1.4 (--pretrained), "
                    f"CLIP metrics (--clip)",
        scales={"smoke": copy.deepcopy(_FOLDER_SMOKE), "paper": _folder_paper(steps)},
        paper=PAPER_TABLE1 if name == "dc-custom-concept" else {},
        paper_source=PAPER_TABLE1_SOURCE if name == "dc-custom-concept" else
        "the paper's tables for this setup are not in the text cdgfast ships (they are figures); compare by eye")


TEXT_PRESETS: Dict[str, TextPreset] = {
    "dc-digits": TextPreset(
        name="dc-digits", source="digits", num_concepts=len(DIGITS_CONCEPTS), prior_prompt="a photo of a digit",
        description="continual personalization on the CPU: a tiny text UNet pretrained on all ten named digits, "
                    "then one digit per task (4..9) bound to a new modifier token with LoRA; classifier-feature metrics",
        scales={"smoke": _DIGITS_SMOKE, "cpu": _DIGITS_CPU},
        paper=PAPER_TABLE1, paper_source=PAPER_TABLE1_SOURCE + " (Stable Diffusion on photos; dc-digits is a "
                                                               "stand-in: compare orderings, not values)"),
    "dc-custom-concept": _folder("dc-custom-concept", 6, "Custom Concept (Table 1)", "a photo of a person"),
    "dc-landmarks": _folder("dc-landmarks", 10, "Landmarks (Table 2)", "a photo of a landmark"),
    "dc-ti": _folder("dc-ti", 9, "Textual Inversion objects (App. F.2)", "a photo of an object"),
    "dc-celeba": _folder("dc-celeba", 10, "Celeb-A faces (App. F.2; 2000 iterations)", "a photo of a person",
                         steps=2000),
}


def get_text_preset(name: str) -> TextPreset:
    if name not in TEXT_PRESETS:
        raise ValueError(f"preset: unknown personalization preset {name!r}; expected one of {sorted(TEXT_PRESETS)}")
    return copy.deepcopy(TEXT_PRESETS[name])


def text_preset_names() -> List[str]:
    return list(TEXT_PRESETS)


__all__ = ["TEXT_METHODS", "OWN_PARAMETERS", "FULL_WEIGHT_METHODS", "NAMED_PROMPT_METHODS", "PAPER_TABLE1", "PAPER_TABLE1_SOURCE",
           "PAPER_A_MMD_ORDER", "TextScale", "TextPreset", "TEXT_PRESETS", "DIGITS_BASE_CLASSES", "DIGITS_CONCEPTS",
           "DIGIT_NAMES", "get_text_preset", "text_preset_names"]
