"""Greedy generation with prefill and decode timed apart, and a batch "generate a dataset" job.

A generation is two phases with different costs (the usual split of LLM serving, e.g. llama.cpp's
``pp``/``tg`` figures of ``llama-bench``):

* **prefill**: one forward over the whole prompt, filling the KV cache; its last logits give the
  first new token. Throughput = prompt tokens / prefill seconds.
* **decode**: one forward per further token, each over one token with the cache. Throughput =
  decode steps / decode seconds (``max_new_tokens - 1`` steps: the first token came from prefill).

The loop is written out (rather than ``model.generate``) so the two phases can be timed apart; it
is plain greedy decoding (argmax at each step), which is what ``generate(do_sample=False)`` does,
and the suite checks the two agree.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]  # generated tokens, eos included when it ended the run
    text: str  # decoded new tokens, special tokens skipped
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return len(self.prompt_ids) / self.prefill_seconds

    @property
    def decode_steps(self) -> int:
        return max(len(self.new_ids) - 1, 0)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_steps else float("nan")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, device: str, *,
           stop_at_eos: bool = True) -> Generation:
    """Greedy continuation of ``prompt_ids`` -> :class:`Generation` with both phases timed.

    ``stop_at_eos=False`` always runs ``max_new_tokens`` steps (fixed work, for throughput).
    """
    import torch

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    eos = tokenizer.eos_token_id
    x = torch.tensor([prompt_ids], device=device)  # (1, P)
    new: list[int] = []
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=x, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        _sync(device)
        prefill = time.perf_counter() - start
        new.append(token)
        cache = out.past_key_values
        start = time.perf_counter()
        while len(new) < max_new_tokens and not (stop_at_eos and token == eos):
            step = torch.tensor([[token]], device=device)  # (1, 1)
            out = model(input_ids=step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = int(out.logits[0, -1].argmax())  # .item() synchronizes the device
            new.append(token)
        _sync(device)
        decode = time.perf_counter() - start
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(list(prompt_ids), new, text, prefill, decode)


def transformers_greedy_ids(model, tokenizer, prompt_ids: list[int], new_tokens: int, device: str) -> list[int]:
    """The ``new_tokens`` token ids transformers' own ``generate(do_sample=False)`` appends to
    ``prompt_ids`` (no stop at eos): the yardstick :func:`greedy` is held to."""
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids], device=device),
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
                             do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tokenizer.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn under the tokenizer's chat template (plain text if none)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


@dataclass
class DatasetRun:
    path: str
    rows: int
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_steps else float("nan")

    def to_json(self) -> dict:
        return dict(asdict(self), prefill_tokens_per_second=self.prefill_tokens_per_second,
                    decode_tokens_per_second=self.decode_tokens_per_second)


def generate_dataset(model, tokenizer, prompts: list[str], out_path: str | os.PathLike, *, device: str,
                     max_new_tokens: int = 32) -> DatasetRun:
    """Answer each prompt greedily; write one JSON line ``{"prompt", "response", ...}`` per prompt.

    Each line also carries ``prompt_tokens`` and ``response_tokens``. The file is written to a
    temporary name and renamed, so a crash never leaves a partial dataset under ``out_path``.
    """
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    totals = dict(prompt_tokens=0, new_tokens=0, prefill_seconds=0.0, decode_seconds=0.0, decode_steps=0)
    with open(tmp, "w", encoding="utf-8") as f:
        for prompt in prompts:
            g = greedy(model, tokenizer, chat_prompt_ids(tokenizer, prompt), max_new_tokens, device)
            row = {"prompt": prompt, "response": g.text.strip(), "prompt_tokens": len(g.prompt_ids),
                   "response_tokens": len(g.new_ids)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            totals["prompt_tokens"] += len(g.prompt_ids)
            totals["new_tokens"] += len(g.new_ids)
            totals["prefill_seconds"] += g.prefill_seconds
            totals["decode_seconds"] += g.decode_seconds
            totals["decode_steps"] += g.decode_steps
    os.replace(tmp, out_path)
    return DatasetRun(path=str(out_path), rows=len(prompts), **totals)


def read_dataset(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL file written by :func:`generate_dataset`."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["DatasetRun", "Generation", "chat_prompt_ids", "generate_dataset", "greedy", "read_dataset"]
