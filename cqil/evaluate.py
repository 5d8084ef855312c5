"""Evaluation of original, parallelized and recovered models.

For now: perplexity on packed token blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def perplexity(model, tokens: torch.LongTensor, *, batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity of a causal LM on packed sequences ``tokens`` of shape (N, T).

    Every position but the first of each row is predicted from the tokens before it in that
    row (rows are independent, no sliding window). Returns ``{"ppl", "nll", "tokens"}`` where
    ``nll`` is the mean negative log-likelihood per predicted token (nats) and ``tokens``
    the number of predicted tokens, N * (T - 1).
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must have shape (N, T) with T >= 2, got {tuple(tokens.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    try:
        with torch.inference_mode():
            for start in tqdm(
                range(0, len(tokens), batch_size), desc="perplexity", unit="batch", disable=not progress
            ):
                batch = tokens[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                # Cross-entropy in float32 even for half-precision models: the sum runs over
                # the whole vocabulary and bf16 loses the small probabilities.
                nll = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
                )
                total_nll += nll.item()
                count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    mean_nll = total_nll / count
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": count}
