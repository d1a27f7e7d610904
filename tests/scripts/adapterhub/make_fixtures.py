"""Write AdapterHub (`adapters` 1.3.0) parity fixtures for surgeon's adapter methods.

Runs ONLY in the separate venv of requirements-adapterhub.txt (transformers 4.57.6), never in
the project venv:

    /work/venvs/adapterhub/bin/python tests/scripts/adapterhub/make_fixtures.py \
        --out tests/data/adapterhub

Tiny config-built models with random weights (fixed seeds, eager attention, all dropout 0) get
one AdapterHub adapter each of seq_bn (pfeiffer), double_seq_bn (houlsby), par_bn (parallel) and
mam; adapter weights are randomised (par_bn/MAM up-projections are zero at init). Per case the
script writes base weights (save_pretrained -> config.json + model.safetensors), adapter weights
(safetensors, AdapterHub's module names), the adapter config, inputs, and for every variant
(nopad/pad x skip_layers none/[...]) the expected logits and gradients of the adapter parameters
for loss = sum(logits * R). index.json describes everything; see README.md in the output folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

import adapters
from adapters import DoubleSeqBnConfig, MAMConfig, ParBnConfig, PrefixTuningConfig, SeqBnConfig

VOCAB = 96
BATCH, SEQ, PAD_LEN = 2, 8, 5  # padded variant: row 1 keeps PAD_LEN tokens, right padding
ADAPTER = "a"
ATOL, RTOL = 1e-5, 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-4, 1e-4


def model_configs(hidden: int | None = None) -> dict:
    """Tiny configs. Default sizes: BERT hidden 128 (the issue's counts), others hidden 64."""
    h_b = hidden or 128
    h = hidden or 64
    return {
        "bert": transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=h_b, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=2 * h_b, max_position_embeddings=32, type_vocab_size=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ),
        "llama": transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=h, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=2 * h, max_position_embeddings=64,
            attention_dropout=0.0, tie_word_embeddings=False,
        ),
        "gpt2": transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=h, n_layer=2, n_head=4, n_positions=64,  # >= 30 prefix + seq (eager causal buffer)
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=VOCAB - 1,
            eos_token_id=VOCAB - 1,
        ),
        "t5": transformers.T5Config(
            vocab_size=VOCAB, d_model=h, d_kv=h // 4, num_heads=4, d_ff=2 * h, num_layers=2,
            num_decoder_layers=2, relative_attention_num_buckets=8, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0,
        ),
    }


AUTO = {
    "bert": transformers.BertForMaskedLM,
    "llama": transformers.LlamaForCausalLM,
    "gpt2": transformers.GPT2LMHeadModel,
    "t5": transformers.T5ForConditionalGeneration,
}
SEEDS = {"bert": 1, "llama": 2, "gpt2": 3, "t5": 4}


def adapter_configs(model_type: str) -> dict:
    """surgeon statement -> AdapterHub config. MAM keeps the library default prefix (30 tokens,
    projection 800) on Llama only; BERT, GPT-2 and T5 use bottleneck_size=64 to stay small."""
    prefix_bn = 800 if model_type == "llama" else 64
    return {
        "seq_bn": SeqBnConfig(),
        "double_seq_bn": DoubleSeqBnConfig(),
        "par_bn": ParBnConfig(),
        "mam": MAMConfig(PrefixTuningConfig(bottleneck_size=prefix_bn), ParBnConfig()),
    }


SURGEON = {
    "seq_bn": "inject adapter config=pfeiffer",
    "double_seq_bn": "inject adapter config=houlsby",
    "par_bn": "inject adapter config=parallel",
    "mam": "specs/mam.peft, with projection= the prefix's bottleneck_size",
}


def skip_for(model_type: str) -> list[int]:
    # T5 numbers decoder layers n_enc + i, so [0, 2] drops encoder layer 0 and decoder layer 0.
    return [0, 2] if model_type == "t5" else [0]


def build_base(model_type: str, hidden: int | None = None):
    torch.manual_seed(SEEDS[model_type])
    cfg = model_configs(hidden)[model_type]
    cfg._attn_implementation = "eager"
    model = AUTO[model_type](cfg)
    model.config._attn_implementation = "eager"
    return model.eval()


def make_inputs(model_type: str) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + SEEDS[model_type])
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    full = torch.ones(BATCH, SEQ, dtype=torch.long)
    pad_mask = full.clone()
    pad_mask[1, PAD_LEN:] = 0
    pad_ids = ids.clone()
    pad_ids[1, PAD_LEN:] = 0
    out = {"nopad": {"input_ids": ids, "attention_mask": full},
           "pad": {"input_ids": pad_ids, "attention_mask": pad_mask}}
    if model_type == "t5":
        dec = torch.randint(1, VOCAB, (BATCH, 6), generator=g)
        dec[:, 0] = 0  # decoder_start_token_id
        for v in out.values():
            v["decoder_input_ids"] = dec.clone()
    return out


def adapter_param_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()
            if f".{ADAPTER}." in n or n.endswith(f".{ADAPTER}") or "prefix_tuning" in n]


def randomise(model, names: list[str], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            p = params[n]
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def count_params(model_type: str, hidden: int) -> dict:
    res = {}
    for cname, cfg in adapter_configs(model_type).items():
        if cname == "mam":
            cfg = MAMConfig()  # library default: prefix bottleneck 800
        m = build_base(model_type, hidden)
        adapters.init(m)
        m.add_adapter(ADAPTER, config=cfg)
        names = adapter_param_names(m)
        params = dict(m.named_parameters())
        m.train_adapter(ADAPTER)
        res[cname] = {
            "adapter_params": sum(params[n].numel() for n in names),
            "library_trainable_after_train_adapter": sum(
                p.numel() for p in m.parameters() if p.requires_grad),
        }
    return res


def run_variant(model, inputs, skip, R):
    model.set_active_adapters(ADAPTER, skip_layers=skip)
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    logits = out.logits
    loss = (logits * R).sum()
    loss.backward()
    return logits.detach().clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    index = {
        "generator": "tests/scripts/adapterhub/make_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "adapters": adapters.__version__},
        "attn_implementation": "eager",
        "dtype": "float32",
        "adapter_name": ADAPTER,
        "tolerances": {"logits": {"atol": ATOL, "rtol": RTOL},
                       "grads": {"atol": GRAD_ATOL, "rtol": GRAD_RTOL}},
        "loss": "sum(logits * R), R = loss_weights in the variant's inputs file",
        "padding": "right padding; row 1 of 'pad' keeps %d of %d tokens" % (PAD_LEN, SEQ),
        "models": {},
        "cases": [],
        "param_counts_hidden128": {},
        "param_counts_note": (
            "library counts with every model rebuilt at hidden 128 (BERT/Llama/GPT-2: 2 layers; "
            "T5: 2 encoder + 2 decoder blocks; Llama 4 heads / 2 KV heads), MAM with the library "
            "default prefix (bottleneck 800). adapter_params = parameters of adapter 'a'; "
            "library_trainable_after_train_adapter also counts what train_adapter leaves "
            "trainable (BERT: the MLM head transform cls.predictions.transform.*)."),
        "skip_layers_note": (
            "AdapterDrop: set_active_adapters('a', skip_layers=[...]); T5 decoder block i is "
            "layer n_enc + i, so [0, 2] skips encoder block 0 and decoder block 0."),
    }

    for model_type in ("bert", "llama", "gpt2", "t5"):
        mdir = out / model_type
        if mdir.exists():
            shutil.rmtree(mdir)
        mdir.mkdir()
        base = build_base(model_type)
        base.save_pretrained(mdir / "base", safe_serialization=True)
        for extra in ("generation_config.json",):
            (mdir / "base" / extra).unlink(missing_ok=True)
        inputs = make_inputs(model_type)
        # base logits (no adapter) per input, plus fixed loss weights R per input
        input_files, loss_weights = {}, {}
        with torch.no_grad():
            for iname, inp in inputs.items():
                logits = base(**inp).logits
                g = torch.Generator().manual_seed(200 + SEEDS[model_type])
                R = torch.randn(logits.shape, generator=g)
                tensors = {k: v.contiguous() for k, v in inp.items()}
                tensors["loss_weights"] = R
                loss_weights[iname] = R
                tensors["base_logits"] = logits.contiguous()
                f = f"{model_type}/inputs_{iname}.safetensors"
                save_file(tensors, str(out / f))
                input_files[iname] = f
        index["models"][model_type] = {
            "class": type(base).__name__,
            "base_dir": f"{model_type}/base",
            "config": {k: v for k, v in base.config.to_diff_dict().items()
                       if k not in ("transformers_version",)},
            "inputs": input_files,
            "input_shapes": {k: list(v.shape) for k, v in inputs["nopad"].items()},
            "num_layers": base.config.num_hidden_layers if model_type != "t5"
            else [base.config.num_layers, base.config.num_decoder_layers],
        }

        for cname, cfg in adapter_configs(model_type).items():
            model = build_base(model_type)  # identical weights (same seed)
            adapters.init(model)
            model.add_adapter(ADAPTER, config=cfg)
            names = adapter_param_names(model)
            randomise(model, names, seed=1000 + 10 * SEEDS[model_type] + len(cname))
            model.train_adapter(ADAPTER)
            lib_trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
            # the fixture's trainable set = adapter parameters only (the library also leaves
            # the LM head trainable, see README)
            for n, p in model.named_parameters():
                p.requires_grad_(n in names)
            model.eval()
            params = dict(model.named_parameters())
            cdir = f"{model_type}/{cname}"
            (out / cdir).mkdir()
            save_file({n: params[n].detach().clone().contiguous() for n in names},
                      str(out / cdir / "adapter_weights.safetensors"))
            cfg_dict = cfg.to_dict()
            (out / cdir / "adapter_config.json").write_text(json.dumps(cfg_dict, indent=1))
            aliases = {}
            for n, p in model.named_parameters(remove_duplicate=False):
                for m_ in names:
                    if p is params[m_] and n != m_:
                        aliases[n] = m_
            case = {
                "name": f"{model_type}/{cname}",
                "model_type": model_type,
                "method": cname,
                "surgeon_statement": SURGEON[cname],
                "adapter_config": cfg_dict,
                "adapter_config_file": f"{cdir}/adapter_config.json",
                "adapter_weights": f"{cdir}/adapter_weights.safetensors",
                "adapter_param_shapes": {n: list(params[n].shape) for n in names},
                "adapter_param_aliases": aliases,
                "adapter_params": sum(params[n].numel() for n in names),
                "library_trainable_not_adapter": [n for n in lib_trainable if n not in names],
                "variants": [],
            }
            for iname, inp in inputs.items():
                R = loss_weights[iname]
                for skip in (None, skip_for(model_type)):
                    vname = iname + ("" if skip is None else "_skip" + "-".join(map(str, skip)))
                    logits = run_variant(model, inp, skip, R)
                    # size budget: gradients on 'nopad' for every method and on the padded
                    # skip variant for the bottleneck methods; MAM (big prefix MLP) nopad only
                    want = vname == "nopad" or (cname != "mam" and iname == "pad" and skip is not None)
                    grads = {n: params[n].grad.detach().clone().contiguous() for n in names
                             if want and params[n].grad is not None}
                    no_grad = [n for n in names if params[n].grad is None] if want else None
                    f = f"{cdir}/{vname}.safetensors"
                    tensors = {"logits": logits.contiguous()}
                    tensors.update({"grad." + n: g for n, g in grads.items()})
                    save_file(tensors, str(out / f))
                    case["variants"].append({
                        "name": vname, "inputs": input_files[iname], "skip_layers": skip,
                        "file": f, "logits_shape": list(logits.shape),
                        "has_grads": want,
                        # adapter params that get no gradient (skipped layers): absent from file
                        "params_without_grad": no_grad,
                    })
            # library's own saved-adapter format, for import tests (bottleneck adapters only)
            if cname != "mam":
                sdir = out / cdir / "saved"
                model.save_adapter(str(sdir), ADAPTER, with_head=False, use_safetensors=True)
                case["saved_adapter_dir"] = f"{cdir}/saved"
                case["saved_adapter_files"] = sorted(p.name for p in sdir.iterdir())
            index["cases"].append(case)
            print(case["name"], case["adapter_params"], "params,",
                  len(case["variants"]), "variants", flush=True)

        index["param_counts_hidden128"][model_type] = count_params(model_type, 128)

    (out / "index.json").write_text(json.dumps(index, indent=1))


if __name__ == "__main__":
    main()
