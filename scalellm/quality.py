"""Output quality of a model against a full-precision reference, as llama.cpp's ``--kl-divergence`` reports it.

On the same tokens, cut into non-overlapping windows of ``window`` tokens (each window a fresh
context), a model's next-token distribution Q is compared with the reference's P:

* **perplexity**: ``exp(mean NLL)`` of the actual next token under Q (and under P for the reference);
* **mean KL divergence** ``KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))`` per position, averaged
  (llama.cpp ``perplexity --kl-divergence``: "Mean KLD");
* **top-1 agreement**: share of positions where ``argmax Q == argmax P`` ("Same top p");
* **99.9th percentile of |Δlogit|** over every (position, vocabulary entry) of raw logits.

Scored positions: in each window, positions 0..W-2 predict tokens 1..W-1 (the first token of a
window has no prediction; llama.cpp scores only the second half of each chunk instead, so figures
are close to but not identical with its output).

Memory stays bounded by one window: statistics are accumulated window by window as sums, and the
|Δlogit| percentile is exact with a running top-m (m = entries above the percentile), never the
whole (tokens x vocab) array of differences. The reference logits are computed once per device
(:func:`reference_logits`) and kept as one float32 tensor per window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: Default window (context) length in tokens.
WINDOW = 512
#: The |Δlogit| percentile reported (llama.cpp prints 99.9% quantiles of Δp).
DLOGIT_PERCENTILE = 99.9


def windows(ids: list[int], window: int = WINDOW) -> list[list[int]]:
    """``ids`` cut into consecutive windows of ``window`` tokens; a short tail is dropped."""
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one window of {window}")
    return [ids[i * window:(i + 1) * window] for i in range(n)]


def window_logits(model, ids: list[int], device: str):
    """float32 logits ``(W, vocab)`` of one window, on ``device``."""
    import torch

    x = torch.tensor([ids], device=device)  # (1, W)
    with torch.inference_mode():
        logits = model(input_ids=x, use_cache=False).logits[0]  # (W, vocab)
    return logits.float()


def reference_logits(model, ids: list[int], device: str, window: int = WINDOW) -> list:
    """The reference's float32 logits, one ``(W, vocab)`` tensor per window."""
    return [window_logits(model, w, device) for w in windows(ids, window)]


@dataclass
class Quality:
    """What :func:`compare` measures; see the module docstring for definitions."""

    tokens: int  # scored positions
    perplexity: float  # of the model
    reference_perplexity: float
    kld_mean: float  # nats per position
    kld_max: float
    top1_agreement: float  # fraction in [0, 1]
    dlogit_p999: float  # 99.9th percentile of |Δlogit| over positions x vocab
    dlogit_max: float

    def to_json(self) -> dict:
        return asdict(self)


class _TopM:
    """The m largest values seen so far (for an exact high percentile without keeping everything).

    Once m values are held, only values above the current m-th largest can enter: each later chunk
    is filtered against that threshold first, so the full-size ``topk`` runs once.
    """

    def __init__(self, m: int):
        self.m = m
        self.values = None  # (<= m,) float32

    def add(self, x) -> None:
        import torch

        x = x.reshape(-1)
        if self.values is not None:
            if self.values.numel() == self.m:
                x = x[x > self.values.min()]
            x = torch.cat([self.values, x])
        k = min(self.m, x.numel())
        self.values = torch.topk(x, k, sorted=False).values

    def kth_largest(self, k: int) -> float:
        import torch

        return float(torch.topk(self.values, k).values[-1])


def percentile_rank(n: int, q: float) -> int:
    """Nearest-rank percentile: the value at 1-based ascending rank ``ceil(q/100 * n)``,
    returned as its 1-based rank from the top (1 = the maximum)."""
    return n - math.ceil(q / 100 * n) + 1


def compare(model, ids: list[int], reference: list, device: str, window: int = WINDOW) -> Quality:
    """Quality of ``model`` against the per-window ``reference`` logits, on the same ``ids``."""
    import torch

    chunks = windows(ids, window)
    if len(chunks) != len(reference):
        raise ValueError(f"{len(chunks)} windows but {len(reference)} reference windows")
    vocab = reference[0].shape[-1]
    scored = len(chunks) * (window - 1)
    rank = percentile_rank(scored * vocab, DLOGIT_PERCENTILE)
    top = _TopM(rank)
    nll = ref_nll = kld = 0.0
    kld_max = 0.0
    agree = 0
    for chunk, ref in zip(chunks, reference):
        q_logits = window_logits(model, chunk, device)[:-1]  # (W-1, vocab): predictions of tokens 1..W-1
        p_logits = ref[:-1]  # (W-1, vocab)
        target = torch.tensor(chunk[1:], device=q_logits.device)[:, None]  # (W-1, 1)
        lse_q = torch.logsumexp(q_logits, dim=-1)  # (W-1,)
        lse_p = torch.logsumexp(p_logits, dim=-1)
        nll += float((lse_q - q_logits.gather(1, target)[:, 0]).sum(dtype=torch.float64))
        ref_nll += float((lse_p - p_logits.gather(1, target)[:, 0]).sum(dtype=torch.float64))
        # KL(P||Q) = sum_v p (log p - log q) = sum_v p (p_logit - q_logit) - lse_p + lse_q  (sum_v p = 1)
        p = torch.exp(p_logits - lse_p[:, None])  # (W-1, vocab)
        delta = p_logits - q_logits  # (W-1, vocab)
        per_pos = (p * delta).sum(-1) - lse_p + lse_q  # (W-1,)
        per_pos = per_pos.clamp_min(0.0)  # rounding can leave -1e-7 where P == Q
        kld += float(per_pos.sum(dtype=torch.float64))
        kld_max = max(kld_max, float(per_pos.max()))
        agree += int((q_logits.argmax(-1) == p_logits.argmax(-1)).sum())
        top.add(delta.abs_())
        del p, delta, per_pos
    return Quality(
        tokens=scored,
        perplexity=math.exp(nll / scored),
        reference_perplexity=math.exp(ref_nll / scored),
        kld_mean=kld / scored,
        kld_max=kld_max,
        top1_agreement=agree / scored,
        dlogit_p999=top.kth_largest(rank),
        dlogit_max=top.kth_largest(1),
    )


__all__ = ["DLOGIT_PERCENTILE", "Quality", "WINDOW", "compare", "percentile_rank", "reference_logits", "windows"]
