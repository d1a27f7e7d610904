"""NBCE decoding (`surgeon.decoding`): the merge step against a hand-computed example; top-p
against transformers' own TopPLogitsWarper; left-padded batched decoding against the same rows run
one by one (an independent loop: each row alone, no padding, its own cache)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from conftest import tiny_gpt2, tiny_llama

import surgeon
from surgeon.decoding import _top_p, nbce_generate, nbce_merge

# row 0: the question alone; rows 1-3: three chunks (V = 4). Entropies by hand:
# uniform ln 4 = 1.3863; [.7,.1,.1,.1]: 0.9404; [.4,.4,.1,.1]: 1.1935; [.97,.01,.01,.01]: 0.1677
PROBS = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.97, 0.01, 0.01, 0.01]])


def test_the_merge_picks_the_most_confident_chunk_and_weighs_out_the_prior() -> None:
    merged, k = nbce_merge(PROBS.log(), beta=0.25)
    assert k == 3  # the smallest entropy, 0.1677
    expected = [1.25 * math.log(0.97) - 0.25 * math.log(0.25)] + [1.25 * math.log(0.01) - 0.25 * math.log(0.25)] * 3
    assert torch.allclose(merged, torch.tensor(expected), atol=1e-6)  # [0.3085, -5.4099, -5.4099, -5.4099]


def test_stickiness_keeps_the_previous_chunk_within_eta() -> None:
    """Chunks 1 and 2 with entropies 0.9404 and 0.8711 (by hand): 2 wins alone; having chosen 1
    before, 1 keeps it (0.9404 - 0.1 < 0.8711)."""
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.7, 0.2, 0.05, 0.05]])
    entropies = -(probs * probs.log()).sum(-1)
    assert abs(entropies[1] - 0.9404) < 1e-3 and abs(entropies[2] - 0.8711) < 1e-3
    assert nbce_merge(probs.log())[1] == 2
    assert nbce_merge(probs.log(), previous=1, eta=0.1)[1] == 1


def test_a_filtered_prior_leaves_the_chunk_alone() -> None:
    logp = PROBS.log()
    logp[0, 1] = float("-inf")  # top-p removed token 1 from the unconditional row
    merged, k = nbce_merge(logp)
    assert merged[1] == logp[k, 1]


@pytest.mark.parametrize("top_p", [0.95, 0.5, 1.0])
def test_top_p_is_transformers_top_p(top_p: float) -> None:
    logp = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    theirs = transformers.TopPLogitsWarper(top_p)(None, logp.clone()) if top_p < 1 else logp
    assert torch.equal(_top_p(logp, top_p), theirs)


def separately(model: torch.nn.Module, contexts: list[list[int]], question: list[int], steps: int) -> list[int]:
    """NBCE with every row run on its own, unpadded, with its own cache."""
    rows = [question] + [c + question for c in contexts]
    caches, last = [], []
    with torch.no_grad():
        for row in rows:
            out = model(input_ids=torch.tensor([row]), use_cache=True)
            caches.append(out.past_key_values)
            last.append(out.logits[0, -1])
        answer, previous = [], None
        for _ in range(steps):
            logp = _top_p(torch.stack(last).float().log_softmax(-1), 0.95)
            merged, previous = nbce_merge(logp, 0.25, previous, 0.1)
            token = int(merged.argmax())
            answer.append(token)
            for i in range(len(rows)):
                out = model(input_ids=torch.tensor([[token]]), past_key_values=caches[i], use_cache=True)
                caches[i], last[i] = out.past_key_values, out.logits[0, -1]
    return answer


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama-rope", "gpt2-absolute-positions"])
def test_left_padded_batched_decoding_equals_the_rows_run_one_by_one(build) -> None:
    model = build().eval()
    g = torch.Generator().manual_seed(4)
    contexts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (11, 5, 8)]
    question = torch.randint(1, 128, (4,), generator=g).tolist()
    assert nbce_generate(model, contexts, question, max_new_tokens=8) == separately(model, contexts, question, 8)


def test_nbce_refuses_what_it_cannot_decode() -> None:
    with pytest.raises(surgeon.SurgeonError, match="at least one context"):
        nbce_generate(tiny_llama(), [], [1, 2])
