"""Spilled originals of an in-memory model live as long as the job needs them, and no longer."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

from conftest import tiny_llama

import surgeon

SPEC = "quantize base nf4\ninject lora r=2 into *.attn.q"


def scratch_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("surgeon-originals-*"))


def test_revert_removes_the_spilled_originals():
    before = scratch_folders()
    job = surgeon.apply(SPEC, tiny_llama())
    (made,) = scratch_folders() - before
    assert any(made.iterdir())
    job.revert()
    assert not made.exists()


def test_a_dropped_job_removes_them():
    before = scratch_folders()
    job = surgeon.apply(SPEC, tiny_llama())
    (made,) = scratch_folders() - before
    del job
    gc.collect()
    assert not made.exists()


def test_a_saved_run_keeps_its_own_copy(tmp_path):
    before = scratch_folders()
    job = surgeon.apply(SPEC, tiny_llama())
    job.save(tmp_path / "run")
    job.revert()
    assert scratch_folders() == before
    surgeon.load(tmp_path / "run", tiny_llama()).revert()  # the run's copy serves


def test_a_failed_apply_leaves_none(monkeypatch):
    import surgeon.surgery

    before = scratch_folders()
    real = surgeon.surgery.method_of
    calls = iter(range(100))

    def method_of(rewrite):
        method = real(rewrite)
        if rewrite.method == "lora" and next(calls) == 0:
            raise RuntimeError("boom")
        return method

    monkeypatch.setattr(surgeon.surgery, "method_of", method_of)
    try:
        surgeon.apply(SPEC, tiny_llama())
    except surgeon.SurgeonError:
        pass
    assert scratch_folders() == before
