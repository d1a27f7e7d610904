"""Training with the stacks people use: transformers' Trainer, TRL, accelerate, Lightning.

Checkpoints are runs (adapter-sized, loadable by `surgeon.load`, resumable by the stack itself),
`from_pretrained` of a checkpoint is never a silently re-initialised model, and per-step methods
act in every loop without extra calls. Tiny models, a few steps each (marker: stacks).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.optim.optimizer as optim_hooks
import transformers
from torch import nn

import surgeon
from surgeon.checkpoints import LOAD_HINT, RUN_KEY, manifest_tensor
from tests.conftest import assert_same_model, batch, clone, run, tiny_llama

pytestmark = pytest.mark.stacks

LORA = "inject lora r=4 alpha=8 into *.attn.<q,v>"
QLORA = "quantize base nf4 double\ninject lora r=4 alpha=8 into *.attn.<q,v>"


def small_llama() -> nn.Module:
    """Big enough that a checkpoint's fixed-size files (trainer state, arguments) are not the
    bulk of it, small enough for a few CPU steps a second."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    return transformers.LlamaForCausalLM(config).eval()


class TokenData(torch.utils.data.Dataset):
    def __init__(self, count: int = 16, vocab: int = 1000) -> None:
        self.ids = torch.randint(1, vocab, (count, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def trainer(model: nn.Module, out: Path, steps: int = 6, data: TokenData | None = None,
            **options) -> transformers.Trainer:
    settings = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                    save_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    settings.update(options)
    args = transformers.TrainingArguments(**settings)
    return transformers.Trainer(model=model, args=args, train_dataset=data or TokenData())


def trained_equal(a: surgeon.Job, b: surgeon.Job) -> bool:
    mine, theirs = a.trainable_parameters(), b.trainable_parameters()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


RELORA = "inject relora r=4 alpha=8 restart_every=2 into *.attn.<q,v>"


@pytest.mark.parametrize("spec", [LORA, QLORA, RELORA], ids=["lora", "qlora", "relora"])
def test_trainer_checkpoints_are_runs_and_resume_exactly(spec: str, tmp_path: Path) -> None:
    base = small_llama()
    base.save_pretrained(tmp_path / "base")
    model = clone(base)
    job = surgeon.apply(spec, model, seed=0)
    trainer(model, tmp_path / "a").train()
    losses = trainer_logs(tmp_path / "a" / "checkpoint-6")
    assert losses[-1] < losses[0]  # it trained

    checkpoint = tmp_path / "a" / "checkpoint-6"
    assert (checkpoint / "manifest.json").is_file() and (checkpoint / "adapters.safetensors").is_file()
    if spec != RELORA:  # ReLoRA's restarts move the base weights it adapts: a checkpoint carries them
        assert folder_size(checkpoint) < 0.10 * (tmp_path / "base" / "model.safetensors").stat().st_size

    loaded_model = clone(base)
    loaded = surgeon.load(checkpoint, loaded_model)
    assert trained_equal(loaded, job)
    assert torch.equal(run(loaded_model, batch()), run(model, batch()))
    loaded.revert()  # QLoRA: the checkpoint holds no originals; load spilled them from the base given
    assert_same_model(loaded_model, base)
    if spec == RELORA:  # restarts happened, the base moved, and the checkpoint carries it
        assert {patch.restarts for _, patch in job._surgery.patches} == {2}

    resumed_model = clone(base)
    resumed = surgeon.apply(spec, resumed_model, seed=0)
    trainer(resumed_model, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert trained_equal(resumed, job)  # the same result as the uninterrupted run, bit for bit
    assert torch.equal(run(resumed_model, batch()), run(model, batch()))  # ReLoRA: the folded base too


def trainer_logs(checkpoint: Path) -> list[float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_from_pretrained_of_a_checkpoint_says_how_to_load_it(tmp_path: Path) -> None:
    model = tiny_llama()
    surgeon.apply(LORA, model, seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="surgeon.load"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert LOAD_HINT in (tmp_path / "ckpt" / "config.json").read_text()


def test_save_pretrained_never_writes_over_a_whole_model(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    before = (tmp_path / "base" / "model.safetensors").read_bytes()
    surgeon.apply(LORA, base, seed=0)
    with pytest.raises(surgeon.SurgeonError, match="whole model"):
        base.save_pretrained(tmp_path / "base")
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == before


def test_state_dict_holds_the_run_and_loads_back_strictly() -> None:
    model, other = tiny_llama(), tiny_llama()
    job = surgeon.apply(LORA, model, seed=0)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.add_(0.25)
    state = model.state_dict()
    assert set(state) == set(job.trainable_parameters()) | {RUN_KEY}  # adapters and the manifest, no base
    assert len(model.state_dict(keep_vars=True)) > len(state)  # inspection still sees everything
    surgeon.apply(LORA, other, seed=1)
    assert not other.load_state_dict(state, strict=True).missing_keys
    assert torch.equal(run(other, batch()), run(model, batch()))


def test_revert_takes_every_hook_and_override_away() -> None:
    model = tiny_llama()
    hooks_before = (len(model._state_dict_hooks), len(model._load_state_dict_post_hooks), len(model._forward_pre_hooks))
    optimizer_hooks = (len(optim_hooks._global_optimizer_pre_hooks),
                       len(optim_hooks._global_optimizer_post_hooks))
    full = len(model.state_dict())
    job = surgeon.apply("inject adalora init_r=4 target_r=2 tinit=1 tfinal=1 total_steps=6 into *.attn.<q,v>",
                        model, seed=0)
    assert "save_pretrained" in model.__dict__
    job.revert()
    assert "save_pretrained" not in model.__dict__ and len(model.state_dict()) == full
    assert (len(model._state_dict_hooks), len(model._load_state_dict_post_hooks),
            len(model._forward_pre_hooks)) == hooks_before
    assert (len(optim_hooks._global_optimizer_pre_hooks),
            len(optim_hooks._global_optimizer_post_hooks)) == optimizer_hooks


ADALORA = "inject adalora init_r=4 target_r=2 tinit=2 tfinal=2 total_steps=8 deltaT=1 into *.attn.<q,v>"


def test_adalora_under_trainer_reaches_its_budget_as_an_explicit_loop_does(tmp_path: Path) -> None:
    """Trainer never calls job.step(): the optimizer hook does, counting accumulated steps as
    Trainer does. The reference is the explicit loop (tested against PEFT in test_adalora.py),
    fed the same 8 examples per optimizer step."""
    data = TokenData(count=8)
    auto_model, manual_model = small_llama().train(), small_llama().train()
    auto = surgeon.apply(ADALORA, auto_model, seed=0)
    manual = surgeon.apply(ADALORA, manual_model, seed=0)
    trainer(auto_model, tmp_path / "t", steps=8, save_steps=100, gradient_accumulation_steps=2,
            max_grad_norm=0.0, lr_scheduler_type="constant", data=data).train()

    optimizer = torch.optim.AdamW(manual.trainable_parameters().values(), lr=1e-2, weight_decay=0.0)
    ids = data.ids
    for step in range(8):
        loss = manual_model(input_ids=ids, labels=ids).loss + manual.regularization()
        loss.backward()
        optimizer.step()
        manual.step(step, optimizer)
        optimizer.zero_grad()

    kept = [int(k) for mask in surgeon_rank_pattern(auto_model).values() for k in mask]
    assert sum(kept) == 2 * 4  # target_r x the four adapted matrices
    assert surgeon_rank_pattern(auto_model) == surgeon_rank_pattern(manual_model)
    mine, theirs = auto.trainable_parameters(), manual.trainable_parameters()
    assert max((mine[n] - theirs[n]).abs().max().item() for n in mine) < 1e-4


def surgeon_rank_pattern(model: nn.Module) -> dict[str, list[bool]]:
    from surgeon.methods.weights.adalora import rank_pattern

    return rank_pattern(model)


def test_relora_restarts_in_a_plain_loop_without_job_step() -> None:
    model = tiny_llama().train()
    job = surgeon.apply("inject relora r=4 alpha=8 restart_every=2 into *.attn.<q,v>", model, seed=0)
    optimizer = job.optimizer(lr=1e-2)
    for step in range(5):
        ids = batch(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    restarts = {patch.restarts for _, patch in job._surgery.patches}
    assert restarts == {2}  # after steps 2 and 4 (0-based), as job.step(step) would have done


def test_training_without_a_visible_optimizer_step_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import surgeon.steps

    monkeypatch.setattr(surgeon.steps, "UNSEEN_FORWARDS_LIMIT", 3)
    model = tiny_llama().train()
    surgeon.apply("inject adalora init_r=4 target_r=2 tinit=1 tfinal=1 total_steps=6 into *.attn.<q,v>", model)
    with pytest.warns(UserWarning, match="job.step"):
        for _ in range(4):
            model(input_ids=batch()).logits.sum().backward()


def test_lora_without_per_step_methods_never_warns() -> None:
    model = tiny_llama().train()
    surgeon.apply(LORA, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(600):
            model(input_ids=batch(shape=(1, 2))).logits.sum().backward()


def test_accelerate_save_state_holds_the_run_and_load_state_resumes(tmp_path: Path) -> None:
    from accelerate import Accelerator

    base = tiny_llama()
    model = clone(base)
    job = surgeon.apply(LORA, model, seed=0)
    accelerator = Accelerator(cpu=True)
    prepared, optimizer = accelerator.prepare(model, job.optimizer(lr=1e-2))
    for step in range(2):
        ids = batch(seed=step)
        accelerator.backward(prepared(input_ids=ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(tmp_path / "state")
    accelerator.save_model(prepared, tmp_path / "model")
    full = clone(base).state_dict()
    adapter_bytes = sum(p.numel() * p.element_size() for p in job.trainable_parameters().values())
    for folder in (tmp_path / "state", tmp_path / "model"):
        assert (folder / "model.safetensors").stat().st_size < adapter_bytes + len(manifest_tensor(job)) + 4096
    assert adapter_bytes < 0.1 * sum(t.numel() * t.element_size() for t in full.values())

    for folder in (tmp_path / "state", tmp_path / "model"):  # each carries the whole run
        rebuilt = clone(base)
        assert trained_equal(surgeon.load(folder, rebuilt), job)
        assert torch.equal(run(rebuilt, batch()), run(model, batch()))

    other = clone(base)
    other_job = surgeon.apply(LORA, other, seed=5)
    again = Accelerator(cpu=True)
    _, other_optimizer = again.prepare(other, other_job.optimizer(lr=1e-2))
    again.load_state(tmp_path / "state")
    assert trained_equal(other_job, job)
    assert other_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def word_tokenizer(vocab_size: int = 120) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)} | {"[UNK]": vocab_size, "[PAD]": vocab_size + 1,
                                                         "[EOS]": vocab_size + 2}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="[EOS]")


def test_trl_sft_trains_and_checkpoints_a_run(tmp_path: Path) -> None:
    import trl
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 120, (10,), generator=generator)) for _ in range(16)]
    base = tiny_llama()
    model = clone(base)
    job = surgeon.apply(LORA, model, seed=0)
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                           save_steps=2, report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True)
    sft = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=word_tokenizer())
    sft.train()
    losses = [h["loss"] for h in sft.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    loaded = surgeon.load(tmp_path / "checkpoint-4", clone(base))
    assert trained_equal(loaded, job)


def test_the_stacks_are_installed() -> None:
    """The test extra brings trl, accelerate and lightning: these tests never skip for want of them."""
    import accelerate  # noqa: F401
    import lightning  # noqa: F401
    import trl  # noqa: F401


def test_lightning_checkpoints_hold_the_run_and_resume_exactly(tmp_path: Path) -> None:
    import lightning

    class Module(lightning.LightningModule):
        def __init__(self, model: nn.Module, job: surgeon.Job) -> None:
            super().__init__()
            self.model, self.job = model, job

        def training_step(self, ids: torch.Tensor, index: int) -> torch.Tensor:
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.job.optimizer(lr=1e-2)

    def fit(job: surgeon.Job, model: nn.Module, root: Path, resume: Path | None = None) -> None:
        every_two = lightning.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)
        fitter = lightning.Trainer(max_steps=4, accelerator="cpu", default_root_dir=root, logger=False,
                                   enable_progress_bar=False, enable_model_summary=False, callbacks=[every_two])
        fitter.fit(Module(model, job), loader, ckpt_path=str(resume) if resume else None)

    ids = torch.randint(1, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(ids, batch_size=4)
    base = tiny_llama()
    model = clone(base)
    job = surgeon.apply(LORA, model, seed=0)
    fit(job, model, tmp_path / "a")
    halfway = next((tmp_path / "a").rglob("*step=2.ckpt"))
    saved = torch.load(halfway, weights_only=True)["state_dict"]
    assert {k.removeprefix("model.") for k in saved} == set(job.trainable_parameters()) | {RUN_KEY}

    other = clone(base)
    other_job = surgeon.apply(LORA, other, seed=3)
    fit(other_job, other, tmp_path / "b", resume=halfway)
    assert trained_equal(other_job, job)


def test_a_deep_copy_of_a_patched_model_is_a_plain_copy(tmp_path: Path) -> None:
    """TRL builds a reference model with copy.deepcopy: the copy computes the same outputs, has no
    live job (whole state dict and save), and the original still reverts exactly."""
    import copy

    base = tiny_llama()
    model = clone(base)
    job = surgeon.apply(LORA, model, seed=0)
    twin = copy.deepcopy(model)
    assert torch.equal(run(twin, batch()), run(model, batch()))
    assert len(twin.state_dict()) == len(twin.state_dict(keep_vars=True)) > len(model.state_dict())
    twin.save_pretrained(tmp_path / "twin")
    assert not (tmp_path / "twin" / "manifest.json").exists()
    job.revert()
    assert_same_model(model, base)


def test_the_cli_reverts_and_merges_a_qlora_checkpoint_that_holds_no_originals(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from surgeon.cli import app

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = clone(base)  # in memory: the checkpoint cannot name a source, --model gives it
    surgeon.apply(QLORA, model, seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "manifest.json").read_text())["originals"]["kind"] == "base"
    runner = CliRunner()
    reverted = runner.invoke(app, ["revert", str(tmp_path / "ckpt"), "--model", str(tmp_path / "base"),
                                   "--out", str(tmp_path / "reverted")])
    assert reverted.exit_code == 0, reverted.output
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reverted").state_dict()
    assert written.keys() == base.state_dict().keys()
    assert all(torch.equal(written[n], t) for n, t in base.state_dict().items())  # bit for bit
    merged = runner.invoke(app, ["merge", str(tmp_path / "ckpt"), "--model", str(tmp_path / "base"),
                                 "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output


def test_a_saved_state_dict_is_a_run_and_a_tampered_one_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    base = tiny_llama()
    model = clone(base)
    job = surgeon.apply("quantize base nf4\n" + LORA + "\ntrain bias add=true only=q", model, seed=0)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.add_(0.125)
    state = model.state_dict()
    save_file(state, str(tmp_path / "state.safetensors"))
    rebuilt = clone(base)
    loaded = surgeon.load(tmp_path / "state.safetensors", rebuilt)
    assert torch.equal(run(rebuilt, batch()), run(model, batch()))
    loaded.revert()  # the originals were spilled again from the base given
    assert_same_model(rebuilt, base)

    text = bytes(state[RUN_KEY].numpy()).decode().replace("r=4", "r=2")
    tampered = dict(state) | {RUN_KEY: torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)}
    save_file(tampered, str(tmp_path / "tampered.safetensors"))
    fresh = clone(base)
    with pytest.raises(surgeon.SurgeonError, match="checksum|sha256"):
        surgeon.load(tmp_path / "tampered.safetensors", fresh)
    assert_same_model(fresh, base)
    extra = dict(state) | {"model.norm.weight": torch.ones(64)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(surgeon.SurgeonError, match="unexpected .*model.norm.weight"):
        surgeon.load(tmp_path / "extra.safetensors", fresh)
    assert_same_model(fresh, base)


ADALORA_SHORT = "inject adalora init_r=4 target_r=2 tinit=1 tfinal=1 total_steps=6 into *.attn.<q,v>"


def budget_reached(model: nn.Module) -> bool:
    kept = [k for mask in surgeon_rank_pattern(model).values() for k in mask]
    return len(kept) == 4 * 4 and sum(kept) == 2 * 4  # four matrices of init_r=4, target_r=2 each


def test_adalora_reaches_its_budget_under_accelerate_with_gradient_accumulation() -> None:
    from accelerate import Accelerator

    model = tiny_llama().train()
    job = surgeon.apply(ADALORA_SHORT, model, seed=0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    prepared, optimizer = accelerator.prepare(model, job.optimizer(lr=1e-2))
    for micro in range(12):  # 12 micro-batches, 6 optimizer steps: exactly the schedule
        with accelerator.accumulate(prepared):
            ids = batch(seed=micro)
            accelerator.backward(prepared(input_ids=ids, labels=ids).loss)
            optimizer.step()
            optimizer.zero_grad()
    assert job._steps is not None and job._steps.steps_taken == 6
    assert budget_reached(model)


def test_adalora_reaches_its_budget_under_lightning() -> None:
    import lightning

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama().train()
            self.job = surgeon.apply(ADALORA_SHORT, self.model, seed=0)

        def training_step(self, ids: torch.Tensor, index: int) -> torch.Tensor:
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.job.optimizer(lr=1e-2)

    ids = torch.randint(1, 128, (12, 12), generator=torch.Generator().manual_seed(0))
    module = Module()
    lightning.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False).fit(
        module, torch.utils.data.DataLoader(ids, batch_size=2))
    assert budget_reached(module.model)
