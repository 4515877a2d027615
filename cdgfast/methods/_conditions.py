"""What a condition is, for every method: class labels (the default) or text prompts (SPEC 2.2 / 2.3).

A method never looks at a condition itself. It holds integer *concept ids* (a batch's `y`, a task's
`classes`, the DC candidate sets C_k) and asks its `conditions` object (`Method.setup(conditions=...)`)
to run the model on them:

* `predict(model, x_t, t, y[B])`: the model output for each sample on its own condition;
* `predictions(model, x_t, t, cond[B, K])`: the output for K conditions per sample in one batched
  forward (`cdgfast.ops.dc_predictions`, the (t, eps) of a sample shared by its K conditions);
* `prior`: the id of the shared prior concept c_0 (`num_classes`: the null class of a class-conditional
  model, the prior prompt of a text model), so "the sample's own condition" is `y`, "c_0" is `prior`
  and "earlier tasks' conditions" are the ids of earlier tasks' `classes`, for both kinds;
* `begin_task(task)` / `end_task()` / `trainable_parameters()`: what the conditions themselves train
  (a text model's modifier token of the current task; nothing for class labels).

`ClassConditions`: ids are class labels of a class-conditional UNet (`class_labels=y`).

`TextConditions`: ids index `prompts` (one prompt per concept, e.g. "a photo of a <V1> person"), and
id `num_classes` is `prior_prompt` ("a photo of a person"). A forward encodes only the distinct prompts
it needs (M of them, `cdgfast.models.text.encode_prompts`, with gradients so that the current modifier
token learns) and hands the UNet2DConditionModel the per-sample rows (task loss) or the [M, L, D] states
with a [B, K] index (DC scores). `begin_task` adds the modifier token of each of the task's concepts
(`add_modifier_token`, one new row, earlier rows frozen) and `end_task` freezes it (V*_n is fixed after
its task: the consolidation phases and later tasks use it frozen). A text model has no unconditional
label to drop to, so label dropout is refused (`check_method`): the prior concept is learned by the
base model and kept by prior-preservation samples (batches whose `y` is `prior`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..diffusion import as_schedule, predict_eps
from ..ops import dc_predictions


class ClassConditions:
    """Class labels of a class-conditional diffusers UNet2DModel; the prior concept is the null class."""

    kind = "class"

    def __init__(self):
        self.num_classes: Optional[int] = None

    def bind(self, num_classes: int) -> "ClassConditions":
        self.num_classes = int(num_classes)
        return self

    @property
    def prior(self) -> int:
        return self.num_classes

    def check_method(self, method) -> None:
        """Refuse a method configuration these conditions cannot serve (nothing for class labels)."""

    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        return predict_eps(model, x_t, t, y)

    def predictions(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return dc_predictions(model, x_t, t, cond)

    def begin_task(self, task) -> None:
        pass

    def end_task(self) -> None:
        pass

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        return []


def condition_predictions(model, batch, cond: torch.Tensor, schedule, conditions: Optional[ClassConditions] = None
                          ) -> torch.Tensor:
    """eps_theta(x_t, t, c) for every condition of every sample: cond [B, K] -> eps_pred [B, K, *S], one
    batched forward over B*K with the sample's (t, eps) shared by its K conditions
    (`cdgfast.ops.dc_predictions`, which also runs the condition-independent prefix once per sample).

    DC errors are always taken in eps space: for a v- or x0-prediction model (`schedule.prediction_type`)
    the outputs are converted to eps predictions with `NoiseSchedule.eps_from_prediction` before they are
    returned, so `||eps - eps_hat_k||^2` is the diffusion-classifier error of every model (for v
    prediction it equals abar_t * ||v - v_hat_k||^2). `schedule`: a NoiseSchedule or a diffusers
    scheduler. `conditions`: what the ids in `cond` are (None: class labels; a TextConditions: concept
    ids of its prompts, the prior prompt at id num_classes)."""
    schedule = as_schedule(schedule)
    b, k = cond.shape
    x_t = schedule.add_noise(batch["x"], batch["eps"], batch["t"])
    conditions = ClassConditions() if conditions is None else conditions
    pred = conditions.predictions(model, x_t, batch["t"], cond)
    if schedule.prediction_type == "epsilon":
        return pred
    xk = x_t.repeat_interleave(k, dim=0)
    tk = batch["t"].repeat_interleave(k, dim=0)
    return schedule.eps_from_prediction(pred.reshape(b * k, *x_t.shape[1:]), xk, tk).view(b, k, *x_t.shape[1:])


def _text():
    from ..models import text
    return text


class TextConditions(ClassConditions):
    """Text prompts of a Stable Diffusion style UNet2DConditionModel (module docstring).

    tokenizer, text_encoder: the pair of `cdgfast.models.text` (`tiny_text_models` or
      `load_stable_diffusion`); freeze the text encoder beforehand (`text_encoder.requires_grad_(False)`),
      only the modifier tokens train.
    prompts: one prompt per concept id 0..N-1 (N = the `num_classes` given to `Method.setup`).
    prior_prompt: the prompt of the prior concept c_0 (id N), e.g. "a photo of a person".
    tokens: per concept, the modifier token its prompt contains (added at the first `begin_task` of a task
      with that concept), or None for a prompt of known words; None: no concept has one.
    init_word: the word each new token's embedding starts from (None: the vocabulary's mean row)."""

    kind = "text"

    def __init__(self, tokenizer, text_encoder, prompts: Sequence[str], prior_prompt: str,
                 tokens: Optional[Sequence[Optional[str]]] = None, init_word: Optional[str] = None):
        super().__init__()
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts \
                or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompts: expected a non-empty list of non-empty strings (one per concept), got {prompts!r}")
        if not isinstance(prior_prompt, str) or not prior_prompt.strip():
            raise ValueError(f"prior_prompt: expected a non-empty string (the prior concept c_0), got {prior_prompt!r}")
        tokens = [None] * len(prompts) if tokens is None else list(tokens)
        if len(tokens) != len(prompts):
            raise ValueError(f"tokens: expected one entry per prompt ({len(prompts)}), got {len(tokens)}")
        for i, (tok, p) in enumerate(zip(tokens, prompts)):
            if tok is not None and (not isinstance(tok, str) or tok not in p.split()):
                raise ValueError(f"tokens[{i}]: expected a word of prompts[{i}] ({p!r}) or None, got {tok!r}")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.prompts, self.prior_prompt = list(prompts), prior_prompt
        self.tokens, self.init_word = tokens, init_word
        self._current: List[int] = []  # concept ids whose token trains in this task

    def bind(self, num_classes: int) -> "TextConditions":
        if int(num_classes) != len(self.prompts):
            raise ValueError(f"num_classes: expected {len(self.prompts)} (one concept per prompt of the text "
                             f"conditions), got {num_classes}")
        return super().bind(num_classes)

    def check_method(self, method) -> None:
        if float(method.config.get("label_dropout", 0.0)) > 0:
            raise ValueError(f"label_dropout: method {method.name!r} has label_dropout "
                             f"{method.config['label_dropout']}; text conditions have no unconditional label to "
                             f"drop to (c_0 is the prior prompt); expected 0 (cdgfast.methods.text_config gives "
                             f"the text defaults)")

    # ------------------------------------------------------------------ tokens
    def _has_token(self, c: int) -> bool:
        tok = self.tokens[c]
        return tok is None or tok in self.tokenizer.get_vocab()

    def token_row(self, c: int) -> Optional[torch.nn.Parameter]:
        """The embedding parameter of concept c's modifier token (None: no token, or not added yet)."""
        tok = self.tokens[c]
        if tok is None or tok not in self.tokenizer.get_vocab():
            return None
        return self.text_encoder.get_input_embeddings().row(self.tokenizer.convert_tokens_to_ids(tok))

    def begin_task(self, task) -> None:
        """Add the modifier token of each of the task's concepts (once: a second call, e.g. from another
        member of a composition, finds it) and make only those rows trainable."""
        text = _text()
        classes = [int(c) for c in (getattr(task, "classes", None) or [])]
        bad = [c for c in classes if not 0 <= c < len(self.prompts)]
        if bad:
            raise ValueError(f"task: concept ids {bad} outside the {len(self.prompts)} prompts of the text conditions")
        for c in classes:
            if not self._has_token(c):
                text.add_modifier_token(self.tokenizer, self.text_encoder, self.tokens[c], init_word=self.init_word)
        text.freeze_modifier_tokens(self.text_encoder)
        self._current = classes
        for p in self.trainable_parameters(unfrozen_only=False):
            p.requires_grad_(True)

    def end_task(self) -> None:
        _text().freeze_modifier_tokens(self.text_encoder)
        self._current = []

    def trainable_parameters(self, unfrozen_only: bool = True) -> List[torch.nn.Parameter]:
        rows = [self.token_row(c) for c in self._current]
        return [r for r in rows if r is not None and (r.requires_grad or not unfrozen_only)]

    # ------------------------------------------------------------------ forwards
    def encode(self, ids: torch.Tensor):
        """(hidden [M, L, D] of the M distinct prompts `ids` names, index like `ids` into them)."""
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"y: expected integer concept ids, got {ids.dtype}")
        uniq, index = torch.unique(ids.reshape(-1).cpu(), return_inverse=True)
        vals = uniq.tolist()
        bad = [v for v in vals if not 0 <= v <= len(self.prompts)]
        if bad:
            raise ValueError(f"y: concept ids {bad} outside [0, {len(self.prompts)}] (the prompts and the prior)")
        missing = [v for v in vals if v < len(self.prompts) and not self._has_token(v)]
        if missing:
            raise ValueError(f"y: concepts {missing} have no modifier token yet (their task has not begun)")
        prompts = [self.prior_prompt if v == len(self.prompts) else self.prompts[v] for v in vals]
        hidden = _text().encode_prompts(self.tokenizer, self.text_encoder, prompts)
        return hidden, index.view(ids.shape).to(hidden.device)

    def prompt_states(self, ids: Sequence[int]) -> List[torch.Tensor]:
        """The text encoder's states [L, D] of each concept id's prompt (no gradients)."""
        with torch.no_grad():
            hidden, index = self.encode(torch.tensor(list(ids), dtype=torch.long))
        return [hidden[i] for i in index.tolist()]

    def _prompt(self, c: int) -> str:
        return self.prior_prompt if c == len(self.prompts) else self.prompts[c]

    def _prompt_ids(self, c: int) -> List[int]:
        return list(self.tokenizer(self._prompt(c), add_special_tokens=True)["input_ids"])

    def prompt_length(self, c: int) -> int:
        """Tokens of concept c's prompt with bos / eos (the rows before the padding)."""
        return len(self._prompt_ids(c))

    def target_rows(self, c: int) -> torch.Tensor:
        """The text features of concept c's target words [r, D] (no gradients): the prompt's rows from its
        modifier token to the end-of-text token (a causal text encoder gives every prompt with the same
        prefix the same rows before it; Custom Diffusion's merge constrains these); all rows before the
        padding for a concept without a token."""
        ids = self._prompt_ids(c)
        start = 0
        tok = self.tokens[c] if c < len(self.prompts) else None
        if tok is not None:
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if tid not in ids:
                raise ValueError(f"tokens[{c}]: {tok!r} is not in the tokenized prompt (has its task begun?)")
            start = ids.index(tid)
        return self.prompt_states([c])[0][start:len(ids)]

    def predict(self, model, x_t, t, y):
        if y is None:
            raise ValueError("batch['y']: text conditions need the concept id of every sample")
        hidden, index = self.encode(y)
        out = model(x_t, t, encoder_hidden_states=hidden[index]).sample
        if out.shape != x_t.shape:
            raise ValueError(f"model: expected a prediction of x_t's shape {tuple(x_t.shape)}, got {tuple(out.shape)}")
        return out

    def predictions(self, model, x_t, t, cond):
        hidden, index = self.encode(cond)
        return dc_predictions(model, x_t, t, hidden, index=index.to(x_t.device))


__all__ = ["ClassConditions", "TextConditions", "condition_predictions"]
