"""The default Gemma 3 270M with a random LoRA adapter (B != 0) against transformers + peft
on the same weights: a mixed batch (base and adapter rows) gives each side's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from llmql.engine.engine import EmbeddedEngine, EngineConfig
from llmql.engine.types import GenerationRequest

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["The capital of France is", "SQL is a language for",
           "Review: a dull, overlong film with no jokes. Sentiment:"]


def _greedy(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    """Greedy tokens (no KV cache: each step reruns the whole sequence), up to an EOS."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
    return out


@pytest.mark.slow
def test_default_model_random_adapter_matches_peft(default_model, hf_default, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # NOTE: a fresh copy: peft edits the model it wraps (hf_default is shared by the session)
    hf = AutoModelForCausalLM.from_pretrained(hf_default.model.name_or_path, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=ALL, init_lora_weights=False)
    peft_model = get_peft_model(hf, config).eval()
    with torch.no_grad():  # NOTE: changes answers, yet keeps the model's text readable
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    peft_model.save_pretrained(tmp_path / "rand")
    tok = default_model.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    eos = set(tok.eos_ids)
    want = [_greedy(peft_model, x, 8, eos) for x in ids]
    with peft_model.disable_adapter():
        plain = [_greedy(peft_model, x, 8, eos) for x in ids]
    assert want != plain  # NOTE: the adapter changes the greedy answers

    engine = EmbeddedEngine(default_model, EngineConfig(kv_tokens=4096))
    adapter = str(tmp_path / "rand")
    order = [(i, a) for i in range(len(ids)) for a in (None, adapter)]
    results = engine.generate([GenerationRequest(ids[i], max_tokens=8, adapter=a) for i, a in order],
                              progress=False)
    assert [r.error for r in results] == [None] * len(order)
    expected = [tok.decode((want if a else plain)[i]) for i, a in order]
    assert [r.text for r in results] == expected
