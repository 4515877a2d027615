"""The text-to-image model layer of continual personalization (SPEC 2.3, the DC-score paper's section 4
and App. H): Stable Diffusion v1.x parts, offline tiny stand-ins, modifier tokens V*_n and prompt encoding.

* ``load_stable_diffusion(pretrained, dtype=None, device=None)``: the UNet, VAE, CLIP text encoder,
  tokenizer and scheduler configuration of a LOCAL Stable Diffusion v1.x directory (the diffusers layout:
  ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), always ``local_files_only``:
  nothing is ever downloaded. An absent or incomplete directory is a ``ValueError`` that names
  ``pretrained`` and lists what is missing.
* ``tiny_text_models(...)``: the same parts at CPU size, built offline from random configurations, with a
  word-level tokenizer (``tokenizers`` WordLevel, whitespace pre-tokenizer, lowercase, bos/eos/pad/unk
  specials) that pads every prompt to a fixed length like the real ``CLIPTokenizer`` does for the driver.
* ``add_modifier_token(tokenizer, text_encoder, token, init_word=None)``: a new word V*_n, its embedding
  row the only trainable part of the token table (``ModifierTokenEmbedding``); earlier modifier rows are
  frozen (each task trains only its own token); ``fold_modifier_tokens`` turns the table back into a
  plain ``nn.Embedding`` for ``save_pretrained``.
* ``CROSS_ATTENTION_KV``: LoRA targets for the cross-attention K/V only (``attn2.to_k`` / ``attn2.to_v``)
  for ``cdgfast.models.lora.add_lora``.
* ``encode_prompts(tokenizer, text_encoder, prompts)``: the text encoder's last hidden states
  ``[M, L, D]``, the text conditions of ``cdgfast.ops.dc_predictions`` and of a ``UNet2DConditionModel``.

Why the trainable row is its own ``nn.Parameter``. A gradient mask (a hook that zeroes the gradient of
every other row of the resized ``nn.Embedding.weight``) does not freeze those rows: Adam with
``weight_decay`` adds ``wd * theta`` to the masked gradient, and AdamW's decoupled decay multiplies the
whole tensor by ``1 - lr * wd``, so the 49408 frozen rows of CLIP's table would drift unless they were
restored after every step by whoever steps the optimizer. ``ModifierTokenEmbedding`` instead keeps the
original table as a frozen parameter and every added token as a separate ``[D]`` parameter; only the
current task's row has ``requires_grad``. A frozen row never receives a ``.grad``, and torch's optimizers
skip parameters whose ``.grad`` is None, so they stay bit for bit what they were even when the optimizer
was handed ``text_encoder.parameters()`` with weight decay. The forward gathers base rows and added rows
separately (no [V, D] concatenation per call, no dense [V, D] gradient).

``transformers`` is the optional ``text`` extra (``pip install cdgfast[text]``): it is imported inside the
functions that need it, so ``cdgfast.models`` imports without it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .lora import CROSS_ATTENTION_KV  # LoRA targets: the cross-attention K/V only (attn2.to_k, attn2.to_v)

__all__ = ["CROSS_ATTENTION_KV", "TINY_TEXT_UNET", "TINY_VOCABULARY", "StableDiffusionParts", "ModifierTokenEmbedding",
           "load_stable_diffusion", "tiny_text_models", "tiny_text_unet", "tiny_tokenizer", "add_modifier_token",
           "freeze_modifier_tokens", "fold_modifier_tokens", "modifier_token_ids", "encode_prompts", "SD_SCHEDULER_CONFIG"]


# The tiny text-conditional UNet (latents 4 x 16 x 16, cross-attention width 32): about 0.2M parameters.
TINY_TEXT_UNET: Dict[str, Any] = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8, attention_head_dim=4)
# The tiny VAE: 3 x 32 x 32 images <-> 4 x 16 x 16 latents (one downsampling), SD's latent scaling factor.
TINY_VAE: Dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    norm_num_groups=8, sample_size=32, scaling_factor=0.18215)
# Stable Diffusion v1.x's training noise schedule (its scheduler/scheduler_config.json, PNDM for sampling).
SD_SCHEDULER_CONFIG: Dict[str, Any] = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
# The words of the tiny tokenizer: template prompts of the benchmark ("a photo of a V1 digit", ...) and
# the class names of the small data sets. Anything else is <|unk|>; modifier tokens are added on top.
TINY_VOCABULARY: Tuple[str, ...] = (
    "a", "an", "the", "photo", "picture", "image", "rendering", "of", "in", "on", "with", "and", "style",
    "posing", "together", "my", "digit", "number", "person", "face", "dog", "cat", "object", "toy",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ",", ".")
_SPECIALS = ("<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>")

_EXTRA = "transformers is needed for the text-to-image models: install the `text` extra (pip install 'cdgfast[text]')"


def _transformers():
    try:
        import transformers
    except ImportError as e:  # also when sys.modules["transformers"] is None
        raise ImportError(_EXTRA) from e
    return transformers


def _check_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
    return dtype


def _check_device(device) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a torch.device, a device string or None, got {device!r}") from e


def _check_int(name: str, value, lo: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
    return value


@dataclass
class StableDiffusionParts:
    """The parts of a Stable Diffusion v1.x model the continual-personalization driver uses: `unet`
    (diffusers UNet2DConditionModel), `vae` (AutoencoderKL), `text_encoder` (transformers CLIPTextModel),
    `tokenizer` (CLIPTokenizer, or the tiny word-level tokenizer; both pad to `tokenizer.model_max_length`)
    and `scheduler_config` (the scheduler/scheduler_config.json dict; `noise_schedule()` reads it)."""
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: Dict[str, Any]

    def noise_schedule(self):
        """The training forward process of `scheduler_config` as a cdgfast.diffusion.NoiseSchedule."""
        from diffusers import DDPMScheduler

        from ..diffusion import as_schedule

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
        cfg = {k: self.scheduler_config[k] for k in keys if k in self.scheduler_config}
        return as_schedule(DDPMScheduler(**cfg), "scheduler_config")


# --- loading a local Stable Diffusion directory -----------------------------------------------------------

def _weights(folder: Path, stems: Sequence[str]) -> bool:
    return any((folder / f"{s}.{ext}").is_file() or (folder / f"{s}.{ext}.index.json").is_file()
               for s in stems for ext in ("safetensors", "bin"))


def _missing_parts(root: Path) -> List[str]:
    missing = []
    for sub, stems in (("unet", ("diffusion_pytorch_model",)), ("vae", ("diffusion_pytorch_model",)),
                       ("text_encoder", ("model", "pytorch_model"))):
        d = root / sub
        if not d.is_dir():
            missing.append(f"{sub}/")
            continue
        if not (d / "config.json").is_file():
            missing.append(f"{sub}/config.json")
        if not _weights(d, stems):
            missing.append(f"{sub}/{stems[0]}.safetensors (or .bin)")
    tok = root / "tokenizer"
    if not tok.is_dir():
        missing.append("tokenizer/")
    elif not ((tok / "tokenizer.json").is_file() or ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())):
        missing.append("tokenizer/vocab.json + tokenizer/merges.txt (or tokenizer/tokenizer.json)")
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    return missing


def load_stable_diffusion(pretrained: Union[str, Path], dtype: Optional[torch.dtype] = None,
                          device: Union[str, torch.device, None] = None) -> StableDiffusionParts:
    """Load Stable Diffusion v1.x (v1.4 in the DC-score paper) from the local directory `pretrained`
    (diffusers layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/; e.g. a `git clone` of
    CompVis/stable-diffusion-v1-4 or `save_pretrained` of a pipeline). Never downloads (every part is
    read with local_files_only=True). `dtype` (a floating dtype; None keeps the stored one) applies to
    the UNet, VAE and text encoder; `device` (None: the CPU) too. The models are in eval mode, their
    parameters as stored (the caller freezes what it does not train)."""
    if not isinstance(pretrained, (str, Path)) or not str(pretrained):
        raise ValueError(f"pretrained: expected the path of a local Stable Diffusion directory, got {pretrained!r}")
    dtype, device = _check_dtype(dtype), _check_device(device)
    root = Path(pretrained).expanduser()
    if not root.is_dir():
        raise ValueError(f"pretrained: {str(root)!r} is not a directory; expected a local Stable Diffusion v1.x "
                         f"directory with unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (nothing is downloaded)")
    missing = _missing_parts(root)
    if missing:
        raise ValueError(f"pretrained: {str(root)!r} is not a complete Stable Diffusion v1.x directory; missing: "
                         + ", ".join(missing))
    transformers = _transformers()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True)
    text_encoder = transformers.CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    for m in (unet, vae, text_encoder):
        m.to(device=device, dtype=dtype).eval()
    return StableDiffusionParts(unet, vae, text_encoder, tokenizer, scheduler_config)


# --- offline tiny models -------------------------------------------------------------------------------------

def tiny_tokenizer(words: Sequence[str] = TINY_VOCABULARY, max_length: int = 77):
    """A word-level tokenizer built offline: lowercase, whitespace/punctuation pre-tokenizer, the vocabulary
    `_SPECIALS + words` (ids in that order: pad 0, unk 1, bos 2, eos 3), `<|startoftext|> ... <|endoftext|>`
    around every prompt, `model_max_length = max_length`. Called like the real CLIPTokenizer by the driver
    (`tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
    return_tensors="pt").input_ids` -> [N, max_length]). A transformers PreTrainedTokenizerFast."""
    transformers = _transformers()
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    _check_int("max_length", max_length, 3)
    if isinstance(words, str) or not isinstance(words, Sequence) or not words:
        raise ValueError(f"words: expected a non-empty sequence of strings, got {words!r}")
    bad = [w for w in words if not isinstance(w, str) or not w or w != w.lower() or len(w.split()) != 1]
    dup = len(set(words)) != len(words) or any(w in _SPECIALS for w in words)
    if bad or dup:
        raise ValueError(f"words: expected distinct lowercase words without spaces, not special tokens "
                         f"(offending: {bad[:3] if bad else 'duplicates'})")
    vocab = {w: i for i, w in enumerate(_SPECIALS + tuple(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|pad|>", unk_token="<|unk|>", bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", model_max_length=max_length)


def tiny_text_unet(cross_attention_dim: int = 32, sample_size: int = 16, seed: Optional[int] = None,
                   channels: int = 4, width: int = 16, cross_attention_levels: int = 1):
    """The tiny UNet2DConditionModel (TINY_TEXT_UNET: block widths (width, 2 width), cross-attention in
    the mid block and at the first `cross_attention_levels` resolutions, down and up: 1 (TINY_TEXT_UNET,
    full resolution only) or 2 (also at half resolution, where a small image's shape is decided)).
    `channels`: input = output channels (4: SD latents; 1: grey pixels, the dc-digits benchmark).
    `seed`: build it under torch.manual_seed(seed) without touching the global RNG."""
    from diffusers import UNet2DConditionModel

    _check_int("cross_attention_dim", cross_attention_dim)
    _check_int("sample_size", sample_size)
    _check_int("channels", channels)
    _check_int("width", width)
    if cross_attention_levels not in (1, 2) or isinstance(cross_attention_levels, bool):
        raise ValueError(f"cross_attention_levels: expected 1 or 2, got {cross_attention_levels!r}")
    if sample_size % 2:
        raise ValueError(f"sample_size: expected an even size (one downsampling), got {sample_size}")
    if width % 8:
        raise ValueError(f"width: expected a multiple of 8 (GroupNorm with 8 groups), got {width}")
    cfg = {**TINY_TEXT_UNET, "sample_size": sample_size, "cross_attention_dim": cross_attention_dim,
           "in_channels": channels, "out_channels": channels, "block_out_channels": (width, 2 * width)}
    if cross_attention_levels == 2:
        cfg.update(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    if seed is None:
        return UNet2DConditionModel(**cfg)
    _check_int("seed", seed, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**cfg)


def tiny_text_models(max_length: int = 77, hidden_size: int = 32, words: Sequence[str] = TINY_VOCABULARY,
                     seed: int = 0) -> StableDiffusionParts:
    """Random CPU-sized stand-ins for Stable Diffusion, built offline: tiny_text_unet (cross-attention
    width `hidden_size`), a tiny AutoencoderKL (3 x 32 x 32 images, 4 x 16 x 16 latents), a CLIPTextModel
    (hidden `hidden_size`, 2 layers, 2 heads, `max_length` positions, vocabulary = the tokenizer's),
    tiny_tokenizer(words, max_length) and SD v1.x's scheduler configuration. `save_pretrained` of each
    part into unet/, vae/, text_encoder/, tokenizer/ (and the scheduler config as
    scheduler/scheduler_config.json) gives a directory load_stable_diffusion reads."""
    transformers = _transformers()
    from diffusers import AutoencoderKL

    _check_int("hidden_size", hidden_size, 2)
    if hidden_size % 2:
        raise ValueError(f"hidden_size: expected an even number (2 attention heads), got {hidden_size}")
    _check_int("seed", seed, 0)
    tokenizer = tiny_tokenizer(words, max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_text_unet(cross_attention_dim=hidden_size)
        vae = AutoencoderKL(**TINY_VAE)
        cfg = transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, projection_dim=hidden_size)
        text_encoder = transformers.CLIPTextModel(cfg)
    return StableDiffusionParts(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer, dict(SD_SCHEDULER_CONFIG))


# --- modifier tokens -------------------------------------------------------------------------------------------

class ModifierTokenEmbedding(nn.Module):
    """A token embedding table grown by modifier tokens: the original table `base` (an nn.Embedding,
    frozen) and one [D] parameter per added token in `rows` (token id = base size + its index). Used as
    the text encoder's input embeddings (set by add_modifier_token). `weight` is the full [V, D] table
    (a fresh concatenation, for reading); training goes through the parameters (module docstring)."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise ValueError(f"base: expected an nn.Embedding, got {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.rows = nn.ParameterList()

    @property
    def base_size(self) -> int:
        return self.base.num_embeddings

    @property
    def num_embeddings(self) -> int:
        return self.base_size + len(self.rows)

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, *(r.unsqueeze(0) for r in self.rows)], 0)

    def row(self, token_id: int) -> torch.Tensor:
        """The embedding of `token_id` (a view of the parameter for an added token)."""
        _check_int("token_id", token_id, 0)
        if token_id >= self.num_embeddings:
            raise ValueError(f"token_id: expected an id below {self.num_embeddings}, got {token_id}")
        return self.base.weight[token_id] if token_id < self.base_size else self.rows[token_id - self.base_size]

    def to_embedding(self) -> nn.Embedding:
        """A plain, frozen nn.Embedding holding a copy of the full table (e.g. to hand the text encoder to
        code that expects one: `text_encoder.set_input_embeddings(emb.to_embedding())`; save_pretrained
        of a text encoder holding modifier tokens writes `base.weight` and `rows.<i>` instead of
        `weight`)."""
        w = self.weight.detach().clone()
        out = nn.Embedding(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
        return out.requires_grad_(False)

    def append(self, init: torch.Tensor) -> int:
        w = self.base.weight
        self.rows.append(nn.Parameter(init.detach().to(device=w.device, dtype=w.dtype).clone().reshape(-1)))
        return self.num_embeddings - 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.base_size - 1))
        if not len(self.rows):
            return out
        added = input_ids >= self.base_size
        extra = F.embedding((input_ids - self.base_size).clamp(min=0, max=len(self.rows) - 1), torch.stack(list(self.rows)))
        return torch.where(added.unsqueeze(-1), extra, out)


def _check_text_encoder(text_encoder) -> nn.Module:
    if not isinstance(text_encoder, nn.Module) or not callable(getattr(text_encoder, "get_input_embeddings", None)):
        raise ValueError(f"text_encoder: expected a transformers text model (CLIPTextModel), got {type(text_encoder).__name__}")
    emb = text_encoder.get_input_embeddings()
    if not isinstance(emb, (nn.Embedding, ModifierTokenEmbedding)):
        raise ValueError(f"text_encoder: expected input embeddings of type nn.Embedding, got {type(emb).__name__}")
    return emb


def _check_tokenizer(tokenizer) -> None:
    if not all(callable(getattr(tokenizer, a, None)) for a in ("__call__", "add_tokens", "convert_tokens_to_ids")) \
            or not isinstance(getattr(tokenizer, "model_max_length", None), int):
        raise ValueError(f"tokenizer: expected a transformers tokenizer (CLIPTokenizer or tiny_tokenizer), "
                         f"got {type(tokenizer).__name__}")


def _ids(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def modifier_token_ids(text_encoder) -> List[int]:
    """The ids of the modifier tokens added to `text_encoder` (in order of addition)."""
    emb = _check_text_encoder(text_encoder)
    return list(range(emb.base_size, emb.num_embeddings)) if isinstance(emb, ModifierTokenEmbedding) else []


def freeze_modifier_tokens(text_encoder) -> None:
    """Freeze every modifier token's embedding (requires_grad False, .grad cleared): after a task, or
    before a consolidation phase that keeps V*_n fixed."""
    emb = _check_text_encoder(text_encoder)
    if isinstance(emb, ModifierTokenEmbedding):
        for r in emb.rows:
            r.requires_grad_(False)
            r.grad = None


def fold_modifier_tokens(text_encoder):
    """Replace the ModifierTokenEmbedding by a plain frozen nn.Embedding of the full table and set
    `config.vocab_size` to its size (what transformers' resize_token_embeddings leaves), so that
    save_pretrained writes a text encoder CLIPTextModel.from_pretrained reads back. Returns `text_encoder`;
    a text encoder without modifier tokens is returned as it is."""
    emb = _check_text_encoder(text_encoder)
    if isinstance(emb, ModifierTokenEmbedding):
        text_encoder.set_input_embeddings(emb.to_embedding())
        cfg = getattr(text_encoder, "config", None)
        if cfg is not None and hasattr(cfg, "vocab_size"):
            cfg.vocab_size = emb.num_embeddings
    return text_encoder


def add_modifier_token(tokenizer, text_encoder, token: str, init_word: Optional[str] = None,
                       freeze_previous: bool = True) -> int:
    """Add the word `token` (V*_n, e.g. "<V1>") to `tokenizer` and one embedding row to `text_encoder`;
    return its id. The new row is initialised from `init_word`'s embedding (a word that is one token of
    the tokenizer, e.g. a rare token as in Custom Diffusion, or the class name as in Textual Inversion)
    or, when `init_word` is None, from the mean of the original vocabulary's rows (deterministic, no
    random numbers). The text encoder's input embeddings become a ModifierTokenEmbedding (once): the
    original table is frozen, the new row is a separate trainable parameter, and with `freeze_previous`
    (default) the earlier modifier tokens are frozen, so a task trains only its own token. The rest of
    the text encoder is left as it is (freeze it before: `text_encoder.requires_grad_(False)`).

    The token is matched as a whole word, case-sensitively, before the tokenizer's normalization; it
    must be new to the tokenizer, and the tokenizer must have as many tokens as the text encoder has
    embedding rows (the ids must agree)."""
    _check_tokenizer(tokenizer)
    emb = _check_text_encoder(text_encoder)
    if not isinstance(token, str) or not token or len(token.split()) != 1 or token != token.strip():
        raise ValueError(f"token: expected a non-empty word without spaces, got {token!r}")
    if not isinstance(freeze_previous, bool):
        raise ValueError(f"freeze_previous: expected True or False, got {freeze_previous!r}")
    if token in tokenizer.get_vocab():
        raise ValueError(f"token: {token!r} is already in the tokenizer's vocabulary; expected a new word")
    if len(tokenizer) != emb.num_embeddings:
        raise ValueError(f"tokenizer: has {len(tokenizer)} tokens but the text encoder's embedding table has "
                         f"{emb.num_embeddings} rows; expected the pair they were trained as")
    init_id = None
    if init_word is not None:
        ids = _ids(tokenizer, init_word) if isinstance(init_word, str) else []
        if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"init_word: expected a word that is one known token of the tokenizer, got "
                             f"{init_word!r} ({len(ids)} tokens)")
        init_id = ids[0]
    from tokenizers import AddedToken

    if not isinstance(emb, ModifierTokenEmbedding):
        emb = ModifierTokenEmbedding(emb)
        text_encoder.set_input_embeddings(emb)
    with torch.no_grad():
        init = emb.base.weight.mean(0) if init_id is None else emb.row(init_id)
    if freeze_previous:
        freeze_modifier_tokens(text_encoder)
    tokenizer.add_tokens([AddedToken(token, single_word=True, lstrip=False, rstrip=False, normalized=False)])
    new_id = tokenizer.convert_tokens_to_ids(token)
    idx = emb.append(init)
    if new_id != idx or _ids(tokenizer, token) != [new_id]:
        raise RuntimeError(f"token: the tokenizer gave {token!r} the id {new_id}, the embedding row is {idx}")
    return new_id


# --- prompts -------------------------------------------------------------------------------------------------------

def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """The text conditions of `prompts` as Stable Diffusion v1.x computes them: token ids padded to
    `tokenizer.model_max_length` (L; 77 for CLIP), no attention mask, the text encoder's last hidden
    state -> [M, L, D] on the text encoder's device and dtype (what UNet2DConditionModel takes as
    encoder_hidden_states, and ops.dc_predictions as text conditions). Runs with gradients unless the
    caller disables them (a trainable modifier token gets its gradient through here). A prompt longer
    than L tokens (with bos/eos) is refused rather than truncated: truncation could cut off V*_n."""
    _check_tokenizer(tokenizer)
    emb = _check_text_encoder(text_encoder)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts \
            or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    L = tokenizer.model_max_length
    positions = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", L)
    if L > positions:
        raise ValueError(f"tokenizer: model_max_length {L} exceeds the text encoder's {positions} positions")
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n > L]
    if long:
        raise ValueError(f"prompts[{long[0]}]: {lengths[long[0]]} tokens, expected at most {L} "
                         f"(tokenizer.model_max_length, with bos/eos)")
    ids = tokenizer(list(prompts), padding="max_length", max_length=L, truncation=True, return_tensors="pt")["input_ids"]
    w = emb.base.weight if isinstance(emb, ModifierTokenEmbedding) else emb.weight
    return text_encoder(ids.to(w.device))[0]
