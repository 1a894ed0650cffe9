"""Accuracy of a low-precision format on the model's own logits: a faster format that changes the answer is not the
same model, so every quantised run records what the format changed.

    report = measure_accuracy(reference_model, quantised_model)     # two Transformers with the same weights

Method (measured): a fixed prompt set (PROMPTS_SEED-seeded random token ids, so any model and vocabulary works
without a tokenizer), the reference (fp32 or bf16) model decodes greedily; the quantised model is fed the same
tokens (teacher forcing: prefill the prompt, then each step feeds the reference's token), so every position compares
logits for the same context. Recorded: max and mean absolute logit error over every position and vocabulary entry,
and greedy agreement (the fraction of positions where both pick the same next token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

PROMPTS_SEED = 20260917
DEFAULT_PROMPTS = 8
DEFAULT_PROMPT_LEN = 16
DEFAULT_NEW_TOKENS = 8


@dataclass
class AccuracyReport:
    """The error one precision introduces against a reference, on the model's own logits (measured)."""

    precision: str  # the quantised model's precision label ("fp8", "nvfp4+kv-fp8", ...)
    reference: str  # the reference model's dtype ("fp32", "bf16")
    prompts: int
    prompt_len: int
    new_tokens: int  # teacher-forced positions per prompt
    positions: int  # prompts x new_tokens
    max_abs_logit_error: float
    mean_abs_logit_error: float
    mean_abs_reference_logit: float  # the scale the errors compare against
    greedy_agreement: float  # fraction of positions whose argmax matches the reference's
    prompt_set: str  # how the prompts were made
    provenance: str = "measured"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AccuracyReport:
        return cls(**d)


def prompt_set(vocab_size: int, prompts: int = DEFAULT_PROMPTS, prompt_len: int = DEFAULT_PROMPT_LEN,
               seed: int = PROMPTS_SEED) -> torch.Tensor:
    """(prompts, prompt_len) int64 token ids, uniform over the vocabulary, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (prompts, prompt_len), generator=gen, dtype=torch.int64)


@dataclass
class ReferenceRun:
    """The reference model's greedy decode of the prompt set: computed once, compared against many formats."""

    label: str
    ids: torch.Tensor  # (B, S) prompts
    tokens: torch.Tensor  # (B, n) greedy tokens
    logits: torch.Tensor  # (B, n, V) fp32 on the CPU
    seed: int


@torch.no_grad()
def reference_run(reference: Any, *, prompts: int = DEFAULT_PROMPTS, prompt_len: int = DEFAULT_PROMPT_LEN,
                  new_tokens: int = DEFAULT_NEW_TOKENS, seed: int = PROMPTS_SEED) -> ReferenceRun:
    for name, value in (("prompts", prompts), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    ids = prompt_set(reference.config.vocab_size, prompts, prompt_len, seed)
    out, logits = reference.generate(ids, new_tokens, return_logits=True)  # (B, S+n), (B, n, V)
    reference.free_cache()
    return ReferenceRun(reference.precision.label, ids, out[:, prompt_len:].cpu(), logits.float().cpu(), seed)


@torch.no_grad()
def measure_accuracy(reference: Any, quantised: Any, *, prompts: int = DEFAULT_PROMPTS,
                     prompt_len: int = DEFAULT_PROMPT_LEN, new_tokens: int = DEFAULT_NEW_TOKENS,
                     seed: int = PROMPTS_SEED) -> AccuracyReport:
    """Compare `quantised` with `reference` (a Transformer of the same config and weights, or its ReferenceRun)."""
    ref = reference if isinstance(reference, ReferenceRun) else reference_run(
        reference, prompts=prompts, prompt_len=prompt_len, new_tokens=new_tokens, seed=seed)
    prompts, prompt_len = ref.ids.shape
    new_tokens = ref.tokens.shape[1]
    if ref.logits.shape[-1] != quantised.config.vocab_size:
        raise ValueError("quantised: expected the reference's model (same vocabulary), got another config")
    _, lg = quantised.prefill(ref.ids, new_tokens)
    logits = [lg.float().cpu()]
    for i in range(1, new_tokens):
        quantised.force_next_tokens(ref.tokens[:, i - 1])
        _, lg = quantised.decode_step()
        logits.append(lg.float().cpu())
    quantised.free_cache()
    q_logits = torch.stack(logits, dim=1)  # (B, n, V)
    err = (q_logits - ref.logits).abs()
    agree = (q_logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    return AccuracyReport(
        precision=quantised.precision.label, reference=ref.label, prompts=prompts,
        prompt_len=prompt_len, new_tokens=new_tokens, positions=prompts * new_tokens,
        max_abs_logit_error=err.max().item(), mean_abs_logit_error=err.mean().item(),
        mean_abs_reference_logit=ref.logits.abs().mean().item(), greedy_agreement=agree,
        prompt_set=f"{prompts} prompts of {prompt_len} token ids drawn uniformly with seed {ref.seed}; {new_tokens} "
                   "teacher-forced greedy steps each")
