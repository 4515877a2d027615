"""The continual-personalization driver: the DC-score paper's benchmark (SPEC 2.2 / 2.3, PROTOCOLS.md).

    python -m cdgfast.train --preset dc-digits                       # offline, CPU (tens of minutes)
    python -m cdgfast.train --preset dc-digits --scale smoke         # every Table-1 row in about a minute
    python -m cdgfast.train --preset dc-custom-concept --pretrained SD14 --concepts DIR --clip CLIP

One concept per task, no replay. Per method, from the same base model: each task adds a modifier token
V*_n (its own embedding row, frozen after the task: `TextConditions`) and trains what the method trains
(a LoRA on the cross-attention K/V, the K/V weights, or the token alone) on the concept's images plus
prior-preservation images of the prior concept c_0 that the base model generated from the prior prompt;
then the method's end of task (Fisher, merge, DSC consolidation phase). After every task, every seen
concept is sampled from "a photo of a V*_i" (plus the concept's name for CD and TI) with classifier-free
guidance, and its image features are kept; at the end `personalization_metrics` gives KID, A/F/BWT_MMD,
CLIP I2I and N_param per task and at the end.

Stages: check every option (nothing is written before), prepare --out, the base model (dc-digits:
pretrained by the run and cached under --cache-dir; the folder presets: --pretrained), the reference
features, then every method (its result is kept in OUT/checkpoints/<method>/ as soon as it finishes, so
`--resume` goes on with the methods that did not), and results.json / report.md after each method.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .loop import (OUTPUT_FILES, Logger, RunError, RunStopped, _check_set_values, clear_run_outputs, default_out_dir,
                   derive_seed, prepare_out_dir, versions)
from .text_presets import (DIGIT_NAMES, DIGITS_BASE_CLASSES, DIGITS_CONCEPTS, FULL_WEIGHT_METHODS,
                           NAMED_PROMPT_METHODS, OWN_PARAMETERS, PAPER_A_MMD_ORDER, TEXT_METHODS, TextPreset,
                           TextScale, get_text_preset)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DIGITS_MAX_LENGTH = 16  # tokens per prompt of the tiny tokenizer ("a photo of a <v1> four" is 8 with bos / eos)
DIGITS_HIDDEN = 32      # the tiny text encoder's width = the UNet's cross-attention width
# The dc-digits base is one model for every run seed, as Stable Diffusion is for the paper's seeds: the run
# seed varies the personalization (token and LoRA init, data order, sampling noise), not the base.
DIGITS_BASE_SEED = 0


@dataclass
class TextRunConfig:
    """One personalization run (the CLI builds it; see `python -m cdgfast.train --help`)."""

    preset: str = "dc-digits"
    scale: Optional[str] = None              # None: the preset's first non-smoke scale
    methods: Optional[List[str]] = None      # None: every Table-1 row
    out: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    device: Optional[str] = None
    pretrained: Optional[str] = None         # a local Stable Diffusion v1.x directory (folder presets)
    concepts: Optional[str] = None           # DIR/<concept>/*.jpg (folder presets)
    clip: Optional[str] = None               # a local CLIP directory for the metrics
    cache_dir: Optional[str] = None
    steps: Optional[int] = None              # override: optimizer steps per task
    num_tasks: Optional[int] = None          # override: the first N concepts only
    progress: bool = True
    method_args: Dict[str, dict] = field(default_factory=dict)


@dataclass
class Concept:
    name: str                 # folder name / digit name
    noun: str                 # the concept's class word (prompts.txt, or the folder name)
    images: torch.Tensor      # [N, C, H, W] in [-1, 1], what the task trains on
    reference: torch.Tensor   # [M, C, H, W] in [-1, 1], the real images the metrics compare with
    label: Optional[int] = None  # dc-digits: the digit (the ruler's class)


@dataclass
class _Resolved:
    preset: TextPreset
    scale: str
    sc: TextScale
    methods: List[str]
    num_tasks: int
    device: torch.device


# ------------------------------------------------------------------------------------------- checks
def _default_scale(preset: TextPreset) -> str:
    return next((s for s in preset.scales if s != "smoke"), "smoke")


def resolve_text(cfg: TextRunConfig) -> _Resolved:
    """Every option checked against the preset, before any work (a RunError names the option)."""
    from cdgfast.methods import members

    try:
        preset = get_text_preset(cfg.preset)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    scale = cfg.scale or _default_scale(preset)
    if scale not in preset.scales:
        raise RunError(f"scale: preset {preset.name!r} has the scales {list(preset.scales)}, got {scale!r}")
    sc = preset.scale(scale)
    if cfg.steps is not None:
        if not isinstance(cfg.steps, int) or cfg.steps < 1:
            raise RunError(f"steps: expected a positive integer, got {cfg.steps!r}")
        sc.steps_per_task = cfg.steps
    methods = list(cfg.methods) if cfg.methods else list(TEXT_METHODS)
    bad = [m for m in methods if m not in TEXT_METHODS]
    if bad:
        raise RunError(f"method: {bad} are not rows of the personalization benchmark; expected some of "
                       f"{', '.join(TEXT_METHODS)}")
    if len(set(methods)) != len(methods):
        raise RunError(f"method: expected each method once, got {methods}")
    n = preset.num_concepts
    if cfg.num_tasks is not None:
        if not isinstance(cfg.num_tasks, int) or not 2 <= cfg.num_tasks <= n:
            raise RunError(f"num-tasks: expected 2..{n} (forgetting needs two tasks), got {cfg.num_tasks!r}")
        n = cfg.num_tasks
    known = {mm for m in methods for mm in members(m)} | set(methods)
    stray = sorted(set(cfg.method_args) - known)
    if stray:
        raise RunError(f"set: {stray} are not among the run's methods or their members ({sorted(known)})")
    _check_set_values(cfg.method_args)
    for m in methods:  # the whole configuration of every method, as the run will build it
        _build_method(m, sc, cfg.seed, cfg.method_args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > len(methods):
        raise RunError(f"torchrun: {world} processes for {len(methods)} method(s); each process runs whole methods "
                       f"(a Table-1 row is batch 1 with gradient accumulation, as in the paper), so start at most "
                       f"{len(methods)} (--nproc_per_node), or run more methods")
    if cfg.device not in (None, "cpu", "cuda"):
        raise RunError(f"device: expected cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda was asked for but no CUDA device is available")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if preset.source == "digits":
        for opt in ("pretrained", "concepts"):
            if getattr(cfg, opt) is not None:
                raise RunError(f"{opt}: preset dc-digits pretrains its own tiny model on the embedded digits; "
                               f"--{opt} is for the folder presets (dc-custom-concept, dc-landmarks, dc-ti, dc-celeba)")
    else:
        if cfg.pretrained is None:
            raise RunError(f"pretrained: preset {preset.name!r} needs a local Stable Diffusion v1.4 directory "
                           f"(--pretrained PATH: unet/, vae/, text_encoder/, tokenizer/, scheduler/; nothing is "
                           f"downloaded)")
        _check_pretrained(cfg.pretrained)
        if cfg.concepts is None:
            raise RunError(f"concepts: preset {preset.name!r} needs its concept images (--concepts DIR with one "
                           f"folder of images per concept, DIR/<concept>/*.jpg)")
        _concept_folders(Path(cfg.concepts), n)
        if cfg.clip is None:
            raise RunError(f"clip: preset {preset.name!r} reports the paper's CLIP-feature metrics; pass a local "
                           f"CLIP directory (--clip PATH, e.g. openai/clip-vit-large-patch14 saved with "
                           f"save_pretrained; nothing is downloaded)")
    if cfg.clip is not None:
        from cdgfast.metrics.personalization import _clip_dir
        try:
            _clip_dir(cfg.clip)
        except ValueError as exc:
            raise RunError(str(exc)) from None
    return _Resolved(preset, scale, sc, methods, n, device)


def _check_pretrained(path: str) -> None:
    from cdgfast.models.text import _missing_parts

    root = Path(path).expanduser()
    if not root.is_dir():
        raise RunError(f"pretrained: {root} is not a directory; expected a local Stable Diffusion v1.x directory")
    missing = _missing_parts(root)
    if missing:
        raise RunError(f"pretrained: {root} is not a complete Stable Diffusion v1.x directory; missing: "
                       + ", ".join(missing))


def _concept_folders(root: Path, n: int) -> List[Path]:
    """The first n concept folders of root (sorted by name), each with at least one image."""
    if not root.is_dir():
        raise RunError(f"concepts: {root} is not a directory; expected DIR/<concept>/*.jpg")
    folders = sorted(p for p in root.iterdir() if p.is_dir()
                     and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()))
    if len(folders) < n:
        raise RunError(f"concepts: {root} has {len(folders)} concept folders with images, the preset needs {n} "
                       f"(DIR/<concept>/*.jpg, one folder per task, in name order)")
    return folders[:n]


def _build_method(name: str, sc: TextScale, seed: int, method_args: Dict[str, dict]):
    """The method as the run builds it: the text defaults (`text_config`), the scale's sizes (LoRA rank,
    Fisher samples, DSC iterations), --set, and the run's method seed (common random numbers)."""
    from cdgfast.methods import create, members, text_config

    overrides: Dict[str, Any] = dict(text_config(name))
    probe = create(name, **overrides).config
    consolidation = sc.consolidation_iterations or max(1, sc.steps_per_task // 5)  # paper: 1/5 of training
    for key in probe:
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "rank" and ("lora" in name or name == "clora"):
            overrides[key] = sc.lora_rank
        elif leaf == "fisher_max_samples" and sc.fisher_max_samples is not None:
            overrides[key] = sc.fisher_max_samples
        elif leaf == "iterations":
            overrides[key] = consolidation
    composite = members(name) != [name]
    for member, kw in method_args.items():
        if member == name:
            overrides.update(kw)
        elif composite and member in members(name):
            overrides.update({f"{member}.{k}": v for k, v in kw.items()})
    overrides["seed"] = derive_seed(seed, "method")
    try:
        return create(name, **overrides)
    except ValueError as exc:
        raise RunError(f"method {name}: {exc}") from None


def resolved_text_config(cfg: TextRunConfig) -> dict:
    """`--print-config` of a personalization preset: the resolved run as JSON, nothing loaded or trained."""
    r = resolve_text(cfg)
    return _as_json({
        "preset": r.preset.name, "scale": r.scale, "kind": "personalization",
        "data": {"source": r.preset.source, "concepts": r.num_tasks, "prior_prompt": r.preset.prior_prompt,
                 "prompt_template": r.preset.prompt_template, "named_prompt_template": r.preset.named_prompt_template,
                 "named_prompt_methods": list(NAMED_PROMPT_METHODS),
                 "train_images_per_concept": r.sc.train_images_per_concept, "prior_images": r.sc.prior_images,
                 "resolution": r.sc.resolution,
                 **({"pretrain_digits": "all ten", "named_digits": list(DIGITS_BASE_CLASSES),
                     "concept_digits": list(DIGITS_CONCEPTS[:r.num_tasks])}
                    if r.preset.source == "digits" else {"concepts_dir": cfg.concepts})},
        "model": ({"kind": "tiny text UNet2DConditionModel, pixel space", "unet_width": r.sc.unet_width,
                   "text_encoder": f"CLIPTextModel hidden {DIGITS_HIDDEN}, 2 layers", "pretrain_steps": r.sc.pretrain_steps,
                   "pretrain_batch_size": r.sc.pretrain_batch_size, "pretrain_lr": r.sc.pretrain_lr,
                   "pretrain_ema_decay": r.sc.pretrain_ema_decay, "pretrain_named_fraction": r.sc.pretrain_named_fraction,
                   "cross_attention_levels": r.sc.unet_cross_attention_levels, "base_seed": DIGITS_BASE_SEED}
                  if r.preset.source == "digits" else {"kind": "Stable Diffusion v1.x", "pretrained": cfg.pretrained}),
        "training": {"optimizer": "adamw", "steps_per_task": r.sc.steps_per_task, "batch_size": r.sc.batch_size,
                     "prior_batch_size": r.sc.prior_batch_size, "grad_accumulation": r.sc.grad_accumulation,
                     "lr_lora": r.sc.lr_lora, "lr_full": r.sc.lr_full, "full_weight_methods": list(FULL_WEIGHT_METHODS),
                     "lora_rank": r.sc.lora_rank, "lora_targets": ["attn2.to_k", "attn2.to_v"]},
        "evaluation": {"features": "clip" if cfg.clip else "classifier-fallback",
                       "samples_per_concept": r.sc.eval_samples_per_concept, "sampler": r.sc.sampler,
                       "sampler_steps": r.sc.sampler_steps, "guidance": r.sc.guidance, "kid_subsets": r.sc.kid_subsets},
        "methods": {m: _build_method(m, r.sc, cfg.seed, cfg.method_args).config for m in r.methods},
    })


def _as_json(obj):
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(_as_json(obj), sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- models
class Codec:
    """What the UNet denoises: pixels (dc-digits: identity) or SD latents (the VAE, SD's scaling factor)."""

    def __init__(self, vae=None):
        self.vae = vae

    def latent_size(self, resolution: int) -> int:
        """The side of what the UNet denoises for images of side `resolution` (SD's VAE: resolution / 8)."""
        if self.vae is None:
            return resolution
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % factor:
            raise ValueError(f"resolution: expected a multiple of the VAE's downsampling factor {factor}, got {resolution}")
        return resolution // factor

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.vae is None:
            return x
        p = next(self.vae.parameters())
        out = []
        for i in range(0, x.shape[0], 8):
            dist = self.vae.encode(x[i:i + 8].to(p.device, p.dtype)).latent_dist
            out.append(dist.sample(generator) * self.vae.config.scaling_factor)
        return torch.cat(out).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return z.clamp(-1, 1)
        p = next(self.vae.parameters())
        out = [self.vae.decode(z[i:i + 8].to(p.device, p.dtype) / self.vae.config.scaling_factor).sample
               for i in range(0, z.shape[0], 8)]
        return torch.cat(out).float().clamp(-1, 1)


@dataclass
class Base:
    """The pretrained model every method starts from, and what the run derived from it once."""

    unet_state: Dict[str, torch.Tensor]
    text_state: Dict[str, torch.Tensor]
    make_unet: Callable[[], torch.nn.Module]
    make_text: Callable[[], Tuple[Any, torch.nn.Module]]   # (tokenizer, text encoder), fresh
    scheduler_config: Dict[str, Any]
    codec: Codec
    prior_latents: torch.Tensor
    pixel_space: bool
    info: Dict[str, Any]

    def fresh(self, device):
        unet = self.make_unet()
        unet.load_state_dict(self.unet_state)
        tokenizer, text_encoder = self.make_text()
        text_encoder.load_state_dict(self.text_state)
        unet.to(device).train()
        text_encoder.to(device).eval().requires_grad_(False)
        unet.requires_grad_(True)
        return unet, tokenizer, text_encoder


_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def training_schedule(config: Dict[str, Any]):
    """The forward process of a scheduler configuration (SD's scheduler_config.json) as a NoiseSchedule."""
    from diffusers import DDPMScheduler

    from cdgfast.diffusion import as_schedule

    return as_schedule(DDPMScheduler(**{k: config[k] for k in _SCHEDULE_KEYS if k in config}))


def _scheduler(config: Dict[str, Any], sampler: str, steps: int, clip_sample: bool):
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = {k: config[k] for k in _SCHEDULE_KEYS if k in config}
    if sampler == "ddpm":
        s = DDPMScheduler(**kw, clip_sample=clip_sample)
    elif sampler == "ddim":
        s = DDIMScheduler(**kw, clip_sample=clip_sample, set_alpha_to_one=False, steps_offset=1,
                          timestep_spacing="trailing")
    else:
        raise ValueError(f"sampler: expected 'ddpm' or 'ddim', got {sampler!r}")
    s.set_timesteps(steps)
    return s


@torch.no_grad()
def sample_text(unet, cond: torch.Tensor, uncond: torch.Tensor, n: int, *, size: int, scheduler_config: Dict[str, Any],
                sampler: str, steps: int, guidance: float, generator: torch.Generator, clip_sample: bool,
                batch: int = 64) -> torch.Tensor:
    """n samples [n, C, size, size] of the UNet's space (pixels or latents) for the text states `cond`
    [L, D], with classifier-free guidance against `uncond` [L, D] (the empty prompt):
    eps = eps_u + guidance (eps_c - eps_u); DDPM or DDIM (trailing spacing) from `scheduler_config`."""
    cfg = unet.config
    p = next(unet.parameters())
    was = unet.training
    unet.eval()
    out = []
    try:
        for i in range(0, n, batch):
            b = min(batch, n - i)
            sched = _scheduler(scheduler_config, sampler, steps, clip_sample)
            x = torch.randn((b, cfg.in_channels, size, size), generator=generator).to(p.device, p.dtype)
            states = torch.cat([cond.expand(b, *cond.shape), uncond.expand(b, *uncond.shape)]).to(p.device, p.dtype)
            for t in sched.timesteps:
                eps_c, eps_u = unet(torch.cat([x, x]), t, encoder_hidden_states=states).sample.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
                x = sched.step(eps, t, x, generator=None if sampler == "ddim" else _on(generator, x)).prev_sample
            out.append(x.float().cpu())
    finally:
        unet.train(was)
    return torch.cat(out)


def _on(generator: torch.Generator, x: torch.Tensor) -> Optional[torch.Generator]:
    return generator if generator.device == x.device else None


def _digits_makers(sc: TextScale, seed: int):
    from cdgfast.models.text import tiny_text_models, tiny_text_unet, tiny_tokenizer

    def make_unet():
        return tiny_text_unet(cross_attention_dim=DIGITS_HIDDEN, sample_size=sc.resolution, seed=seed, channels=1,
                              width=sc.unet_width, cross_attention_levels=sc.unet_cross_attention_levels)

    def make_text():
        parts = tiny_text_models(max_length=DIGITS_MAX_LENGTH, hidden_size=DIGITS_HIDDEN, seed=seed)
        return tiny_tokenizer(max_length=DIGITS_MAX_LENGTH), parts.text_encoder

    return make_unet, make_text


def _digits_prompt(c: int, r: float, named_fraction: float = 0.45) -> str:
    """The pretraining prompt of a digit-c image (r uniform in [0, 1)): 10 % empty (classifier-free
    guidance); for the named digits (DIGITS_BASE_CLASSES) the digit's name for `named_fraction` of the
    images, else the prior prompt.

    The base names every digit, as Stable Diffusion knows "dog" before it is taught *your* dog: the task
    then binds a new token to 20 images of a digit through the cross-attention K/V, which works only where
    the text pathway already carries the concept (a base naming only 0-3 bound 4..9 for 6-36 % of the
    samples; PROTOCOLS.md, dc-digits).
    """
    if r < 0.1:
        return ""
    if r < 1.0 - named_fraction or c not in DIGITS_BASE_CLASSES:
        return "a photo of a digit"
    return f"a photo of a {DIGIT_NAMES[c]} digit"


def pretrain_digits(x: torch.Tensor, y: torch.Tensor, sc: TextScale, prior_prompt: str, seed: int, device,
                    cache_dir: Optional[str], progress: bool, log) -> Base:
    """The dc-digits base model: the tiny text UNet and text encoder trained together on all ten digits
    under _digits_prompt (names only for DIGITS_BASE_CLASSES), then `sc.prior_images` samples of the prior prompt (the
    prior-preservation images). Cached under cache_dir by the content of everything that decides it."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from cdgfast.metrics.classifier import data_sha256, default_cache_dir
    from cdgfast.models.text import SD_SCHEDULER_CONFIG, encode_prompts

    from .ema import WeightEMA

    make_unet, make_text = _digits_makers(sc, seed)
    key = _digest({"data": data_sha256(x, y), "steps": sc.pretrain_steps, "batch": sc.pretrain_batch_size,
                   "lr": sc.pretrain_lr, "width": sc.unet_width, "res": sc.resolution, "prior": prior_prompt,
                   "prior_images": sc.prior_images, "sampler": [sc.sampler, sc.sampler_steps, sc.guidance],
                   "xattn": sc.unet_cross_attention_levels, "named": sc.pretrain_named_fraction,
                   "ema": sc.pretrain_ema_decay, "seed": seed, "torch": torch.__version__.split("+")[0], "v": 2})[:16]
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / f"dc-digits-base-{key}.safetensors"
    info = {"cache": str(path), "pretrain_digits": list(range(len(DIGIT_NAMES))),
            "named_digits": list(DIGITS_BASE_CLASSES), "pretrain_steps": sc.pretrain_steps}
    sched_cfg = dict(SD_SCHEDULER_CONFIG)
    if path.is_file():
        try:
            blob = load_file(str(path))
            log(f"base model: loaded {path}")
            return Base(unet_state={k[5:]: v for k, v in blob.items() if k.startswith("unet.")},
                        text_state={k[5:]: v for k, v in blob.items() if k.startswith("text.")},
                        make_unet=make_unet, make_text=make_text, scheduler_config=sched_cfg, codec=Codec(),
                        prior_latents=blob["prior"], pixel_space=True, info={**info, "source": "cached"})
        except Exception as exc:  # a corrupt cache entry is retrained, not fatal
            log(f"base model cache {path} unreadable ({type(exc).__name__}); retraining")
    t0 = time.time()
    unet = make_unet().to(device).train()
    tokenizer, text_encoder = make_text()
    text_encoder.to(device).train()
    schedule = training_schedule(sched_cfg)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=sc.pretrain_lr)
    ema = WeightEMA(params, sc.pretrain_ema_decay) if sc.pretrain_ema_decay is not None else None
    g = torch.Generator().manual_seed(derive_seed(seed, "pretrain"))
    bar = tqdm(range(sc.pretrain_steps), desc="pretraining the dc-digits base model", disable=not progress,
               leave=False)
    for _ in bar:
        idx = torch.randint(0, x.shape[0], (sc.pretrain_batch_size,), generator=g)
        r = torch.rand(sc.pretrain_batch_size, generator=g).tolist()
        prompts = [_digits_prompt(int(c), ri, sc.pretrain_named_fraction) for c, ri in zip(y[idx].tolist(), r)]
        x0 = x[idx].to(device)
        t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=g).to(device)
        eps = torch.randn(x0.shape, generator=g).to(device)
        xt = schedule.add_noise(x0, eps, t)
        pred = unet(xt, t, encoder_hidden_states=encode_prompts(tokenizer, text_encoder, prompts)).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    if ema is not None:  # the base is the average
        ema.copy_to()
    unet.eval()
    text_encoder.eval()
    with torch.no_grad():
        cond, uncond = encode_prompts(tokenizer, text_encoder, [prior_prompt, ""])
    prior = sample_text(unet, cond, uncond, sc.prior_images, size=sc.resolution, scheduler_config=sched_cfg, sampler=sc.sampler,
                        steps=sc.sampler_steps, guidance=sc.guidance,
                        generator=torch.Generator().manual_seed(derive_seed(seed, "prior")), clip_sample=True)
    blob = {**{f"unet.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()},
            **{f"text.{k}": v.detach().cpu().contiguous() for k, v in text_encoder.state_dict().items()},
            "prior": prior.contiguous()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(blob, str(tmp))
    os.replace(tmp, path)
    log(f"base model: pretrained on the digits {list(DIGITS_BASE_CLASSES)} in {time.time() - t0:.0f}s, cached at {path}")
    return Base(unet_state={k[5:]: v for k, v in blob.items() if k.startswith("unet.")},
                text_state={k[5:]: v for k, v in blob.items() if k.startswith("text.")},
                make_unet=make_unet, make_text=make_text, scheduler_config=sched_cfg, codec=Codec(),
                prior_latents=prior, pixel_space=True, info={**info, "source": "trained"})


def base_prompt_following(base: Base, classifier, sc: TextScale, seed: int, device) -> Dict[str, float]:
    """How well the dc-digits base follows the prompts it was pretrained on: for each named digit
    (DIGITS_BASE_CLASSES), the fraction of `sc.eval_samples_per_concept` samples of "a photo of a <name>
    digit" (the evaluation sampler and guidance) that the digits classifier recognises as that digit.
    Personalization can only bind a token as well as the base's text pathway conditions at all, so the
    run reports this beside its table (chance is 0.1)."""
    from cdgfast.metrics.classifier import predict
    from cdgfast.models.text import encode_prompts

    unet, tokenizer, text_encoder = base.fresh(device)
    out: Dict[str, float] = {}
    with torch.no_grad():
        uncond = encode_prompts(tokenizer, text_encoder, [""])[0]
        for d in DIGITS_BASE_CLASSES:
            cond = encode_prompts(tokenizer, text_encoder, [f"a photo of a {DIGIT_NAMES[d]} digit"])[0]
            x = sample_text(unet, cond, uncond, sc.eval_samples_per_concept, size=sc.resolution,
                            scheduler_config=base.scheduler_config, sampler=sc.sampler, steps=sc.sampler_steps,
                            guidance=sc.guidance, generator=torch.Generator().manual_seed(derive_seed(seed, "base", d)),
                            clip_sample=True)
            pred = predict(classifier, x.to(next(classifier.parameters()).device))
            out[DIGIT_NAMES[d]] = round(float((pred.cpu() == d).double().mean()), 4)
    return out


def load_sd_base(pretrained: str, prior_prompt: str, sc: TextScale, seed: int, device, out: Path, log) -> Base:
    """A local Stable Diffusion v1.x: its UNet / text encoder as every method's start, its VAE as the codec,
    and `sc.prior_images` samples of the prior prompt (kept in OUT/checkpoints/prior.safetensors, so a
    resumed run reuses them)."""
    from safetensors.torch import load_file, save_file

    from cdgfast.models.text import encode_prompts, load_stable_diffusion

    parts = load_stable_diffusion(pretrained, device=device)
    parts.vae.requires_grad_(False)
    unet_state = {k: v.detach().clone() for k, v in parts.unet.state_dict().items()}
    text_state = {k: v.detach().clone() for k, v in parts.text_encoder.state_dict().items()}
    unet_config = dict(parts.unet.config)
    text_config = parts.text_encoder.config
    root = Path(pretrained).expanduser()

    def make_unet():
        from diffusers import UNet2DConditionModel
        return UNet2DConditionModel.from_config(unet_config)

    def make_text():
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        return tok, transformers.CLIPTextModel(text_config)

    codec = Codec(parts.vae)
    prior_path = out / "checkpoints" / "prior.safetensors"
    if prior_path.is_file():
        prior = load_file(str(prior_path))["prior"]
    else:
        with torch.no_grad():
            cond, uncond = encode_prompts(parts.tokenizer, parts.text_encoder, [prior_prompt, ""])
        prior = sample_text(parts.unet, cond, uncond, sc.prior_images, size=codec.latent_size(sc.resolution),
                            scheduler_config=parts.scheduler_config,
                            sampler=sc.sampler, steps=sc.sampler_steps, guidance=sc.guidance,
                            generator=torch.Generator().manual_seed(derive_seed(seed, "prior")), clip_sample=False,
                            batch=8)
        prior_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"prior": prior.contiguous()}, str(prior_path))
        log(f"prior preservation: {prior.shape[0]} images of {prior_prompt!r} from the base model")
    return Base(unet_state=unet_state, text_state=text_state, make_unet=make_unet, make_text=make_text,
                scheduler_config=parts.scheduler_config, codec=codec, prior_latents=prior, pixel_space=False,
                info={"pretrained": str(root)})


# ------------------------------------------------------------------------------------------- data
def digits_concepts(data, sc: TextScale, n: int) -> List[Concept]:
    """Concept j = digit DIGITS_CONCEPTS[j]: its first `train_images_per_concept` training images (the
    few images a personalization task has), and the evaluation split's images of it as the reference."""
    out = []
    for d in DIGITS_CONCEPTS[:n]:
        xi = data.train.x[data.train.y == d]
        if sc.train_images_per_concept is not None:
            xi = xi[:sc.train_images_per_concept]
        out.append(Concept(name=DIGIT_NAMES[d], noun=DIGIT_NAMES[d], images=xi,
                           reference=data.eval.x[data.eval.y == d], label=d))
    return out


def _load_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    im = Image.open(path).convert("RGB")
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    return t.float() / 127.5 - 1.0


def folder_concepts(root: Path, sc: TextScale, n: int) -> List[Concept]:
    """DIR/<concept>/*.jpg in name order; the noun is the first line of DIR/<concept>/prompts.txt when there
    is one (e.g. "dog"), else the folder name without digits and underscores. The concept's own images
    are both what its task trains on and the reference of the metrics (the paper's target images)."""
    out = []
    for folder in _concept_folders(root, n):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if sc.train_images_per_concept is not None:
            files = files[:sc.train_images_per_concept]
        x = torch.stack([_load_image(f, sc.resolution) for f in files])
        noun = folder.name.replace("_", " ").strip("0123456789 ") or folder.name
        prompts = folder / "prompts.txt"
        if prompts.is_file():
            lines = [ln.strip() for ln in prompts.read_text().splitlines() if ln.strip()]
            noun = lines[0] if lines else noun
        out.append(Concept(name=folder.name, noun=noun, images=x, reference=x))
    return out


# ------------------------------------------------------------------------------------------- one method
def _count_tensors(obj, seen: set) -> int:
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_count_tensors(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v, seen) for v in obj)
    return 0


class MethodRun:
    """One Table-1 row from the base model through every task (module docstring)."""

    def __init__(self, name: str, r: _Resolved, base: Base, concepts: List[Concept], extractor, classifier,
                 seed: int, method_args: Dict[str, dict], out: Path, log, progress: bool):
        self.name, self.r, self.base, self.concepts = name, r, base, concepts
        self.extractor, self.classifier = extractor, classifier
        self.seed, self.method_args, self.out, self.log, self.progress = seed, method_args, out, log, progress

    def prompts(self) -> Tuple[List[str], List[str]]:
        p = self.r.preset
        template = p.named_prompt_template if self.name in NAMED_PROMPT_METHODS else p.prompt_template
        tokens = [f"<v{i + 1}>" for i in range(len(self.concepts))]
        return [template.format(token=t, noun=c.noun) for t, c in zip(tokens, self.concepts)], tokens

    def run(self) -> dict:
        from cdgfast.methods import TextConditions
        from cdgfast.models.lora import CROSS_ATTENTION_KV, add_lora
        from cdgfast.models.text import encode_prompts

        r, sc, device = self.r, self.r.sc, self.r.device
        t0 = time.time()
        torch.manual_seed(derive_seed(self.seed, "torch", self.name))
        unet, tokenizer, text_encoder = self.base.fresh(device)
        unet_count = sum(p.numel() for p in unet.parameters())
        if self.name not in OWN_PARAMETERS:  # the paper's EWC / DSC rows: one LoRA of the trainer's on attn2 K/V
            add_lora(unet, rank=sc.lora_rank, target_modules=CROSS_ATTENTION_KV, seed=derive_seed(self.seed, "lora"))
        prompts, tokens = self.prompts()
        prior_id = len(self.concepts)
        cond = TextConditions(tokenizer, text_encoder, prompts, r.preset.prior_prompt, tokens=tokens,
                              init_word="digit" if self.base.pixel_space else None)
        method = _build_method(self.name, sc, self.seed, self.method_args)
        schedule = training_schedule(self.base.scheduler_config)
        method.setup(num_classes=len(self.concepts), schedule=schedule, device=device, conditions=cond,
                     progress=self.progress)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "data"))
        codec = self.base.codec
        latents = [codec.encode(c.images, torch.Generator().manual_seed(derive_seed(self.seed, "vae", i)))
                   for i, c in enumerate(self.concepts)]
        prior = self.base.prior_latents
        features: List[List[torch.Tensor]] = []
        recognised: List[float] = []
        trained = 0
        from tqdm.auto import tqdm
        from cdgfast.data import Task

        for k in range(r.num_tasks):
            task = Task(index=k, classes=[k], indices=torch.arange(latents[k].shape[0]))
            method.begin_task(unet, task)
            params = method.trainable_parameters(unet)
            token_rows = {id(p) for p in cond.trainable_parameters()}
            lr = sc.lr_full if self.name in FULL_WEIGHT_METHODS else sc.lr_lora
            groups = [{"params": [p for p in params if id(p) not in token_rows], "lr": lr},
                      {"params": [p for p in params if id(p) in token_rows], "lr": sc.lr_lora}]
            opt = torch.optim.AdamW([g for g in groups if g["params"]])
            trained = sum(p.numel() for p in params)
            bar = tqdm(range(sc.steps_per_task), desc=f"{self.name} task {k + 1}/{r.num_tasks}",
                       disable=not self.progress, leave=False)
            for step in bar:
                total = 0.0
                for _ in range(sc.grad_accumulation):
                    batch = self._batch(latents[k], prior, k, prior_id, gen, device)
                    terms = method.loss(unet, batch)
                    loss = sum(terms.values()) / sc.grad_accumulation
                    if not torch.isfinite(loss):
                        bad = {n: float(v) for n, v in terms.items()}
                        raise RunStopped(f"method {self.name}: non-finite loss at task {k + 1} step {step + 1}: {bad}; "
                                         f"lower its weight with --set (nothing of this method was kept)")
                    loss.backward()
                    total += float(loss.detach())
                method.before_step(unet)
                opt.step()
                method.after_step(unet)
                opt.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{total:.4f}")
            bar.close()

            def data(k=k):
                g = torch.Generator().manual_seed(derive_seed(self.seed, "task-data", k))
                x = latents[k]
                for i in range(0, x.shape[0], sc.batch_size):
                    xc = x[i:i + sc.batch_size]
                    xp = prior[torch.randint(0, prior.shape[0], (sc.prior_batch_size,), generator=g)]
                    yield (torch.cat([xc, xp]), torch.tensor([k] * xc.shape[0] + [prior_id] * xp.shape[0]))

            if k == r.num_tasks - 1:
                method.end_last_task(unet, data)
            else:
                method.end_task(unet, data)
            method.post_task_phase(unet, data)
            row, acc = self._evaluate(unet, cond, tokenizer, text_encoder, k, encode_prompts)
            features.append(row)
            recognised.append(acc)
            self.log(f"{self.name}: task {k + 1}/{r.num_tasks} done ({time.time() - t0:.0f}s)"
                     + ("" if math.isnan(acc) else f", samples recognised as their digit {acc:.2f}"))
        stored = unet_count + _count_tensors(method.state_dict(), set())
        stored += sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
        stored += len(tokens) * text_encoder.get_input_embeddings().embedding_dim
        return {"features": features, "recognised": recognised, "trained": trained, "stored": stored,
                "unet": unet_count, "time_s": time.time() - t0}

    def _batch(self, x, prior, k, prior_id, gen, device) -> Dict[str, torch.Tensor]:
        sc = self.r.sc
        xc = x[torch.randint(0, x.shape[0], (sc.batch_size,), generator=gen)]
        xp = prior[torch.randint(0, prior.shape[0], (sc.prior_batch_size,), generator=gen)]
        y = torch.tensor([k] * sc.batch_size + [prior_id] * sc.prior_batch_size)
        return {"x": torch.cat([xc, xp]).to(device), "y": y.to(device)}

    def _evaluate(self, unet, cond, tokenizer, text_encoder, k: int, encode_prompts):
        """Every seen concept j <= k sampled from its prompt: features [n, D] per concept, and (dc-digits)
        the fraction the digits classifier recognises as the concept's digit. The noise of (task k,
        concept j) is the same for every method (common random numbers)."""
        sc = self.r.sc
        row, hits, total = [], 0, 0
        with torch.no_grad():
            uncond = encode_prompts(tokenizer, text_encoder, [""])[0]
        grid = []
        for j in range(k + 1):
            states = cond.prompt_states([j])[0]
            g = torch.Generator().manual_seed(derive_seed(self.seed, "eval", k, j))
            z = sample_text(unet, states, uncond, sc.eval_samples_per_concept,
                            size=self.base.codec.latent_size(sc.resolution), scheduler_config=self.base.scheduler_config,
                            sampler=sc.sampler, steps=sc.sampler_steps, guidance=sc.guidance, generator=g,
                            clip_sample=self.base.pixel_space)
            x = self.base.codec.decode(z)
            row.append(self.extractor(x).float().cpu())
            grid.append(x[:8].cpu())
            if self.classifier is not None and self.concepts[j].label is not None:
                from cdgfast.metrics.classifier import predict
                pred = predict(self.classifier, x.to(next(self.classifier.parameters()).device))
                hits += int((pred.cpu() == self.concepts[j].label).sum())
                total += x.shape[0]
        from .report import save_sample_grid
        xs = torch.cat(grid)
        ys = torch.cat([torch.full((g.shape[0],), j) for j, g in enumerate(grid)])
        save_sample_grid(xs, ys, self.out / "samples" / f"{self.name}_task{k + 1}.png", per_class=8)
        return row, (hits / total if total else float("nan"))


# ------------------------------------------------------------------------------------------- the run
def run_personalization(cfg: TextRunConfig) -> dict:
    """Run every method of the preset (module docstring); returns the results.json payload."""
    from safetensors.torch import save_file

    from cdgfast.metrics.personalization import nparam_percent, personalization_metrics, resolve_personalization_features

    from . import distributed as D

    r = resolve_text(cfg)  # every option, before anything is written
    out = text_out_dir(cfg, r)
    world = D.env_world_size()
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        prepare_out_dir(out, cfg.resume, cfg.overwrite)
    fingerprint = _digest({"preset": r.preset.name, "scale": r.scale, "sc": dataclasses.asdict(r.sc),
                           "num_tasks": r.num_tasks, "seed": cfg.seed, "pretrained": cfg.pretrained,
                           "concepts": cfg.concepts, "clip": cfg.clip, "set": cfg.method_args})
    old = _read(out / "run.json")
    if main and cfg.resume and old is not None and old.get("fingerprint") != fingerprint:
        raise RunError(f"--resume: {out} holds a run with other settings (preset, scale, sizes, seed, paths or "
                       f"--set differ); resume it with the command that started it, or choose another --out")
    if world > 1:
        # torchrun: whole methods per process (r.methods[rank::world]); the process group only orders the
        # start (rank 0 prepares the folder and the base model first) and the end (rank 0 writes the
        # results once every method is done). A method can take hours at paper scale, hence the timeout.
        info = D.init_from_env(cfg.device, backend="gloo", timeout=datetime.timedelta(days=7))
        if info.device.type == "cuda":
            r = dataclasses.replace(r, device=info.device)
        rank = info.rank
    else:
        rank = 0
    log = Logger(out / ("train.log" if main else f"train.rank{rank}.log"), enabled=True)
    if not main:
        D.barrier()  # rank 0 first checks the inputs, prepares the folder and makes the base model
    # the inputs before anything is written: data, the base model, the features
    from cdgfast.metrics.classifier import get_classifier

    classifier = None
    if r.preset.source == "digits":
        from .ruler import embedded_data
        data = embedded_data("digits")
        concepts = digits_concepts(data, r.sc, r.num_tasks)
        classifier, clf_info = get_classifier("digits", data.train.x, data.train.y, data.num_classes,
                                              cache_dir=cfg.cache_dir, progress=cfg.progress)
        classifier = classifier.to(r.device).eval()
    else:
        concepts = folder_concepts(Path(cfg.concepts), r.sc, r.num_tasks)
    extractor, label = resolve_personalization_features(cfg.clip, classifier, device=r.device)
    if main:
        if cfg.overwrite:
            clear_run_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "run.json", {"fingerprint": fingerprint, "config": _as_json(dataclasses.asdict(cfg)),
                                  "versions": versions()})
    log.start_file()
    base = _base(cfg, r, data if r.preset.source == "digits" else None, out, log)
    if main:
        D.barrier()  # the other ranks go on and load what is now on disk: the cached base, the prior images
    if main and r.preset.source == "digits":
        follow = base_prompt_following(base, classifier, r.sc, DIGITS_BASE_SEED, r.device)
        base.info["named_prompt_recognised"] = follow
        log("base model: samples of its named prompts recognised as their digit: "
            + ", ".join(f"{k} {v:.2f}" for k, v in follow.items()) + " (chance 0.10)")
    log(f"metrics on {label} features" + (" (the digits classifier's: not comparable with the paper's CLIP "
                                             "numbers)" if label == "classifier-fallback" else ""))
    real = [extractor(c.reference.to(r.device)).float().cpu() for c in concepts]
    for name in r.methods[rank::world]:
        ck = out / "checkpoints" / _safe(name)
        if _finished(out, name, fingerprint) is not None:
            log(f"{name}: finished earlier, kept")
            continue
        log(f"{name}: training {r.num_tasks} tasks" + (f" (rank {rank} of {world})" if world > 1 else ""))
        raw = MethodRun(name, r, base, concepts, extractor, classifier, cfg.seed, cfg.method_args, out, log,
                        cfg.progress and main).run()  # one process draws progress bars
        nparam = nparam_percent(raw["trained"], raw["stored"], raw["unet"])
        metrics = personalization_metrics(real, raw["features"], label, kid_subsets=r.sc.kid_subsets,
                                          generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "kid")),
                                          nparam=nparam)
        metrics["recognised"] = raw["recognised"]
        metrics["time_s"] = raw["time_s"]
        ck.mkdir(parents=True, exist_ok=True)
        save_file({f"{i}.{j}": f.contiguous() for i, row in enumerate(raw["features"]) for j, f in enumerate(row)},
                  str(ck / "features.safetensors"))
        _write(ck / "result.json", {"fingerprint": fingerprint, "result": _as_json(metrics)})
        if main:  # the table so far: every method finished by any rank
            _write_outputs(out, _payload(r, cfg, label, base, _collect(out, r.methods, fingerprint), concepts, world))
        log(f"{name}: A_MMD {metrics['paper_units']['a_mmd']:.2f} (x1e3), KID {metrics['paper_units']['kid']:.2f} "
            f"(x1e5), {raw['time_s']:.0f}s")
    D.barrier()  # every rank's methods are done
    payload = _payload(r, cfg, label, base, _collect(out, r.methods, fingerprint), concepts, world)
    if main:
        _write_outputs(out, payload)
        log(f"results: {out / 'results.json'}, report: {out / 'report.md'}")
    log.close()
    return payload


def _base(cfg: TextRunConfig, r: _Resolved, data, out: Path, log) -> "Base":
    """The run's base model: dc-digits pretrains (or loads from the cache) its tiny model, the folder
    presets load the local Stable Diffusion (and make or load the prior images in OUT/checkpoints)."""
    if r.preset.source == "digits":
        return pretrain_digits(data.train.x, data.train.y, r.sc, r.preset.prior_prompt, DIGITS_BASE_SEED, r.device,
                               cfg.cache_dir, cfg.progress, log)
    return load_sd_base(cfg.pretrained, r.preset.prior_prompt, r.sc, cfg.seed, r.device, out, log)


def _finished(out: Path, name: str, fingerprint: str) -> Optional[dict]:
    """A method's metrics if it finished in this run's folder with these settings, else None."""
    ck = out / "checkpoints" / _safe(name)
    done = _read(ck / "result.json")
    if done is not None and done.get("fingerprint") == fingerprint and (ck / "features.safetensors").is_file():
        return done["result"]
    return None


def _collect(out: Path, methods: List[str], fingerprint: str) -> Dict[str, dict]:
    """The finished methods of the run, in the run's order (whichever process ran them)."""
    return {m: res for m in methods if (res := _finished(out, m, fingerprint)) is not None}


def _write_outputs(out: Path, payload: dict) -> None:
    _write(out / "results.json", payload)
    (out / "report.md").write_text(text_report(payload))


# -------------------------------------------------------------------------------------------------- --seeds
TEXT_SEED_METRICS = ("a_mmd", "bwt_mmd", "kid", "clip_i2i", "f_mmd")  # paper units (x1e3, x1e3, x1e5, x100, 1)


def run_text_seeds(cfg: TextRunConfig, seeds: List[int]) -> dict:
    """`--seeds S1 S2 ...` for a personalization preset: one complete run per seed in <out>/seed-<s>/ (its
    own results, report, samples and --resume), then <out>/results.json and <out>/report.md with every
    metric's mean and standard error per method and the A_MMD ordering of the means against the paper's
    (the paper reports means over 3 seeds). The dc-digits base model is the same for every seed (it plays
    the part of the pretrained Stable Diffusion, DIGITS_BASE_SEED): the seeds vary the personalization."""
    from .loop import check_seeds, finished_seeds, mean_se, method_rows, open_seeds_dir, seed_dir

    check_seeds(seeds, cfg.resume, cfg.overwrite)
    r = resolve_text(cfg)  # bad names and --set values fail before any folder is touched
    out = text_out_dir(cfg, r)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes the seeds' files
    all_seeds = open_seeds_dir(out, seeds, cfg.resume, cfg.overwrite,
                               _as_json({**dataclasses.asdict(cfg), "seed": None, "out": str(out)}), write=main)
    per_seed: Dict[int, dict] = {}
    for seed in seeds:
        d = seed_dir(out, seed)
        child = dataclasses.replace(cfg, seed=int(seed), out=str(d), resume=bool(cfg.resume and _read(d / "run.json")),
                                    overwrite=bool(cfg.overwrite))
        per_seed[seed] = run_personalization(child)
    finished_seeds(out, all_seeds, per_seed)
    order, by_method = method_rows(per_seed)
    summary = {}
    for m, rows in by_method.items():
        entry = {k: mean_se([row["paper_units"][k] if row else None for row in rows]) for k in TEXT_SEED_METRICS}
        entry["recognised_last_task"] = mean_se([_last_recognised(row) for row in rows])
        summary[m] = entry
    means = {m: {"final": {"a_mmd": e["a_mmd"]["mean"]}} for m, e in summary.items() if e["a_mmd"]["mean"] is not None}
    first = per_seed[order[0]]
    payload = _as_json({"kind": "personalization-seeds", "preset": r.preset.name, "scale": r.scale, "seeds": order,
                        "features": first["features"], "num_tasks": first["num_tasks"], "concepts": first["concepts"],
                        "base": first["base"], "methods": summary, "ordering_a_mmd": ordering(means),
                        "ordering_per_seed": {str(s): per_seed[s]["ordering_a_mmd"] for s in order},
                        "paper": r.preset.paper, "paper_source": r.preset.paper_source,
                        "per_seed": {str(s): {"out": seed_dir(out, s).name, "methods": per_seed[s]["methods"]}
                                     for s in order}, "versions": versions()})
    if main:
        _write(out / "results.json", payload)
        (out / "report.md").write_text(text_seeds_report(payload))
    if main and cfg.progress:
        print(f"results: {out / 'results.json'}, report: {out / 'report.md'}")
    return payload


def _last_recognised(row: Optional[dict]) -> Optional[float]:
    rec = (row or {}).get("recognised") or []
    return rec[-1] if rec and isinstance(rec[-1], (int, float)) and math.isfinite(rec[-1]) else None


def _pm(e: dict) -> str:
    if e["mean"] is None:
        return "-"
    return _fmt(e["mean"]) + ("" if e["se"] is None else f" ± {_fmt(e['se'])}")


def text_seeds_report(payload: dict) -> str:
    """report.md of a --seeds personalization run: mean ± standard error per method and metric, the
    ordering of the mean A_MMD against the paper's, and each seed's own ordering."""
    seeds = payload["seeds"]
    lines = [f"# {payload['preset']} ({payload['scale']}), seeds {seeds}", "",
             f"{payload['num_tasks']} tasks: {', '.join(payload['concepts'])}. Metrics on **{payload['features']}** "
             f"features. Each seed is a complete run in `seed-<s>/` (its own report.md and samples); mean ± standard "
             f"error (sample standard deviation / sqrt(seeds)).", "",
             "| method | " + " | ".join(h for k, h in METRIC_COLUMNS if k in TEXT_SEED_METRICS)
             + " | recognised (last task) | seeds |", "|---|" + "---|" * (len(TEXT_SEED_METRICS) + 2)]
    for m, e in payload["methods"].items():
        lines.append(f"| {m} | " + " | ".join(_pm(e[k]) for k, _ in METRIC_COLUMNS if k in TEXT_SEED_METRICS)
                     + f" | {_pm(e['recognised_last_task'])} | {e['a_mmd']['n']} of {len(seeds)} |")
    o = payload["ordering_a_mmd"]
    if o["paper"]:
        lines += ["", "A_MMD ordering of the means (lower is better):", "", f"- paper: {' < '.join(o['paper'])}",
                  f"- these seeds: {' < '.join(o['ours'])}",
                  f"- Kendall's tau {_fmt(o['kendall_tau'])}; the paper's ordering "
                  + ("appears." if o["same"] else "does not appear."), "", "Per seed:", ""]
        for s, os_ in payload["ordering_per_seed"].items():
            lines.append(f"- seed {s}: {' < '.join(os_['ours'])} (tau {_fmt(os_['kendall_tau'])})")
    return "\n".join(lines) + "\n"


def text_out_dir(cfg: TextRunConfig, r: Optional[_Resolved] = None) -> Path:
    """--out, or runs/<preset>-<scale> (then -2, -3, ... for a new run; the newest with --resume)."""
    if cfg.out:
        return Path(cfg.out)
    r = r or resolve_text(cfg)
    return default_out_dir(r.preset.name, r.scale, cfg.resume)


def _safe(name: str) -> str:
    return name.replace("+", "_plus_")


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def ordering(results: Dict[str, dict], metric: str = "a_mmd") -> dict:
    """The paper's Table-1 A_MMD ordering against this run's: the methods of PAPER_A_MMD_ORDER that ran,
    sorted by this run's value, Kendall's tau between the two orders and whether they are the same."""
    common = [m for m in PAPER_A_MMD_ORDER if m in results]
    ours = sorted(common, key=lambda m: results[m]["final"][metric])
    pos = {m: i for i, m in enumerate(ours)}
    pairs = [(a, b) for i, a in enumerate(common) for b in common[i + 1:]]
    concordant = sum(1 for a, b in pairs if pos[a] < pos[b])
    tau = (2 * concordant - len(pairs)) / len(pairs) if pairs else float("nan")
    return {"paper": common, "ours": ours, "kendall_tau": tau, "same": ours == common}


def _payload(r: _Resolved, cfg: TextRunConfig, label: str, base: Base, results: Dict[str, dict],
             concepts: List[Concept], world_size: int = 1) -> dict:
    return _as_json({"kind": "personalization", "preset": r.preset.name, "scale": r.scale, "seed": cfg.seed,
                     "world_size": world_size,
                     "features": label, "num_tasks": r.num_tasks, "concepts": [c.name for c in concepts],
                     "base": base.info, "methods": results, "ordering_a_mmd": ordering(results),
                     "paper": r.preset.paper, "paper_source": r.preset.paper_source, "versions": versions()})


METRIC_COLUMNS = (("nparam_train", "N_param Train %"), ("nparam_store", "N_param Store %"), ("kid", "KID x1e5"),
                  ("a_mmd", "A_MMD x1e3"), ("bwt_mmd", "BWT_MMD x1e3"), ("clip_i2i", "CLIP I2I x100"),
                  ("f_mmd", "F_MMD"))


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"


def text_report(payload: dict) -> str:
    """report.md: this run's table beside the paper's Table 1, the A_MMD ordering, per-task values."""
    feats = payload["features"]
    lines = [f"# {payload['preset']} ({payload['scale']}), seed {payload['seed']}", "",
             f"{payload['num_tasks']} tasks, one concept each: {', '.join(payload['concepts'])}. Metrics on "
             f"**{feats}** features" + (" (the digits classifier's penultimate layer: values are not comparable with "
                                        "the paper's CLIP numbers; orderings are)" if feats == "classifier-fallback"
                                        else "") + ".", "",
             "| method | " + " | ".join(h for _, h in METRIC_COLUMNS) + " | recognised (last task) | time s |",
             "|---|" + "---|" * (len(METRIC_COLUMNS) + 2)]
    for m, res in payload["methods"].items():
        pu = res["paper_units"]
        rec = res.get("recognised") or []
        lines.append(f"| {m} | " + " | ".join(_fmt(pu.get(k)) for k, _ in METRIC_COLUMNS)
                     + f" | {_fmt(rec[-1]) if rec else '-'} | {res.get('time_s', 0):.0f} |")
    if payload.get("paper"):
        lines += ["", f"Paper ({payload['paper_source']}):", "",
                  "| method | " + " | ".join(h for _, h in METRIC_COLUMNS) + " |", "|---|" + "---|" * len(METRIC_COLUMNS)]
        for m, vals in payload["paper"].items():
            lines.append(f"| {m} | " + " | ".join(_fmt(vals.get(k)) for k, _ in METRIC_COLUMNS) + " |")
    o = payload["ordering_a_mmd"]
    if o["paper"]:
        lines += ["", "A_MMD ordering (lower is better) of the methods in the paper's comparison:", "",
                  f"- paper: {' < '.join(o['paper'])}", f"- this run: {' < '.join(o['ours'])}",
                  f"- Kendall's tau {_fmt(o['kendall_tau'])}; the paper's ordering "
                  + ("appears." if o["same"] else "does not appear."),
                  "", "One seed: the differences between close methods are within the seed-to-seed spread "
                      "(the paper reports means over 3 seeds)."]
    follow = (payload.get("base") or {}).get("named_prompt_recognised")
    if follow:
        lines += ["", "The base model before personalization: samples of its named prompts (\"a photo of a <name> "
                      "digit\") recognised as their digit: " + ", ".join(f"{k} {v:.2f}" for k, v in follow.items())
                  + " (chance 0.10). A token can be bound to a concept only as well as the base follows text at all."]
    lines += ["", "## Per task (A_MMD x1e3 after each task)", ""]
    for m, res in payload["methods"].items():
        a = [None if v is None else v * 1e3 for v in res["per_task"]["a_mmd"]]
        lines.append(f"- {m}: " + ", ".join(_fmt(v) for v in a)
                     + (f"; recognised {', '.join(_fmt(v) for v in res['recognised'])}"
                        if res.get("recognised") and not all(isinstance(v, float) and math.isnan(v)
                                                             for v in res["recognised"]) else ""))
    lines += ["", "Samples: `samples/<method>_task<k>.png` (one row per concept seen so far)."]
    return "\n".join(lines) + "\n"


__all__ = ["TextRunConfig", "Concept", "Codec", "resolve_text", "resolved_text_config", "run_personalization",
           "run_text_seeds", "sample_text", "text_out_dir", "pretrain_digits", "base_prompt_following", "digits_concepts",
           "folder_concepts", "ordering", "text_report", "OUTPUT_FILES"]
