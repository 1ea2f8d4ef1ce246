"""Engine test fixtures: tiny random HF models per family, the default model, and transformers'
reading of the same default GGUF (`hf_default`, also used by the runtime's greedy-parity test)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from llmql.engine.models import LoadedModel, load_model
from llmql.settings import get_settings

TINY_VOCAB = 96

# NOTE: every family is small enough to build, save and load in well under a second.
_COMMON = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
TINY_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        _COMMON, head_dim=16, num_hidden_layers=4, sliding_window=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        final_logit_softcapping=5.0, attn_logit_softcapping=20.0, tie_word_embeddings=True)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_COMMON, tie_word_embeddings=False)),
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(_COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_COMMON, sliding_window=5)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_COMMON, tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_COMMON, head_dim=32)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(
        _COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        _COMMON, head_dim=16, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        _COMMON, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        shared_expert_intermediate_size=40, norm_topk_prob=False)),
}


class HFModel(NamedTuple):
    """A transformers model (eval, float32) and its tokenizer."""

    model: Any
    tokenizer: Any


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that wrong attention or norms change the logits visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "norm" in name else 1.0 / p.shape[-1] ** 0.5 * 2
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def write_tiny_tokenizer(directory: Path, vocab_size: int = TINY_VOCAB) -> None:
    """A word-level tokenizer.json over `vocab_size` tokens, with <pad>/<bos>/<eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab |= {f"w{i}": i for i in range(4, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    meta = {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(meta))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family -> a saved tiny random HF model directory (built once per session)."""
    import transformers

    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            cls_name, cfg_name, kwargs = TINY_FAMILIES[family]
            config = getattr(transformers, cfg_name)(**kwargs)
            torch.manual_seed(0)
            model = getattr(transformers, cls_name)(config)
            _randomise(model, seed=len(built))
            out = tmp_path_factory.mktemp(family)
            model.save_pretrained(out)
            write_tiny_tokenizer(out)
            built[family] = out
        return built[family]

    return build


@pytest.fixture(scope="session")
def tiny_hf_model() -> Callable[[Path], Any]:
    """directory -> the transformers model saved there (eager attention, float32, eval)."""
    from transformers import AutoModelForCausalLM

    def load(directory: Path) -> Any:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="eager"
        )
        return model.eval()

    return load


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    """Our default model (Gemma 3 270M Q4_K_M, float32, CPU), loaded once per session."""
    return load_model()


@pytest.fixture(scope="session")
def hf_default(default_model: LoadedModel) -> HFModel:
    """transformers' model + tokenizer on the same default GGUF (float32, eager attention).

    The first run converts the GGUF with transformers (~70 s) and saves the result under
    `<cache_dir>/hf/<name>/`; later runs load that directory (a few seconds).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmql.engine.loader import default_gguf

    gguf = default_gguf(get_settings().cache_dir)
    saved = get_settings().cache_dir / "hf" / gguf.stem
    if not (saved / "complete").exists():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _save_dequantised(model, saved)
        tokenizer.save_pretrained(saved)
        (saved / "complete").write_text("ok")
    model = AutoModelForCausalLM.from_pretrained(
        saved, dtype=torch.float32, attn_implementation="eager"
    )
    return HFModel(model.eval(), AutoTokenizer.from_pretrained(saved))


@pytest.fixture(scope="session")
def hf_default_tokenizer() -> Any:
    """transformers' tokenizer for the default GGUF (reuses `hf_default`'s saved copy if any;
    else converts only the tokenizer once and saves it under `<cache_dir>/hf/<name>-tokenizer`)."""
    from transformers import AutoTokenizer

    from llmql.engine.loader import default_gguf

    gguf = default_gguf(get_settings().cache_dir)
    full = get_settings().cache_dir / "hf" / gguf.stem
    if (full / "complete").exists():
        return AutoTokenizer.from_pretrained(full)
    saved = full.with_name(f"{gguf.stem}-tokenizer")
    if not (saved / "complete").exists():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(saved)
        (saved / "complete").write_text("ok")
    return AutoTokenizer.from_pretrained(saved)


def _save_dequantised(model: Any, directory: Path) -> None:
    """save_pretrained refuses GGUF-loaded models; their weights are plain float32 tensors."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_model(model, str(directory / "model.safetensors"))
