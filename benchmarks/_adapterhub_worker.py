"""AdapterHub (`adapters` 1.3) side of benchmarks/adapters_vs_adapterhub.py: a long-lived worker.

Runs ONLY in AdapterHub's own venv (transformers 4.57), never in the project venv; the benchmark
starts it as a subprocess:

    /work/venvs/adapterhub/bin/python benchmarks/_adapterhub_worker.py

Protocol: one JSON command per line on stdin, one JSON answer per line on stdout (everything else
the libraries print goes to stderr). Commands:

    {"cmd": "init", "tmp": DIR, "threads": 2, "shape": {...}, "train": [...], "infer": bool}
        builds every model once from DIR/base.safetensors (the parent's base weights) and
        DIR/ids.safetensors; writes each training model's initial adapter weights to
        DIR/init_<config>.safetensors (AdapterHub's names) for the parent to copy
    {"cmd": "sanity", "config": "pfeiffer", "skip": [0, 1, 2, 3] | null}
        a fresh model, random adapter weights -> DIR/sanity_adapter.safetensors, its logits
        -> DIR/sanity_logits.safetensors; answers the loss (not timed)
    {"cmd": "step", "variant": "pfeiffer" | "houlsby" | "parallel" | "full"}
        one timed train step (forward + backward + AdamW), answers {"s": seconds, "loss": ...}
    {"cmd": "infer", "variant": "plain" | "pfeiffer" | "pfeiffer_drop"}
        one timed forward under torch.no_grad in eval mode, answers {"s": seconds}
    {"cmd": "quit"}
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# the protocol owns the real stdout; anything else printed goes to stderr
_PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

import torch  # noqa: E402

ADAPTER = "a"
SKIP = [0, 1, 2, 3]
LIB_CONFIGS = {"pfeiffer": "SeqBnConfig", "houlsby": "DoubleSeqBnConfig", "parallel": "ParBnConfig"}


class Worker:
    def __init__(self) -> None:
        self.tmp = ""
        self.shape: dict = {}
        self.base: dict[str, torch.Tensor] = {}
        self.ids = torch.empty(0)
        self.train: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
        self.infer: dict[str, torch.nn.Module] = {}
        self.left_trainable: dict[str, list[str]] = {}  # what train_adapter left trainable besides the adapter

    # --- models ----------------------------------------------------------------------------------

    def plain(self) -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**self.shape)
        config._attn_implementation = "sdpa"
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(self.base, strict=False)
        missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise RuntimeError(f"base weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model

    def with_adapter(self, config: str) -> tuple[torch.nn.Module, list[str]]:
        import adapters

        model = self.plain()
        adapters.init(model)
        model.add_adapter(ADAPTER, config=getattr(adapters, LIB_CONFIGS[config])())
        model.train_adapter(ADAPTER)
        names = [n for n, _ in model.named_parameters() if f".adapters.{ADAPTER}." in n]
        # train_adapter may leave a head trainable: train the adapter and nothing else, as surgeon does
        self.left_trainable[config] = [n for n, p in model.named_parameters() if p.requires_grad and n not in names]
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        return model, names

    def save_adapter(self, model: torch.nn.Module, names: list[str], path: str) -> None:
        from safetensors.torch import save_file

        params = dict(model.named_parameters())
        save_file({n: params[n].detach().clone().contiguous() for n in names}, path)

    # --- commands --------------------------------------------------------------------------------

    def init(self, msg: dict) -> dict:
        import adapters
        import transformers
        from safetensors.torch import load_file

        torch.set_num_threads(int(msg["threads"]))
        self.tmp, self.shape = msg["tmp"], msg["shape"]
        self.base = load_file(os.path.join(self.tmp, "base.safetensors"))
        self.ids = load_file(os.path.join(self.tmp, "ids.safetensors"))["ids"]
        counts = {}
        for variant in msg["train"]:
            if variant == "full":
                model = self.plain().train()
                params = list(model.parameters())
            else:
                model, names = self.with_adapter(variant)
                model.train()
                self.save_adapter(model, names, os.path.join(self.tmp, f"init_{variant}.safetensors"))
                params = [p for p in model.parameters() if p.requires_grad]
            counts[variant] = sum(p.numel() for p in params)
            self.train[variant] = (model, torch.optim.AdamW(params, lr=1e-4))
        if msg["infer"]:
            self.infer["plain"] = self.plain().eval()
            for variant, skip in (("pfeiffer", None), ("pfeiffer_drop", SKIP)):
                model, names = self.with_adapter("pfeiffer")
                if variant == "pfeiffer":
                    self.save_adapter(model, names, os.path.join(self.tmp, "init_infer.safetensors"))
                model.set_active_adapters(ADAPTER, skip_layers=skip)
                self.infer[variant] = model.eval()
        some = [m for m, _ in self.train.values()] + list(self.infer.values())
        return {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "adapters": adapters.__version__, "python": sys.version.split()[0]},
                "threads": torch.get_num_threads(), "trainable_params": counts,
                "attn_implementation": sorted({m.config._attn_implementation for m in some}),
                "library_trainable_not_adapter": self.left_trainable}

    def sanity(self, msg: dict) -> dict:
        from safetensors.torch import save_file

        model, names = self.with_adapter(msg["config"])
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in names:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        model.set_active_adapters(ADAPTER, skip_layers=msg.get("skip"))
        model.eval()
        self.save_adapter(model, names, os.path.join(self.tmp, "sanity_adapter.safetensors"))
        with torch.no_grad():
            out = model(self.ids, labels=self.ids)
        save_file({"logits": out.logits.contiguous()}, os.path.join(self.tmp, "sanity_logits.safetensors"))
        return {"loss": out.loss.item(), "tensors": len(names)}

    def step(self, msg: dict) -> dict:
        model, optimizer = self.train[msg["variant"]]
        ids = self.ids
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        seconds = time.perf_counter() - start
        return {"s": seconds, "loss": loss.item()}

    def infer_step(self, msg: dict) -> dict:
        model = self.infer[msg["variant"]]
        ids = self.ids
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        return {"s": time.perf_counter() - start}


def main() -> int:
    worker = Worker()
    handlers = {"init": worker.init, "sanity": worker.sanity, "step": worker.step, "infer": worker.infer_step}
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        try:
            answer = {"ok": True, **handlers[msg["cmd"]](msg)}
        except Exception as err:  # noqa: BLE001 - reported to the parent, which stops
            answer = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        _PROTO.write(json.dumps(answer) + "\n")
        _PROTO.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
