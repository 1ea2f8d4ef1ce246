"""The decoder-only causal LM skeleton every family fills with its own decoder layer."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from llmql.engine.config import ModelConfig
from llmql.engine.context import get_forward_batch
from llmql.engine.layers import LMHead, RMSNorm, VocabEmbedding


class DecoderModel(nn.Module):
    """Embedding, the stack of decoder layers, final norm (HF name: `model`)."""

    def __init__(self, config: ModelConfig, layers: list[nn.Module]) -> None:
        super().__init__()
        scale = config.hidden_size**0.5 if config.embed_scale else None
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, scale)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden)
        rows = get_forward_batch().logits_indices
        if rows is not None:
            hidden = hidden[rows]
        return self.norm(hidden)


class CausalLM(nn.Module):
    """Base class of the families: `forward` gives final hidden states, `compute_logits` logits.

    NOTE: `forward(input_ids [T], positions [T])` must run inside `forward_context(batch)`.
    It returns the final-normed hidden states of the rows `batch.logits_indices` (in that
    order) when it is set, else of all T rows; `compute_logits` turns whatever rows it is
    given into float32 logits, so the runner calls `compute_logits(forward(...))` directly.
    """

    # NOTE: checkpoint sub-name -> (our packed module, shard id); see layers/linear.py.
    packed_modules_mapping: dict[str, tuple[str, str | int]] = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        layers = [self.make_layer(config, i) for i in range(config.num_layers)]
        self.model = DecoderModel(config, layers)
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, config.final_logit_softcapping)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_layer(self, config: ModelConfig, layer_id: int) -> nn.Module:
        """The family's decoder layer: `layer(positions [T], hidden [T, H]) -> [T, H]`."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T', H] -> logits [T', vocab] float32 (final soft-capping applied), or
        [T', len(rows)]: only the vocabulary entries `rows`."""
        return self.lm_head(hidden, rows)

    def compute_top_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """hidden [T', H] -> each row's best tokens (values, ids) without full logits, where
        the LM head can give them more cheaply (an int8 head); None elsewhere."""
        top = getattr(self.lm_head, "top", None)
        return top(hidden) if top is not None else None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors through each parameter's `weight_loader`.

        Raises KeyError for a tensor with no parameter, ValueError if a parameter is left unset.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if _skip(name, self.config):
                continue
            target, shard = self._target(name)
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no parameter ({target!r})")
            param = params[target]
            loader = param.weight_loader  # type: ignore[attr-defined]
            loader(param, tensor) if shard is None else loader(param, tensor, shard)
            loaded.add(f"{target}#{shard}")
        missing = {n for n in params if not any(k.startswith(f"{n}#") for k in loaded)}
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} parameters, e.g. {sorted(missing)[:5]}")

    def _target(self, name: str) -> tuple[str, str | int | None]:
        for sub, (packed, shard) in self.packed_modules_mapping.items():
            if sub in name:
                return name.replace(sub, packed), shard
        return name, None


def _skip(name: str, config: ModelConfig) -> bool:
    """Tensors a checkpoint may hold that we do not use."""
    if name.startswith("lm_head.") and config.tie_word_embeddings:
        return True
    return "rotary_emb.inv_freq" in name
