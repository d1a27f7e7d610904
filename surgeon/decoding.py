"""NBCE (Naive Bayes-based Context Extension; Su, kexue.fm/archives/9617, NAACL 2024): answer a
question over more context than the model's window by decoding over several chunks at once. A
decoding helper, not a rewrite: the model is not changed.

    tokens = surgeon.decoding.nbce_generate(model, [chunk1_ids, chunk2_ids, ...], question_ids)

The batch is one row per chunk, each followed by the question, plus a row with the question alone
(the unconditional p(T)), left-padded. At each step, with log p_k the rows' next-token
log-probabilities after top-p filtering (bojone/NBCE `test.py` at 1a4c178, L74-85):

    H_k = -sum exp(log p_k) * clip(log p_k, -100, 0)      the entropy of each chunk's row
    H_(previous choice) -= eta                             (from the second step on)
    k = argmin over chunks of H_k                          min-entropy pooling
    out = (1 + beta) log p_k - beta log p_0,  where log p_0 > -100, else log p_k

and every row takes the same next token: the argmax of `out` (greedy, the reference's tau -> 0),
or a sample of softmax(out / tau) from `generator`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from surgeon.errors import SurgeonError


def nbce_merge(logp: torch.Tensor, beta: float = 0.25, previous: int | None = None,
               eta: float = 0.1) -> tuple[torch.Tensor, int]:
    """(the merged next-token scores, the chosen chunk row) from `logp` (rows, vocab): row 0 the
    question alone, rows 1.. the chunks, each a log-probability vector (top-p filtered)."""
    if logp.shape[0] < 2:
        raise SurgeonError("NBCE needs the unconditional row and at least one chunk")
    entropy = -(logp.exp() * logp.clip(-100, 0)).sum(dim=-1)
    if previous is not None:
        entropy[previous] -= eta
    k = 1 + int(entropy[1:].argmin())
    merged = (1 + beta) * logp[k] - beta * logp[0]
    return torch.where(logp[0] > -100, merged, logp[k]), k


def _top_p(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper on log-probabilities: tokens outside the smallest set whose
    probability reaches top_p get -inf (the most likely always stays)."""
    if top_p >= 1.0:
        return logp
    ordered, order = logp.sort(dim=-1, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1] = False
    return logp.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def _left_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


@torch.no_grad()
def nbce_generate(model: nn.Module, contexts: Sequence[Sequence[int]], question_ids: Sequence[int], *,
                  max_new_tokens: int = 32, beta: float = 0.25, eta: float = 0.1, top_p: float = 0.95,
                  tau: float | None = None, generator: torch.Generator | None = None,
                  eos_token_id: int | None = None, pad_token_id: int = 0) -> list[int]:
    """The answer's token ids, decoded by NBCE over `contexts` (token id lists) for the question."""
    if not contexts or not question_ids:
        raise SurgeonError("nbce_generate needs at least one context and a non-empty question")
    device = next(model.parameters()).device
    rows = [list(question_ids)] + [list(c) + list(question_ids) for c in contexts]
    ids, mask = _left_padded(rows, pad_token_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    answer: list[int] = []
    previous: int | None = None
    for _ in range(max_new_tokens):
        logp = _top_p(out.logits[:, -1].float().log_softmax(dim=-1), top_p)
        merged, previous = nbce_merge(logp, beta, previous, eta)
        if tau:
            token = int(torch.multinomial((merged / tau).softmax(-1), 1, generator=generator))
        else:
            token = int(merged.argmax())
        answer.append(token)
        if token == eos_token_id:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        step = torch.full((len(rows), 1), token, device=device)
        out = model(input_ids=step, attention_mask=mask, position_ids=positions, past_key_values=out.past_key_values,
                    use_cache=True)
    return answer
