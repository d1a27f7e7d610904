"""Write AdapterHub (`adapters` 1.3.0) parity fixtures for AdapterFusion and UniPELT.

Runs ONLY in the separate venv of requirements-adapterhub.txt (transformers 4.57.6), never in
the project venv. From the repository root:

    /work/venvs/adapterhub/bin/python tests/scripts/adapterhub/make_composition_fixtures.py

(defaults: --data tests/data/adapterhub, --out tests/data/adapterhub/composition). It reuses the
base models and inputs that make_fixtures.py committed (<data>/<model>/base and
<data>/<model>/inputs_{nopad,pad}.safetensors for bert, llama, gpt2), loaded with
`from_pretrained(..., attn_implementation="eager")`, so the composition fixtures need no new base
weights. Per model it records:

  fusion              two seq_bn adapters "a", "b" + Fuse("a","b") with the default "dynamic"
                      config; eval logits (nopad, pad), the fusion attention probabilities, the
                      gradients of the fusion parameters only (nopad, loss = sum(logits * R)),
                      the library's fusion regulariser, and the library's own saved directories
                      (save_adapter a/b + save_adapter_fusion, safetensors).
  fusion_temperature  dynamic + temperature=True: logits (+ probabilities) of a fixed sequence of
                      forwards on one model, since T (50 -> 1, -0.05 per forward, eval included)
                      is state of every fusion layer; forwards 1, 2, 3, 491, 982 (first at T=1), 983.
  fusion_static       the "static" config (no value matrix): logits (+ probabilities), no grads.
  unipelt             UniPELTConfig (prefix 10, seq_bn rf 16, LoRA r 8 alpha 2 on q,v, gates),
                      prefix bottleneck 64 on BERT/GPT-2 and the default 512 on Llama; logits
                      (nopad, pad), gate values, gradients of all adapter parameters (nopad);
                      weights dumped by this script (save_adapter fails for prefix methods).

Every adapter, fusion and gate parameter is randomised with fixed seeds (see RANDOMISATION).
The script rewrites <out>/ (not the README), then re-runs the library on the dumped weights in a
fresh process (`--verify`) and prints the max diffs; it exits non-zero if any exceeds 1e-6.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

import adapters
from adapters import (
    AdapterConfig,
    AdapterFusionConfig,
    Fuse,
    PrefixTuningConfig,
    SeqBnConfig,
    UniPELTConfig,
)
from adapters.methods.modeling import BertFusion

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures  # noqa: E402  (same folder: tiny configs for the hidden-128 counts)

MODELS = ("bert", "llama", "gpt2")
AUTO = {
    "bert": transformers.BertForMaskedLM,
    "llama": transformers.LlamaForCausalLM,
    "gpt2": transformers.GPT2LMHeadModel,
}
SEEDS = {"bert": 1, "llama": 2, "gpt2": 3}
FUSE = Fuse("a", "b")
FUSION_NAME = "a,b"
UNIPELT_NAME = "a"
ATOL, RTOL = 1e-5, 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-4, 1e-4
SELF_CHECK_TOL = 1e-6
PAD_LEN = 5  # row 1 of the committed 'pad' input keeps 5 of 8 tokens (make_fixtures.PAD_LEN)

# Prefix bottleneck per model: the library default (512) on Llama, 64 elsewhere to stay small.
UNIPELT_PREFIX_BOTTLENECK = {"bert": 64, "llama": 512, "gpt2": 64}

RANDOMISATION = {
    "seq_bn adapters a, b (fusion cases)": "every weight and bias N(0, 0.1^2); seeds 3000+10*s (a), 3001+10*s (b)",
    "fusion query/key weight": "N(0, sigma^2), sigma = FUSION_QK_STD[model] (dynamic; static reuses "
                               "them), sigma * sqrt(50) for temperature (so scores/50 ~ dynamic scores)",
    "fusion query/key bias": "N(0, 0.05^2)",
    "fusion value weight": "I + N(0, 0.02^2) (the library inits I with 1e-6 off the diagonal)",
    "unipelt gates (gate.weight, prefix_gates)": "weight N(0, 0.3^2), bias N(0, 0.5^2)",
    "unipelt LoRA A and B": "N(0, 0.1^2) (B is zero at init in the library)",
    "unipelt other parameters (prefix wte + MLP, seq_bn)": "N(0, 0.05^2)",
    "seeds": "s = 1 (bert), 2 (llama), 3 (gpt2); fusion 4000+10*s (dynamic q/k, then value), "
             "5000+10*s (temperature q/k); unipelt 7000+10*s",
}
# Chosen so that the dynamic fusion's softmax over (a, b) is far from uniform and from one-hot
# (p_a spans about 0.15-0.9). Llama/GPT-2 need larger weights: their query is the un-normalised
# residual stream r + h of a random-init model (much smaller than BERT's LayerNorm output).
FUSION_QK_STD = {"bert": 0.05, "llama": 0.6, "gpt2": 0.5}
# temperature case: recorded forwards (1-based index, inputs); the first forward at T == 1.0
# (nopad) and the one after it (pad) are recorded too. Unlisted forwards are nopad, unrecorded.
TEMPERATURE_RECORD = ((1, "nopad"), (2, "nopad"), (3, "pad"), (491, "nopad"))


# ----------------------------------------------------------------------------------------------
# helpers shared by generation and verification


def load_base(data: Path, model_type: str, attn: str = "eager"):
    model = AUTO[model_type].from_pretrained(str(data / model_type / "base"), attn_implementation=attn)
    model.config._name_or_path = ""  # so saved configs carry model_name "" as in make_fixtures
    return model.eval()


def load_inputs(data: Path, model_type: str) -> dict:
    res = {}
    for iname in ("nopad", "pad"):
        t = load_file(str(data / model_type / f"inputs_{iname}.safetensors"))
        res[iname] = {
            "inputs": {k: t[k] for k in ("input_ids", "attention_mask")},
            "R": t["loss_weights"],
            "base_logits": t["base_logits"],
        }
    return res


def unipelt_config(model_type: str) -> UniPELTConfig:
    return UniPELTConfig(
        prefix_tuning=PrefixTuningConfig(
            prefix_length=10, bottleneck_size=UNIPELT_PREFIX_BOTTLENECK[model_type]))


def fusion_config(kind: str) -> AdapterFusionConfig:
    if kind == "dynamic":
        return AdapterFusionConfig.load("dynamic")
    if kind == "temperature":
        return AdapterFusionConfig.load("dynamic", temperature=True)
    if kind == "static":
        return AdapterFusionConfig.load("static")
    raise ValueError(kind)


def setup_fusion(model, fusion_cfg):
    adapters.init(model)
    model.add_adapter("a", config=SeqBnConfig())
    model.add_adapter("b", config=SeqBnConfig())
    model.add_adapter_fusion(FUSE, config=fusion_cfg)
    model.set_active_adapters(FUSE)
    model.eval()


def setup_unipelt(model, cfg):
    adapters.init(model)
    model.add_adapter(UNIPELT_NAME, config=cfg)
    model.set_active_adapters(UNIPELT_NAME)
    model.eval()


def names_of(model, kind: str) -> list[str]:
    """Canonical (deduplicated) parameter names of a part of the composition."""
    out = []
    for n, _ in model.named_parameters():
        if kind == "fusion" and f".adapter_fusion_layer.{FUSION_NAME}." in n:
            out.append(n)
        elif kind in ("a", "b") and f".adapters.{kind}." in n:
            out.append(n)
        elif kind == "unipelt" and (f".{UNIPELT_NAME}." in n or "prefix_tuning" in n):
            out.append(n)
    return out


def aliases_of(model, names: list[str]) -> dict:
    params = dict(model.named_parameters())
    res = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        for m in names:
            if p is params[m] and n != m:
                res[n] = m
    return res


def load_named(model, tensors: dict) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise KeyError(f"not parameters of the model: {missing[:3]}")
    with torch.no_grad():
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{n}: {tuple(params[n].shape)} vs {tuple(t.shape)}")
            params[n].copy_(t)


def only_trainable(model, names: list[str]) -> None:
    keep = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


def fusion_modules(model) -> list[tuple[str, BertFusion]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BertFusion)]


def gate_hooks(model, store: dict):
    """Record every UniPELT gate as used by the library: mean over the sequence (padded tokens
    included) of sigmoid(Linear(x)), shape (batch, outputs)."""
    handles = []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (n.endswith(".gate") or n.endswith(f".prefix_gates.{UNIPELT_NAME}")):
            def hook(mod, args, out, name=n):
                store["gate." + name] = torch.sigmoid(out).mean(dim=1).detach().clone()
            handles.append(m.register_forward_hook(hook))
    return handles


def forward(model, inp: dict, fusion_probs: bool = False):
    kw = {"output_adapter_fusion_attentions": True} if fusion_probs else {}
    out = model(**inp, **kw)
    probs = {}
    if fusion_probs:
        for fname, per_layer in out["adapter_fusion_attentions"].items():
            for layer, per_loc in per_layer.items():
                for loc, arr in per_loc.items():
                    probs[f"fusion_probs.layer{layer}.{loc}"] = torch.from_numpy(arr).clone()
    return out.logits, probs


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def fusion_reg(model):
    v = model.get_fusion_regularization_loss()
    return None if v is None else v.item()


def own_fusion_reg(model) -> float:
    tot = 0.0
    for _, m in fusion_modules(model):
        if hasattr(m, "value"):
            eye = torch.eye(m.value.weight.shape[0], dtype=torch.float64)
            tot += 0.01 * (eye - m.value.weight.double()).pow(2).sum().item()
    return tot


# ----------------------------------------------------------------------------------------------
# generation


def randn(shape, g, std):
    return torch.randn(shape, generator=g) * std


def randomise_seq_bn(model, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names_of(model, name):
            params[n].copy_(randn(params[n].shape, g, 0.1))


def randomise_fusion(model, seed: int, qk_std: float, value: bool = True) -> None:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names_of(model, "fusion"):
            p = params[n]
            if ".value." in n and not value:
                continue
            if n.endswith("value.weight"):
                p.copy_(torch.eye(p.shape[0]) + randn(p.shape, g, 0.02))
            elif n.endswith(".weight"):
                p.copy_(randn(p.shape, g, qk_std))
            else:
                p.copy_(randn(p.shape, g, 0.05))


def randomise_unipelt(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names_of(model, "unipelt"):
            p = params[n]
            is_gate = ".gate." in n or f".prefix_gates.{UNIPELT_NAME}." in n
            if is_gate:
                p.copy_(randn(p.shape, g, 0.3 if n.endswith("weight") else 0.5))
            elif ".loras." in n:
                p.copy_(randn(p.shape, g, 0.1))
            else:
                p.copy_(randn(p.shape, g, 0.05))


def dump(tensors: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))


def rel(out: Path, path: Path) -> str:
    return str(path.relative_to(out.parent))


def pad_invariance(model, inputs: dict) -> float:
    """max |pad logits of row 1, kept tokens| - |the same row run alone without padding|:
    0 unless something mixes padded tokens into the kept ones (the UniPELT gates do)."""
    with torch.no_grad():
        full, _ = forward(model, inputs["pad"]["inputs"])
        ids = inputs["pad"]["inputs"]["input_ids"][1:, :PAD_LEN]
        alone, _ = forward(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return maxdiff(full[1, :PAD_LEN], alone[0])


def count(model, names) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def counts_hidden128(model_type: str) -> dict:
    res = {}
    m = make_fixtures.build_base(model_type, 128)
    setup_fusion(m, fusion_config("dynamic"))
    m.train_adapter_fusion(FUSE)
    res["fusion"] = {
        "adapter_a": count(m, names_of(m, "a")), "adapter_b": count(m, names_of(m, "b")),
        "fusion_layer": count(m, names_of(m, "fusion")),
        "library_trainable_after_train_adapter_fusion": sum(
            p.numel() for p in m.parameters() if p.requires_grad),
    }
    res["fusion"]["a_b_and_fusion"] = (res["fusion"]["adapter_a"] + res["fusion"]["adapter_b"]
                                       + res["fusion"]["fusion_layer"])
    m = make_fixtures.build_base(model_type, 128)
    setup_fusion(m, fusion_config("static"))
    res["fusion_static"] = {"fusion_layer": count(m, names_of(m, "fusion"))}
    m = make_fixtures.build_base(model_type, 128)
    setup_unipelt(m, UniPELTConfig())
    m.train_adapter(UNIPELT_NAME)
    res["unipelt_library_default"] = {
        "adapter_params": count(m, names_of(m, "unipelt")),
        "library_trainable_after_train_adapter": sum(
            p.numel() for p in m.parameters() if p.requires_grad),
    }
    return res


def unipelt_breakdown(model, names) -> dict:
    params = dict(model.named_parameters())
    b = {"prefix_pool": 0, "prefix_gates": 0, "lora": 0, "lora_gates": 0, "bottleneck": 0,
         "bottleneck_gates": 0}
    for n in names:
        k = params[n].numel()
        if "prefix_gates" in n:
            b["prefix_gates"] += k
        elif "prefix_tuning" in n:
            b["prefix_pool"] += k
        elif ".loras." in n:
            b["lora_gates" if ".gate." in n else "lora"] += k
        else:
            b["bottleneck_gates" if ".gate." in n else "bottleneck"] += k
    return b


def gen_fusion_cases(out: Path, data: Path, model_type: str, inputs: dict, mdir_models: dict) -> list:
    s = SEEDS[model_type]
    cases = []
    cdir = out / model_type / "fusion"
    cdir.mkdir(parents=True)

    # --- dynamic (default) ---
    model = load_base(data, model_type)
    setup_fusion(model, fusion_config("dynamic"))
    randomise_seq_bn(model, "a", 3000 + 10 * s)
    randomise_seq_bn(model, "b", 3001 + 10 * s)
    randomise_fusion(model, 4000 + 10 * s, FUSION_QK_STD[model_type])
    names_a, names_b, names_f = names_of(model, "a"), names_of(model, "b"), names_of(model, "fusion")
    params = dict(model.named_parameters())
    ab_file = cdir / "adapters_ab.safetensors"
    dump({n: params[n] for n in names_a + names_b}, ab_file)
    qk_file = cdir / "fusion_query_key.safetensors"
    dump({n: params[n] for n in names_f if ".value." not in n}, qk_file)
    v_file = cdir / "fusion_value.safetensors"
    dump({n: params[n] for n in names_f if ".value." in n}, v_file)

    model.train_adapter_fusion(FUSE)
    lib_trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    lib_trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    only_trainable(model, names_f)  # fixture's trainable set: the fusion layers only
    model.eval()
    reg = fusion_reg(model)
    reg_own = own_fusion_reg(model)
    variants = []
    prob_stats = {}
    for iname in ("nopad", "pad"):
        model.zero_grad(set_to_none=True)
        logits, probs = forward(model, inputs[iname]["inputs"], fusion_probs=True)
        tensors = {"logits": logits}
        tensors.update(probs)
        want = iname == "nopad"
        if want:
            (logits * inputs[iname]["R"]).sum().backward()
            tensors.update({"grad." + n: params[n].grad for n in names_f})
        f = cdir / f"{iname}.safetensors"
        dump(tensors, f)
        pmin = min(p[..., 0].min().item() for p in probs.values())
        pmax = max(p[..., 0].max().item() for p in probs.values())
        prob_stats[iname] = [round(pmin, 4), round(pmax, 4)]
        variants.append({"name": iname, "inputs": mdir_models["inputs"][iname], "file": rel(out, f),
                         "logits_shape": list(logits.shape), "has_grads": want,
                         "fusion_probs_keys": sorted(probs)})
    effect = maxdiff(load_file(str(cdir / "nopad.safetensors"))["logits"],
                     inputs["nopad"]["base_logits"])

    # library's own saved directories
    sdir = cdir / "saved"
    sdir.mkdir()
    for a in ("a", "b"):
        model.save_adapter(str(sdir / a), a, with_head=False, use_safetensors=True)
    model.save_adapter_fusion(str(sdir / "fusion"), FUSION_NAME, use_safetensors=True)
    saved_files = {sub: sorted(p.name for p in (sdir / sub).iterdir()) for sub in ("a", "b", "fusion")}
    saved_keys = {sub: sorted(load_file(str(next((sdir / sub).glob("*.safetensors")))).keys())
                  for sub in ("a", "b", "fusion")}

    seq_cfg = SeqBnConfig().to_dict()
    case = {
        "name": f"{model_type}/fusion",
        "model_type": model_type,
        "method": "fusion",
        "adapters": {"a": seq_cfg, "b": seq_cfg},
        "fusion": "Fuse('a', 'b')",
        "fusion_name": FUSION_NAME,
        "fusion_config": fusion_config("dynamic").to_dict(),
        "weights": [rel(out, ab_file), rel(out, qk_file), rel(out, v_file)],
        "param_shapes": {n: list(params[n].shape) for n in names_a + names_b + names_f},
        "param_aliases": aliases_of(model, names_a + names_b + names_f),
        "fusion_params": names_f,
        "param_counts": {"adapter_a": count(model, names_a), "adapter_b": count(model, names_b),
                         "fusion_layer": count(model, names_f),
                         "library_trainable_after_train_adapter_fusion": lib_trainable_count},
        "trainable": "fusion layers only (grads stored for fusion_params)",
        "library_trainable_not_fusion": [n for n in lib_trainable if n not in names_f],
        "fusion_regularization_loss": reg,
        "fusion_regularization_loss_recomputed_fp64": reg_own,
        "fusion_regularization_note": (
            "model.get_fusion_regularization_loss() = sum over fusion layers with a value matrix "
            "whose weight requires_grad of 0.01 * ((I - value.weight)**2).sum(), fp32"),
        "fusion_probs_adapter_a_range": prob_stats,
        "max_abs_logit_change_vs_base_nopad": effect,
        "pad_row1_vs_unpadded_max_diff": pad_invariance(model, inputs),
        "variants": variants,
        "saved_dir": rel(out, sdir),
        "saved_files": saved_files,
        "saved_tensor_names": saved_keys,
        "saved_how": ("model.save_adapter(saved/a, 'a', with_head=False, use_safetensors=True); "
                      "same for b; model.save_adapter_fusion(saved/fusion, 'a,b', use_safetensors=True)"),
    }
    cases.append(case)

    # --- dynamic + temperature ---
    tdir = out / model_type / "fusion_temperature"
    tdir.mkdir(parents=True)
    model = load_base(data, model_type)
    setup_fusion(model, fusion_config("temperature"))
    load_named(model, {**load_file(str(ab_file)), **load_file(str(v_file))})
    randomise_fusion(model, 5000 + 10 * s, FUSION_QK_STD[model_type] * math.sqrt(50.0), value=False)
    params = dict(model.named_parameters())
    names_f = names_of(model, "fusion")
    tf_file = tdir / "fusion_query_key.safetensors"
    dump({n: params[n] for n in names_f if ".value." not in n}, tf_file)
    only_trainable(model, names_f)
    reg_t = fusion_reg(model)
    schedule = temperature_schedule(model, inputs)
    logits_by = {}
    for step in schedule:
        f = tdir / f"forward{step['forward']}_{step['input_name']}.safetensors"
        tensors = {"logits": step.pop("logits")}
        tensors.update(step.pop("probs"))
        logits_by[step["forward"]] = (tensors["logits"], {k: v for k, v in tensors.items() if k != "logits"})
        dump(tensors, f)
        step["file"] = rel(out, f)
        step["inputs"] = mdir_models["inputs"][step["input_name"]]
    cases.append({
        "name": f"{model_type}/fusion_temperature",
        "model_type": model_type,
        "method": "fusion",
        "adapters": {"a": seq_cfg, "b": seq_cfg},
        "fusion": "Fuse('a', 'b')",
        "fusion_name": FUSION_NAME,
        "fusion_config": fusion_config("temperature").to_dict(),
        "weights": [rel(out, ab_file), rel(out, tf_file), rel(out, v_file)],
        "weights_note": "value matrix shared with the fusion case; query/key with sqrt(50) x its std",
        "param_shapes": {n: list(params[n].shape) for n in names_f},
        "fusion_params": names_f,
        "param_counts": {"fusion_layer": count(model, names_f)},
        "fusion_regularization_loss": reg_t,
        "fusion_regularization_loss_recomputed_fp64": own_fusion_reg(model),
        "forwards": schedule,
        "forward1_vs_forward2_max_logit_diff": maxdiff(logits_by[1][0], logits_by[2][0]),
        "forward1_vs_forward2_max_prob_diff": max(
            maxdiff(logits_by[1][1][k], logits_by[2][1][k]) for k in logits_by[1][1]),
        "forward1_vs_last_max_logit_diff": maxdiff(logits_by[1][0], logits_by[max(logits_by) - 1][0]),
        "temperature_note": (
            "Every BertFusion layer holds T (Python float): T starts at 50.0, reduction = 50/1000 = "
            "0.05; each forward divides the scores by the current T and then sets T = max(T - 0.05, "
            "1.0), in eval mode and under no_grad too. All recorded forwards run on ONE model in "
            "order, eval mode, torch.no_grad; forwards not listed in 'forwards' are nopad forwards "
            "whose outputs are not recorded (they only advance T). temperature_before lists T of "
            "each fusion layer (module name -> exact float) used by that forward."),
        "unrecorded_forward_inputs": "nopad",
    })

    # --- static ---
    sdir2 = out / model_type / "fusion_static"
    sdir2.mkdir(parents=True)
    model = load_base(data, model_type)
    setup_fusion(model, fusion_config("static"))
    load_named(model, {**load_file(str(ab_file)), **load_file(str(qk_file))})
    params = dict(model.named_parameters())
    names_f = names_of(model, "fusion")
    assert set(names_f) == set(load_file(str(qk_file)))
    only_trainable(model, names_f)
    svariants = []
    with torch.no_grad():
        for iname in ("nopad", "pad"):
            logits, probs = forward(model, inputs[iname]["inputs"], fusion_probs=True)
            f = sdir2 / f"{iname}.safetensors"
            dump({"logits": logits, **probs}, f)
            svariants.append({"name": iname, "inputs": mdir_models["inputs"][iname],
                              "file": rel(out, f), "logits_shape": list(logits.shape),
                              "has_grads": False, "fusion_probs_keys": sorted(probs)})
    cases.append({
        "name": f"{model_type}/fusion_static",
        "model_type": model_type,
        "method": "fusion",
        "adapters": {"a": seq_cfg, "b": seq_cfg},
        "fusion": "Fuse('a', 'b')",
        "fusion_name": FUSION_NAME,
        "fusion_config": fusion_config("static").to_dict(),
        "weights": [rel(out, ab_file), rel(out, qk_file)],
        "weights_note": "the fusion case's adapters and query/key (static has no value matrix)",
        "param_shapes": {n: list(params[n].shape) for n in names_f},
        "fusion_params": names_f,
        "param_counts": {"fusion_layer": count(model, names_f)},
        "fusion_regularization_loss": fusion_reg(model),
        "static_note": "no value matrix: c = sum_i p_i u_i + h; get_fusion_regularization_loss() is None",
        "variants": svariants,
    })
    return cases


def temperature_schedule(model, inputs):
    """Forwards TEMPERATURE_RECORD on one model, the others nopad, until every layer's T is 1.0;
    the first forward at T == 1.0 (nopad) and the one after it (pad) are recorded as well."""
    mods = fusion_modules(model)
    steps = []

    def run(k, iname):
        before = {n: m.T for n, m in mods}
        with torch.no_grad():
            logits, probs = forward(model, inputs[iname]["inputs"], fusion_probs=True)
        after = {n: m.T for n, m in mods}
        return {"forward": k, "input_name": iname, "temperature_before": before,
                "temperature_after": after, "logits": logits, "probs": probs}

    k = 0
    record = dict(TEMPERATURE_RECORD)
    while k < max(record):
        k += 1
        if k in record:
            steps.append(run(k, record[k]))
        else:
            with torch.no_grad():
                forward(model, inputs["nopad"]["inputs"])
    while any(m.T != 1.0 for _, m in mods):
        k += 1
        with torch.no_grad():
            forward(model, inputs["nopad"]["inputs"])
        if k > 5000:
            raise RuntimeError("temperature never reached 1.0")
    for iname in ("nopad", "pad"):
        k += 1
        steps.append(run(k, iname))
    return steps


def component_effects(data, model_type, cfg, w_file, inputs, ref) -> dict:
    res = {}
    for comp in ("lora", "bottleneck", "prefix_gate_zero"):
        t = load_file(str(w_file))
        for n in t:
            if comp == "lora" and n.endswith("lora_B"):
                t[n] = torch.zeros_like(t[n])
            elif comp == "bottleneck" and f".adapters.{UNIPELT_NAME}.adapter_up." in n:
                t[n] = torch.zeros_like(t[n])
            elif comp == "prefix_gate_zero" and "prefix_gates" in n:
                t[n] = torch.zeros_like(t[n]) if n.endswith("weight") else torch.full_like(t[n], -1e4)
        m = load_base(data, model_type)
        setup_unipelt(m, cfg)
        load_named(m, t)
        with torch.no_grad():
            res[comp] = maxdiff(forward(m, inputs["nopad"]["inputs"])[0], ref)
    return res


def gen_unipelt_case(out: Path, data: Path, model_type: str, inputs: dict, mdir_models: dict) -> dict:
    s = SEEDS[model_type]
    cdir = out / model_type / "unipelt"
    cdir.mkdir(parents=True)
    cfg = unipelt_config(model_type)
    model = load_base(data, model_type)
    setup_unipelt(model, cfg)
    names = names_of(model, "unipelt")
    randomise_unipelt(model, 7000 + 10 * s)
    params = dict(model.named_parameters())
    w_file = cdir / "adapter_weights.safetensors"
    dump({n: params[n] for n in names}, w_file)
    cfg_dict = cfg.to_dict()
    (cdir / "adapter_config.json").write_text(json.dumps(cfg_dict, indent=1))
    model.train_adapter(UNIPELT_NAME)
    lib_trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    lib_trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    only_trainable(model, names)
    model.eval()
    try:
        model.save_adapter(str(out / "_tmp_save"), UNIPELT_NAME, with_head=False, use_safetensors=True)
        save_quirk = "save_adapter(use_safetensors=True) worked"
    except Exception as e:  # expected: shared prefix tensors
        msg = " ".join(str(e).split("[")[0].split())  # the tensor list's order varies per run
        save_quirk = f"save_adapter(use_safetensors=True) raises {type(e).__name__}: {msg} [...]"
    shutil.rmtree(out / "_tmp_save", ignore_errors=True)
    variants = []
    for iname in ("nopad", "pad"):
        model.zero_grad(set_to_none=True)
        gates = {}
        hs = gate_hooks(model, gates)
        logits, _ = forward(model, inputs[iname]["inputs"])
        for h in hs:
            h.remove()
        tensors = {"logits": logits, **gates}
        want = iname == "nopad"
        no_grad = None
        if want:
            (logits * inputs[iname]["R"]).sum().backward()
            tensors.update({"grad." + n: params[n].grad for n in names if params[n].grad is not None})
            no_grad = [n for n in names if params[n].grad is None]
        f = cdir / f"{iname}.safetensors"
        dump(tensors, f)
        variants.append({"name": iname, "inputs": mdir_models["inputs"][iname], "file": rel(out, f),
                         "logits_shape": list(logits.shape), "has_grads": want,
                         "params_without_grad": no_grad, "gate_keys": sorted(gates)})
    ref = load_file(str(cdir / "nopad.safetensors"))["logits"]
    effect = maxdiff(ref, inputs["nopad"]["base_logits"])
    components = component_effects(data, model_type, cfg, w_file, inputs, ref)
    # SDPA diagnostic only (not a fixture): the library's SDPA path is wrong for prefixes on decoders
    sdpa = load_base(data, model_type, attn="sdpa")
    setup_unipelt(sdpa, cfg)
    load_named(sdpa, load_file(str(w_file)))
    with torch.no_grad():
        sdpa_diff = {iname: maxdiff(forward(sdpa, inputs[iname]["inputs"])[0],
                                    load_file(str(cdir / f"{iname}.safetensors"))["logits"])
                     for iname in ("nopad", "pad")}
    default_model = load_base(data, model_type)
    setup_unipelt(default_model, UniPELTConfig())
    return {
        "name": f"{model_type}/unipelt",
        "model_type": model_type,
        "method": "unipelt",
        "adapter_name": UNIPELT_NAME,
        "adapter_config_python": (
            f"UniPELTConfig(prefix_tuning=PrefixTuningConfig(prefix_length=10, bottleneck_size="
            f"{UNIPELT_PREFIX_BOTTLENECK[model_type]}))  # adapter, lora: library defaults"),
        "library_default_prefix_bottleneck": UNIPELT_PREFIX_BOTTLENECK[model_type] == 512,
        "adapter_config": cfg_dict,
        "adapter_config_file": rel(out, cdir / "adapter_config.json"),
        "weights": [rel(out, w_file)],
        "param_shapes": {n: list(params[n].shape) for n in names},
        "param_aliases": aliases_of(model, names),
        "adapter_params": count(model, names),
        "param_breakdown": unipelt_breakdown(model, names),
        "adapter_params_with_library_default_UniPELTConfig": count(default_model, names_of(default_model, "unipelt")),
        "library_trainable_after_train_adapter": lib_trainable_count,
        "library_trainable_not_adapter": [n for n in lib_trainable if n not in names],
        "max_abs_logit_change_vs_base_nopad": effect,
        "max_abs_logit_change_nopad_when_component_off": components,
        "component_off_note": (
            "diagnostic: lora = every lora_B zeroed; bottleneck = adapter_up weight and bias zeroed; "
            "prefix_gate_zero = prefix gate Linear weight 0, bias -1e4 (gate 0: prefix K and V become "
            "0 but are still attended, so this is not the same as removing the prefix)"),
        "pad_row1_vs_unpadded_max_diff": pad_invariance(model, inputs),
        "sdpa_vs_eager_max_diff_diagnostic": sdpa_diff,
        "save_adapter_safetensors": save_quirk,
        "variants": variants,
    }


def generate(out: Path, data: Path) -> None:
    if out.exists():
        for p in out.iterdir():
            if p.name != "README.md":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    index = {
        "generator": "tests/scripts/adapterhub/make_composition_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "adapters": adapters.__version__},
        "paths_relative_to": "the parent of this file's folder (tests/data/adapterhub), as in ../index.json",
        "attn_implementation": "eager",
        "dtype": "float32",
        "mode": "eval (all dropout 0); forwards for logits under the same settings as the grads",
        "tolerances": {"logits": {"atol": ATOL, "rtol": RTOL},
                       "grads": {"atol": GRAD_ATOL, "rtol": GRAD_RTOL},
                       "fusion_probs": {"atol": ATOL, "rtol": RTOL},
                       "gates": {"atol": ATOL, "rtol": RTOL}},
        "self_check": f"the script re-runs the library on the dumped weights in a fresh process; "
                      f"all logits/grads/probs agree to <= {SELF_CHECK_TOL}",
        "loss": "sum(logits * R), R = loss_weights in the variant's inputs file",
        "padding": "right padding; row 1 of 'pad' keeps %d of 8 tokens" % PAD_LEN,
        "randomisation": RANDOMISATION,
        "fusion_qk_std": FUSION_QK_STD,
        "unipelt_prefix_bottleneck": UNIPELT_PREFIX_BOTTLENECK,
        "models": {},
        "cases": [],
        "param_counts_hidden128": {},
        "param_counts_note": (
            "library counts with the model rebuilt from make_fixtures.model_configs(128) (hidden 128, "
            "2 layers; Llama 4 heads / 2 KV heads); fusion = Fuse of two default SeqBnConfig adapters "
            "+ 'dynamic' config; unipelt = UniPELTConfig() with every library default (prefix "
            "bottleneck 512). library_trainable_after_train_adapter(_fusion) also counts what the "
            "library leaves trainable beyond the adapter (BERT: cls.predictions.transform.*)."),
        "file_keys": {
            "logits": "[batch, seq, vocab]",
            "grad.<param name>": "gradient of sum(logits * R) w.r.t. that parameter",
            "fusion_probs.layer<i>.output_adapter": (
                "softmax over (a, b) of the fusion layer of layer i, [batch, seq, 2], from "
                "output_adapter_fusion_attentions=True"),
            "gate.<module name>": (
                "UniPELT gate used by the library: mean over seq (padded tokens included) of "
                "sigmoid(gate Linear(x)), [batch, n_out]; n_out 2 on GPT-2's fused c_attn LoRA "
                "(column 0 scales the q delta, column 1 the v delta)"),
        },
        "quirks": [],
    }
    for model_type in MODELS:
        base = load_base(data, model_type)
        inputs = load_inputs(data, model_type)
        with torch.no_grad():
            base_diff = max(maxdiff(base(**inputs[i]["inputs"]).logits, inputs[i]["base_logits"])
                            for i in inputs)
        mdir_models = {
            "class": type(base).__name__,
            "base_dir": f"{model_type}/base",
            "inputs": {i: f"{model_type}/inputs_{i}.safetensors" for i in inputs},
            "hidden_size": base.config.hidden_size,
            "num_layers": base.config.num_hidden_layers,
            "base_logits_vs_committed_max_diff": base_diff,
        }
        index["models"][model_type] = mdir_models
        for case in gen_fusion_cases(out, data, model_type, inputs, mdir_models):
            index["cases"].append(case)
            print(case["name"], case["param_counts"], "reg", case["fusion_regularization_loss"], flush=True)
        case = gen_unipelt_case(out, data, model_type, inputs, mdir_models)
        index["cases"].append(case)
        print(case["name"], case["adapter_params"], case["param_breakdown"], flush=True)
        index["param_counts_hidden128"][model_type] = counts_hidden128(model_type)
    index["quirks"] = quirks(index)
    (out / "index.json").write_text(json.dumps(index, indent=1))
    files = [p for p in out.rglob("*") if p.is_file()]
    print(f"{len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.2f} MB", flush=True)


def quirks(index) -> list[str]:
    pads = {c["name"]: c["pad_row1_vs_unpadded_max_diff"] for c in index["cases"]
            if "pad_row1_vs_unpadded_max_diff" in c}
    sdpa = {c["name"]: c["sdpa_vs_eager_max_diff_diagnostic"] for c in index["cases"]
            if "sdpa_vs_eager_max_diff_diagnostic" in c}
    return [
        "Fusion: the query is LN(h + r) (BERT) or r + h (Llama/GPT-2) from the LAST adapter's "
        "pre_forward; keys and values are the adapters' up-projections u_i (before their "
        "residual); scores q.k_i have no 1/sqrt(d); the value Linear has no bias; fusion layers "
        "exist only where every fused adapter exists (seq_bn: output_adapter of every layer).",
        "Fusion temperature: T is per fusion layer and changes on every forward, eval and no_grad "
        "included (see each fusion_temperature case's 'forwards').",
        "The library's fusion regulariser is applied by AdapterTrainer in on_step_end, i.e. after "
        "optimizer.step() and model.zero_grad(), so its gradient lands in the NEXT step's grads "
        "(and the last step's is dropped); train_adapter_fusion leaves BERT's "
        "cls.predictions.transform.* trainable too.",
        "UniPELT gates average sigmoid(Linear(x)) over the whole sequence INCLUDING padded tokens, "
        f"so padded rows differ from the same row run alone: pad_row1_vs_unpadded_max_diff {pads}.",
        "UniPELT's LoRA gate replaces alpha/r (no scaling); on GPT-2 the fused c_attn has one gate "
        "Linear with 2 outputs (q, v).",
        "UniPELT save_adapter(use_safetensors=True) fails on the shared prefix tensors; "
        "adapter_weights.safetensors is this script's own dump (AdapterHub module names).",
        f"SDPA (diagnostic, not recorded): UniPELT logits under the library's SDPA path minus eager: "
        f"{sdpa}; fixtures are eager.",
    ]


# ----------------------------------------------------------------------------------------------
# verification in a fresh process


def verify(out: Path, data: Path) -> int:
    index = json.loads((out / "index.json").read_text())
    root = out.parent
    worst = 0.0
    report = []

    def cmp(label, a, b):
        nonlocal worst
        d = maxdiff(a, b)
        worst = max(worst, d)
        report.append((label, d))

    for case in index["cases"]:
        mt = case["model_type"]
        inputs = load_inputs(data, mt)
        model = load_base(data, mt)
        if case["method"] == "fusion":
            setup_fusion(model, AdapterFusionConfig.load(case["fusion_config"]))
            for a, cfgd in case["adapters"].items():
                assert AdapterConfig.load(cfgd).to_dict() == SeqBnConfig().to_dict()
        else:
            setup_unipelt(model, AdapterConfig.load(case["adapter_config"]))
        expected_names = set(case["param_shapes"])
        got = {}
        for f in case["weights"]:
            got.update(load_file(str(root / f)))
        if case["method"] == "unipelt":
            assert set(got) == set(names_of(model, "unipelt")), "unipelt names differ"
        else:
            assert set(names_of(model, "fusion")) <= set(got), "fusion names missing"
            assert expected_names <= set(got)
        load_named(model, got)
        params = dict(model.named_parameters())
        trainable = case.get("fusion_params") or names_of(model, "unipelt")
        only_trainable(model, trainable)
        name = case["name"]
        if "forwards" in case:
            mods = dict(fusion_modules(model))
            k = 0
            for step in case["forwards"]:
                while k < step["forward"] - 1:
                    k += 1
                    with torch.no_grad():
                        forward(model, inputs["nopad"]["inputs"])
                k += 1
                assert {n: m.T for n, m in mods.items()} == step["temperature_before"], (name, k)
                with torch.no_grad():
                    logits, probs = forward(model, inputs[step["input_name"]]["inputs"], fusion_probs=True)
                exp = load_file(str(root / step["file"]))
                cmp(f"{name} forward{k} logits", logits, exp["logits"])
                for key, v in probs.items():
                    cmp(f"{name} forward{k} {key}", v, exp[key])
            continue
        for var in case["variants"]:
            exp = load_file(str(root / var["file"]))
            model.zero_grad(set_to_none=True)
            gates = {}
            hs = gate_hooks(model, gates) if case["method"] == "unipelt" else []
            logits, probs = forward(model, inputs[var["name"]]["inputs"],
                                    fusion_probs=case["method"] == "fusion")
            for h in hs:
                h.remove()
            cmp(f"{name} {var['name']} logits", logits, exp["logits"])
            for key, v in {**probs, **gates}.items():
                cmp(f"{name} {var['name']} {key}", v, exp[key])
            if var["has_grads"]:
                (logits * inputs[var["name"]]["R"]).sum().backward()
                gkeys = [k for k in exp if k.startswith("grad.")]
                assert {k[5:] for k in gkeys} == {n for n in trainable if params[n].grad is not None}
                cmp(f"{name} {var['name']} grads",
                    torch.cat([params[k[5:]].grad.flatten() for k in gkeys]),
                    torch.cat([exp[k].flatten() for k in gkeys]))
        if "fusion_regularization_loss" in case and case["fusion_regularization_loss"] is not None:
            d = abs(fusion_reg(model) - case["fusion_regularization_loss"])
            worst = max(worst, d)
            report.append((f"{name} regulariser", d))
        if "saved_dir" in case:
            # the library's own loaders on the saved directories
            m2 = load_base(data, mt)
            adapters.init(m2)
            sd = root / case["saved_dir"]
            m2.load_adapter(str(sd / "a"), use_safetensors=True)
            m2.load_adapter(str(sd / "b"), use_safetensors=True)
            m2.load_adapter_fusion(str(sd / "fusion"), use_safetensors=True, set_active=True)
            m2.eval()
            with torch.no_grad():
                for var in case["variants"]:
                    exp = load_file(str(root / var["file"]))
                    cmp(f"{name} {var['name']} logits via load_adapter(_fusion) of saved/",
                        forward(m2, inputs[var["name"]]["inputs"])[0], exp["logits"])
    for label, d in report:
        print(f"  {d:.3g}  {label}")
    print(f"max diff over {len(report)} checks: {worst:.3g}", flush=True)
    return 0 if worst <= SELF_CHECK_TOL else 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("tests/data/adapterhub"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--verify", action="store_true", help="only run the self-check")
    args = ap.parse_args()
    out = args.out or args.data / "composition"
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if args.verify:
        sys.exit(verify(out, args.data))
    generate(out, args.data)
    rc = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--out", str(out),
                         "--verify"]).returncode
    sys.exit(rc)


if __name__ == "__main__":
    main()
