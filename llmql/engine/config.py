"""Our own frozen model configuration, converted once from a HF `config.json` or GGUF metadata.

Model code reads only `ModelConfig` fields; it never touches HF config objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FULL, SLIDING = "full_attention", "sliding_attention"

# NOTE: HF model_type -> the architecture (class) name used by the model registry.
_ARCH_BY_MODEL_TYPE = {
    "gemma3_text": "Gemma3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: "linear" (divide by factor), "llama3" (Llama 3.1 smooth), or
    "factors" (explicit per-frequency divisors, as llama.cpp stores Llama 3.1's in GGUF)."""

    kind: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    factors: tuple[float, ...] = ()  # kind "factors": per-frequency divisors (GGUF rope_freqs)

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3", "factors"):
            raise ValueError(f"unknown RoPE scaling kind {self.kind!r}")
        if self.kind == "factors" and not self.factors:
            raise ValueError("RoPE scaling 'factors' needs the factors")

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
        """From GGUF metadata (see `from_gguf_metadata`)."""
        return from_gguf_metadata(meta, tensor_names)

    @classmethod
    def from_hf(cls, params: Mapping[str, Any] | None) -> RopeScaling | None:
        """From a HF rope dict (`rope_scaling` or `rope_parameters`); None for plain RoPE."""
        if not params:
            return None
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            return None
        if kind not in ("linear", "llama3"):
            raise NotImplementedError(f"RoPE scaling {kind!r} is not supported (linear, llama3)")
        return cls(
            kind=kind,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs, for every supported family.

    Family fields: Gemma sets `norm_offset=1` (norm weight is 1 + w), `embed_scale`
    (embeddings times sqrt(hidden)), `query_pre_attn_scalar`, `rope_local_theta` (theta of
    sliding layers) and `qk_norm`; Qwen2 sets `qkv_bias`; Qwen3 sets `qk_norm`.
    """

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    embed_scale: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # NOTE: mixture of experts (0 experts: a dense model). `moe_intermediate_size` is each
    # expert's width; `norm_topk_prob` renormalises the top-k routing weights to sum to 1.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an always-on expert, sigmoid-gated

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of {self.num_kv_heads}")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, not {self.num_layers}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need a sliding_window")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} not in 1..{self.num_experts}")

    @property
    def attn_scale(self) -> float:
        """Softmax scale: query_pre_attn_scalar**-0.5 (Gemma) or head_dim**-0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer_id: int) -> int | None:
        """The sliding window of layer `layer_id`, or None for full attention."""
        return self.sliding_window if self.layer_types[layer_id] == SLIDING else None

    def layer_rope(self, layer_id: int) -> tuple[float, RopeScaling | None]:
        """(theta, scaling) of layer `layer_id`: sliding layers may use a local theta unscaled."""
        if self.layer_types[layer_id] == SLIDING and self.rope_local_theta is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; `from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of `to_dict` (the cache's `llmql_config.json`)."""
        data = dict(data)
        if data.get("rope_scaling"):
            rope = dict(data["rope_scaling"])
            rope["factors"] = tuple(rope.get("factors", ()))
            data["rope_scaling"] = RopeScaling(**rope)
        data["layer_types"] = tuple(data["layer_types"])
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        return cls(**data)

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
        """From GGUF metadata (see `from_gguf_metadata`)."""
        return from_gguf_metadata(meta, tensor_names)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """From a HF `config.json` dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
        `rope_parameters`). Raises ValueError for an unsupported architecture."""
        model_type = cfg.get("model_type", "")
        arch = (cfg.get("architectures") or [None])[0] or _ARCH_BY_MODEL_TYPE.get(model_type)
        if model_type not in _ARCH_BY_MODEL_TYPE:
            from llmql.engine.models.registry import unsupported

            raise unsupported(arch or model_type)
        gemma = model_type == "gemma3_text"
        heads = cfg["num_attention_heads"]
        layers = cfg["num_hidden_layers"]
        full_rope, local_rope = _hf_rope(cfg, gemma)
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=_ARCH_BY_MODEL_TYPE[model_type],
            model_type=model_type,
            num_layers=layers,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            max_context=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            tie_word_embeddings=cfg.get("tie_word_embeddings", gemma),
            rope_theta=float(full_rope.get("rope_theta", 1e6 if gemma else 10000.0)),
            rope_local_theta=float(local_rope.get("rope_theta", 1e4)) if gemma else None,
            rope_scaling=RopeScaling.from_hf(full_rope),
            sliding_window=window,
            layer_types=_hf_layer_types(cfg, layers, window, gemma),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if gemma else None,
            # NOTE: Gemma 3 configs carry attn_logit_softcapping but neither transformers nor
            # llama.cpp applies it (Gemma 2 did); Llama/Qwen have none.
            attn_logit_softcapping=None,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias"))
            or (model_type == "qwen2_moe" and cfg.get("qkv_bias", True)),
            o_bias=model_type in ("llama", "mistral", "mixtral") and bool(cfg.get("attention_bias")),
            mlp_bias=bool(cfg.get("mlp_bias")),
            qk_norm=model_type in ("gemma3_text", "qwen3", "qwen3_moe"),
            norm_offset=1.0 if gemma else 0.0,
            embed_scale=gemma,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            pad_token_id=cfg.get("pad_token_id"),
            **_hf_moe(cfg, model_type),
        )


def from_gguf_metadata(meta: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
    """`ModelConfig` from GGUF metadata (scalars parsed, arrays as lists) and its tensor names."""
    arch = meta["general.architecture"]
    model_type = _MODEL_TYPE_BY_GGUF.get(arch)
    if model_type is None:
        from llmql.engine.models.registry import unsupported

        raise unsupported(f"GGUF architecture {arch!r}")
    if model_type == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        model_type = "mistral"
    if model_type == "llama" and meta.get(f"{arch}.expert_count"):
        model_type = "mixtral"

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden, heads, layers = get("embedding_length"), get("attention.head_count"), get("block_count")
    head_dim = get("attention.key_length") or hidden // heads
    gemma = model_type == "gemma3_text"
    window = get("attention.sliding_window")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    scaling = get("rope.scaling.type")
    cfg = {
        "model_type": model_type,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv") or heads,
        "head_dim": head_dim,
        "vocab_size": get("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": get("context_length", 2048),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "hidden_act": "gelu_pytorch_tanh" if gemma else "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "rope_theta": get("rope.freq_base", 1e6 if gemma else 10000.0),
        "rope_scaling": {"rope_type": scaling, "factor": get("rope.scaling.factor", 1.0)}
        if scaling in ("linear",) else None,
        "sliding_window": window,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        # NOTE: llama.cpp renormalises Mixtral's and Qwen3-MoE's top-k weights (unless told).
        "num_experts": get("expert_count"),
        "num_experts_per_tok": get("expert_used_count"),
        "moe_intermediate_size": get("expert_feed_forward_length"),
        "norm_topk_prob": bool(get("expert_weights_norm", True)),
    }
    if gemma:
        # NOTE: llama.cpp scales Gemma 3 queries by head_dim**-0.5, except the 27B (62 layers)
        # which uses (hidden/heads)**-0.5; the local theta and 5:1 layer pattern are fixed there.
        cfg["query_pre_attn_scalar"] = hidden // heads if layers == 62 else head_dim
        cfg["rope_local_base_freq"] = 10000.0
        cfg["sliding_window_pattern"] = 6
    return ModelConfig.from_hf(cfg)


_MODEL_TYPE_BY_GGUF = {"gemma3": "gemma3_text", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                       "qwen3moe": "qwen3_moe"}


def _hf_moe(cfg: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The MoE fields of a HF config (Mixtral: every layer sparse, always renormalised)."""
    if model_type not in ("mixtral", "qwen3_moe", "qwen2_moe"):
        return {}
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise NotImplementedError("Qwen-MoE with dense layers (mlp_only_layers, decoder_sparse_step)")
    mixtral = model_type == "mixtral"
    shared = cfg.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
    return {
        "shared_expert_intermediate_size": shared,
        "num_experts": cfg.get("num_local_experts") or cfg["num_experts"],
        "num_experts_per_tok": cfg["num_experts_per_tok"],
        "moe_intermediate_size": cfg["intermediate_size" if mixtral else "moe_intermediate_size"]
        or cfg["intermediate_size"],
        "norm_topk_prob": True if mixtral else bool(cfg.get("norm_topk_prob", False)),
    }


def _hf_rope(cfg: Mapping[str, Any], gemma: bool) -> tuple[dict, dict]:
    """(full-attention rope params, sliding rope params) from either HF config format."""
    params = dict(cfg.get("rope_parameters") or {})
    if gemma and (FULL in params or SLIDING in params):
        return dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
    full = dict(cfg.get("rope_scaling") or {}) | params
    if "rope_theta" in cfg:
        full.setdefault("rope_theta", cfg["rope_theta"])
    local = {"rope_theta": cfg["rope_local_base_freq"]} if "rope_local_base_freq" in cfg else {}
    return full, local


def _hf_layer_types(
    cfg: Mapping[str, Any], layers: int, window: int | None, gemma: bool
) -> tuple[str, ...]:
    if cfg.get("layer_types"):
        types = tuple(cfg["layer_types"])
        return types if window else tuple(FULL for _ in types)
    if gemma:
        pattern = cfg.get("sliding_window_pattern", 6)
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers))
    return tuple((SLIDING if window else FULL) for _ in range(layers))
