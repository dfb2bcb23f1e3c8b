"""Next-token sampling (greedy or seeded) and a single-process generation loop.

Greedy decoding (temperature 0) is deterministic: it is what the "tokens of a request that lived
through a kill equal those of a failure-free run" check relies on. Seeded sampling is reproducible
given the same ``torch.Generator`` state and the same logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rallypoint.worker.model import StageModel


def sample(logits: Tensor, temperature: float = 0.0, generator: torch.Generator | None = None,
           top_k: int | None = None) -> Tensor:
    """Pick one token per row.

    Args:
        logits: ``[B, V]`` (or ``[B, S, V]``: the last position is used).
        temperature: 0 for greedy argmax; otherwise softmax(logits / temperature) is sampled.
        generator: the source of randomness for sampling (seed it for reproducible draws).
        top_k: keep only the ``top_k`` largest logits before sampling.

    Returns:
        Token ids ``[B]`` (int64), on ``logits``' device.
    """
    if logits.dim() == 3:
        logits = logits[:, -1]                                                   # [B, V]
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]                   # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)                                         # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)         # [B]


@torch.no_grad()
def generate(model: StageModel, prompt: Tensor, steps: int, temperature: float = 0.0,
             generator: torch.Generator | None = None, max_seq: int | None = None) -> tuple[Tensor, list[Tensor]]:
    """Prefill ``prompt`` then decode ``steps`` tokens with the KV cache, in one process.

    ``model`` must be a whole model (first and last stage). The cache is (re)built for this call.

    Args:
        model: the model.
        prompt: token ids ``[B, S]``.
        steps: how many new tokens to produce.
        temperature: see ``sample``.
        generator: see ``sample``.
        max_seq: cache length (default ``S + steps``).

    Returns:
        The new tokens ``[B, steps]`` and the logits of every forward (prefill ``[B, S, V]``, then
        ``steps - 1`` decode steps ``[B, 1, V]``).
    """
    if not (model.first and model.last):
        raise ValueError("generate needs a whole model; use pipeline.pipeline_forward for stages")
    b, s = prompt.shape
    model.setup_cache(b, max_seq or s + steps, device=prompt.device)
    x, pos = prompt, torch.arange(s, device=prompt.device)                       # [B, S], [S]
    tokens, all_logits = [], []
    for _i in range(steps):
        logits = model(x, pos)                                                    # [B, S or 1, V]
        tok = sample(logits, temperature, generator)                              # [B]
        tokens.append(tok)
        all_logits.append(logits)
        x, pos = tok[:, None], pos[-1:] + 1                                       # [B, 1], [1]
    return torch.stack(tokens, dim=1), all_logits
