"""P-tuning (Liu et al. 2021): virtual tokens produced by a trainable prompt encoder.

`inject ptuning tokens=20 encoder=mlp|lstm [hidden=H] [layers=2] [dropout=0] [template="..."] into embed`

The encoder is PEFT's `PromptEncoder`, module for module (so its weights load either way and the
outputs match): an embedding of P trainable inputs (P x d), then
- `mlp`: Linear(d, H) ReLU Linear(H, H) ReLU Linear(H, d),
- `lstm`: a bidirectional LSTM(d -> H, `layers` layers, `dropout`), then Linear(2H, 2H) ReLU Linear(2H, d).
H defaults to d. It is registered on the target embedding as `prompt_encoder`; the input-side seam
(surgeon/methods/inputs/_prompt_inputs.py) puts its output into the model's input.

Templates (beyond PEFT, which only prepends): `template="..."` places the virtual tokens around the
input, as the P-tuning paper's patterns do. Items, separated by spaces:
- `[P]` the next virtual token, `[P:k]` the next k of them (numbered left to right),
- `[INPUT]` the input tokens, exactly once,
- `[123]` the fixed vocabulary token 123 (an anchor; embedded by the model's frozen embedding).
The `[P]` items must add up to `tokens`. Example: `template="[P:3] [INPUT] [P:2] [42]"` puts three
virtual tokens before the input and two virtual tokens plus token 42 after it. The attention mask
gets ones at the inserted places (the input's padding stays where it is), labels -100, positions
follow the input's. Without a template the virtual tokens are a prefix (PEFT's form).

Trainable parameters: P*d + (d*H+H) + (H*H+H) + (H*d+d) for `mlp`; for `lstm`,
P*d + the bi-LSTM's (per layer and direction 4H*(in+H) + 8H, in = d for the first layer and 2H after)
+ (2H*2H+2H) + (2H*d+d).

PEFT's checkpoint holds only the encoder's output (`prompt_embeddings`, P x d): the export writes
it, and a PEFT P-tuning checkpoint imports as prompt tuning with those rows (same outputs).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from surgeon.errors import ExportError
from surgeon.methods.inputs._prompt_inputs import (InputPromptMethod, PromptInputs, PromptParams, PromptPatch,
                                            embedding_size, layout_tokens, local_names, parse_template, prefix_layout)
from surgeon.methods._rng import reset_parameters
from surgeon.methods.base import ApplyContext, MethodParams, Patch, Target, locate, register
from surgeon.methods.inputs.prompt import prompt_statement


class PTuningParams(PromptParams):
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="prompt encoder: mlp (3 linear layers) or lstm (bi-LSTM + MLP)")
    hidden: int | None = Field(None, ge=1, le=1 << 24, description="hidden size H of the encoder; default: the model's hidden size")
    layers: int = Field(2, ge=1, le=8, description="LSTM layers (encoder=lstm only)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout between LSTM layers (encoder=lstm only)")
    template: str | None = Field(None, description='where the virtual tokens go, e.g. "[P:3] [INPUT] [P:2]"; default: a prefix')

    @field_validator("template")
    @classmethod
    def _readable(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        found = layout_tokens(parse_template(value))  # a ValueError here becomes a located plan error
        tokens = info.data.get("tokens")
        if tokens is not None and found != tokens:
            raise ValueError(f"the template holds {found} virtual tokens [P], but tokens={tokens}")
        return value

    @field_validator("layers", "dropout")
    @classmethod
    def _lstm_only(cls, value: Any, info: ValidationInfo) -> Any:
        default = cls.model_fields[info.field_name or ""].default
        if info.data.get("encoder") == "mlp" and value != default:
            raise ValueError(f"{info.field_name} applies to encoder=lstm (the MLP encoder has exactly 3 linear layers)")
        return value

    def layout(self) -> tuple:
        return parse_template(self.template) if self.template else prefix_layout(self.tokens)


class PromptEncoder(nn.Module):
    """PEFT's p_tuning PromptEncoder, same submodules and names (`embedding`, `lstm_head`, `mlp_head`)."""

    def __init__(self, tokens: int, d: int, params: PTuningParams) -> None:
        super().__init__()
        hidden = params.hidden or d
        self.encoder_type = params.encoder
        self.embedding = nn.Embedding(tokens, d)
        if params.encoder == "lstm":
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=hidden, num_layers=params.layers,
                                     dropout=params.dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, d))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if self.encoder_type == "lstm":
            return self.mlp_head(self.lstm_head(embeds)[0])
        return self.mlp_head(embeds)

    def prompts(self) -> torch.Tensor:
        """The P virtual tokens (1, P, d): one pass, shared by every row of a batch."""
        indices = torch.arange(self.embedding.num_embeddings, device=self.embedding.weight.device)
        return self(indices.unsqueeze(0))


def _encoder(target: Target, params: PTuningParams, device: torch.device | str = "cpu") -> PromptEncoder:
    with torch.device(device):
        return PromptEncoder(params.tokens, embedding_size(target)[1], params)


@register
class PTuning(InputPromptMethod):
    verb = "inject"
    name = "ptuning"
    Params = PTuningParams
    summary = "virtual tokens from a trainable MLP/LSTM prompt encoder, at template positions (Liu et al. 2021)"
    peft_type = "P_TUNING"

    @classmethod
    def added_shapes(cls, target: Target, params: MethodParams) -> dict[str, tuple[int, ...]]:
        assert isinstance(params, PTuningParams)
        encoder = _encoder(target, params, "meta")  # shapes only, nothing allocated
        return {f"prompt_encoder.{n}": tuple(p.shape) for n, p in encoder.named_parameters()}

    @classmethod
    def apply(cls, model: nn.Module, target: Target, params: MethodParams, ctx: ApplyContext) -> Patch:
        assert isinstance(params, PTuningParams)
        _, _, embedding = locate(model, target.path)
        device = embedding.weight.device
        if ctx.generator is None:  # torch's own reset_parameters, on the global RNG
            encoder = _encoder(target, params, device)
        else:  # built without drawing, then drawn from the seeded apply's generator with torch's laws
            encoder = _encoder(target, params, "meta").to_empty(device=device)
            reset_parameters(encoder, ctx.generator)
        encoder.train(model.training)

        def source(batch: int, task_ids: torch.Tensor | None) -> torch.Tensor:
            return encoder.prompts().expand(batch, -1, -1)

        inputs = PromptInputs(model, embedding, source, params.layout())
        return PromptPatch(embedding, {"prompt_encoder": encoder}, inputs)

    # PEFT: PromptEncoderConfig; its checkpoint holds the encoder's output only

    @classmethod
    def peft_config(cls, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, PTuningParams)
        if params.template is not None:
            raise ExportError("P-tuning with a template has no PEFT equivalent: PEFT only prepends the virtual "
                              "tokens; drop template= to export")
        return {"num_virtual_tokens": params.tokens, "encoder_reparameterization_type": params.encoder.upper(),
                "encoder_num_layers": params.layers, "encoder_dropout": params.dropout,
                "num_transformer_submodules": 1}

    @classmethod
    def peft_target_config(cls, params: MethodParams, targets: list[Target]) -> dict[str, Any]:
        assert isinstance(params, PTuningParams)
        d = embedding_size(targets[0])[1]
        return {"token_dim": d, "encoder_hidden_size": params.hidden or d}

    @classmethod
    def to_peft_tensors(cls, target: Target, params: MethodParams,
                        tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert isinstance(params, PTuningParams)
        cls.peft_config(params)  # refuses a template
        encoder = _encoder(target, params).eval()
        local = local_names(target, tensors)
        encoder.load_state_dict({n.removeprefix("prompt_encoder."): t.float().cpu() for n, t in local.items()})
        with torch.no_grad():
            return {"prompt_embeddings": encoder.prompts()[0]}

    @classmethod
    def from_peft_tensors(cls, target: Target, params: MethodParams,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise ExportError("a PEFT P-tuning checkpoint holds only the encoder's output, not the encoder: it imports "
                          "as prompt tuning ('inject prompt tokens=N into embed') with the same outputs")

    @classmethod
    def statement_from_peft(cls, config: dict[str, Any], targets: list[str]) -> str:
        return prompt_statement(config)  # the encoder's output is a plain prompt
