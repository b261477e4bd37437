"""transformers' logits processors (``transformers.generation``) as ``generate`` chains them.

- **A masked token stays masked, never NaN.** In a chain, an earlier processor sets a score to -inf
  (``MinLengthLogitsProcessor`` masks EOS until the minimum length; top-k/top-p mask the tail); every
  later processor must leave -inf as -inf and make no NaN (a NaN row makes sampling fail and greedy
  pick garbage). Oracle: IEEE arithmetic -- each processor is run on scores holding -inf and the
  output is checked for NaN and for -inf kept where it was.
- **Every expanded copy of a prompt is treated as that prompt.** ``generate`` expands a batch of B
  prompts to B*k rows (``num_beams``/``num_return_sequences``, ``repeat_interleave``); a processor
  holding per-prompt state must use prompt ``r // k`` for row ``r``. Oracle:
  ``EncoderRepetitionPenaltyLogitsProcessor``'s formula (its docstring: prompt tokens' scores
  multiplied by 1/penalty when negative, by penalty otherwise) computed here in numpy, row by row.
"""

from __future__ import annotations

import numpy as np
import pytest

from suites.helpers import assertions as ah
from suites.helpers.packages import need

pytestmark = [pytest.mark.reference]

VOCAB, EOS, PROMPTS, COPIES = 32, 2, 2, 3
PENALTY = 1.3


#: name -> how ``generate`` would configure that processor (given transformers.generation and the
#: prompts' ids), for a batch whose rows are 6 tokens long.
PROCESSORS = {
    "min_length": lambda gen, prompt_ids: gen.MinLengthLogitsProcessor(min_length=10, eos_token_id=EOS),
    "exponential_decay_length_penalty": lambda gen, prompt_ids: gen.ExponentialDecayLengthPenalty(
        (2, 1.5), eos_token_id=EOS, input_ids_seq_length=1),
    "repetition_penalty": lambda gen, prompt_ids: gen.RepetitionPenaltyLogitsProcessor(PENALTY),
    "encoder_repetition_penalty": lambda gen, prompt_ids: gen.EncoderRepetitionPenaltyLogitsProcessor(PENALTY,
                                                                                                      prompt_ids),
    "no_repeat_ngram": lambda gen, prompt_ids: gen.NoRepeatNGramLogitsProcessor(2),
    "temperature": lambda gen, prompt_ids: gen.TemperatureLogitsWarper(0.7),
    "top_k": lambda gen, prompt_ids: gen.TopKLogitsWarper(5),
    "top_p": lambda gen, prompt_ids: gen.TopPLogitsWarper(0.9),
}


def processor(name: str):
    """The processor ``name`` of :data:`PROCESSORS`, for the prompts [5, 6, 7] and [8, 9, 5]."""
    gen = need("transformers").generation
    import torch

    return PROCESSORS[name](gen, torch.tensor([[5, 6, 7], [8, 9, 5]]))


def batch(rows: int):
    """(input_ids (rows, 6), scores (rows, VOCAB)) seeded; EOS and token 5 masked to -inf in every row."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (rows, 6), generator=g)
    scores = torch.randn(rows, VOCAB, generator=g) * 3
    scores[:, [EOS, 5]] = float("-inf")
    return ids, scores


@pytest.mark.parametrize("name", PROCESSORS)
def test_a_masked_score_stays_minus_inf_and_nothing_becomes_nan(name):
    ids, scores = batch(PROMPTS)
    out = processor(name)(ids, scores.clone()).numpy()
    before = scores.numpy()
    nan = np.argwhere(np.isnan(out))
    assert nan.size == 0, f"{name}: NaN at (row, token) {nan[:4].tolist()} of scores that held -inf at {EOS} and 5"
    unmasked = np.argwhere(np.isneginf(before) & ~np.isneginf(out))
    assert unmasked.size == 0, f"{name}: -inf became finite at (row, token) {unmasked[:4].tolist()}"


def test_each_expanded_copy_of_a_prompt_gets_that_prompts_encoder_repetition_penalty():
    import torch

    penalty = processor("encoder_repetition_penalty")
    prompt_ids = penalty.encoder_input_ids.numpy()
    ids, scores = batch(PROMPTS * COPIES)
    scores[:, [EOS, 5]] = torch.randn(PROMPTS * COPIES, 2, generator=torch.Generator().manual_seed(1))  # finite
    out = penalty(ids, scores.clone()).numpy()
    expected = scores.numpy().astype(np.float64)
    for row in range(PROMPTS * COPIES):
        prompt = row // COPIES  # repeat_interleave: the copies of a prompt are adjacent
        for token in set(prompt_ids[prompt].tolist()):
            s = expected[row, token]
            expected[row, token] = s / PENALTY if s < 0 else s * PENALTY
    # transformers multiplies or divides by float(1 / penalty): two float32 roundings at most
    bound = 2 * float(np.finfo(np.float32).eps) * np.abs(expected)
    ah.assert_within(f"EncoderRepetitionPenalty({PENALTY}) on {PROMPTS} prompts x {COPIES} copies", out, expected,
                     bound, VOCAB)
