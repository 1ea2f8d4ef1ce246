"""LoRA adapters in Hugging Face PEFT format: resolve, fingerprint, validate, load.

An adapter is a folder holding `adapter_config.json` and `adapter_model.safetensors`
(`PeftModel.save_pretrained`). Supported: plain LoRA (`peft_type` "LORA") on any subset of
q/k/v/o/gate/up/down projections, any rank, `lora_alpha`, rsLoRA scaling. Everything else
(DoRA, IA3, prompt tuning, bias training, `modules_to_save`, other target modules, an
adapter for another base model) is refused with an `AdapterError` before any model call.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmql.engine.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# NOTE: HF projection name -> (our packed module, shard index within it).
TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0),
}
_FAMILIES = ("gemma", "llama", "qwen", "mistral", "phi", "falcon")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be used with this model (the message says why)."""


@dataclass(frozen=True)
class LoraAdapter:
    """A validated adapter in host memory.

    `weights[(layer, target)]` = (A [r, in], B [out, r]) with the scaling folded into B.
    """

    name: str
    path: Path
    fingerprint: str
    rank: int
    scaling: float
    targets: tuple[str, ...]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def resolve_adapter(name: str, adapters_dir: Path | None) -> Path:
    """The folder of adapter `name`: a path to a PEFT folder, or a folder in `adapters_dir`.

    Raises:
        AdapterError: neither exists, or the folder lacks the PEFT files.
    """
    candidates = [Path(name).expanduser()]
    if adapters_dir is not None and "/" not in name:
        candidates.insert(0, Path(adapters_dir) / name)
    for path in candidates:
        if path.is_dir():
            for needed in (CONFIG_FILE, WEIGHTS_FILE):
                if not (path / needed).is_file():
                    raise AdapterError(f"adapter {name!r}: {path} has no {needed} (not a PEFT LoRA folder)")
            return path.resolve()
    where = f" nor a folder in LLMQL_ADAPTERS ({adapters_dir})" if adapters_dir else \
        " (set LLMQL_ADAPTERS to a folder of adapter folders to use names)"
    raise AdapterError(f"adapter {name!r} not found: not a PEFT folder path{where}")


_FINGERPRINTS: dict[tuple[str, int, int, int, int], str] = {}


def fingerprint(path: Path) -> str:
    """Content hash of the adapter's config and weights (cached by size and mtime)."""
    stats = [(path / f).stat() for f in (CONFIG_FILE, WEIGHTS_FILE)]
    key = (str(path), stats[0].st_size, stats[0].st_mtime_ns, stats[1].st_size, stats[1].st_mtime_ns)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            digest.update((path / f).read_bytes())
        _FINGERPRINTS[key] = digest.hexdigest()[:32]
    return _FINGERPRINTS[key]


def adapter_fingerprint(name: str | None, adapters_dir: Path | None) -> str | None:
    """`name@content-hash` for a local adapter, `name` if it is not a local folder (e.g. a
    remote server's adapter), None for the base model. Used in result-cache keys."""
    if name is None:
        return None
    try:
        return f"{name}@{fingerprint(resolve_adapter(name, adapters_dir))}"
    except AdapterError:
        return name


def load_adapter(name: str, config: ModelConfig, adapters_dir: Path | None = None) -> LoraAdapter:
    """Read and validate adapter `name` for a model of `config` (host memory, float32).

    Raises:
        AdapterError: missing folder, unsupported PEFT type or option, unknown target
            module, or a base-model / shape mismatch.
    """
    from safetensors.torch import load_file

    path = resolve_adapter(name, adapters_dir)
    meta = _read_config(name, path)
    _check_config(name, meta, config)
    rank, alpha = int(meta["r"]), float(meta.get("lora_alpha", meta["r"]))
    scaling = alpha / rank**0.5 if meta.get("use_rslora") else alpha / rank
    tensors = load_file(str(path / WEIGHTS_FILE))
    weights = _pair_tensors(name, tensors, config, scaling)
    targets = tuple(sorted({t for _, t in weights}, key=list(TARGETS).index))
    return LoraAdapter(name, path, fingerprint(path), max(a.shape[0] for a, _ in weights.values()),
                       scaling, targets, weights)


def _read_config(name: str, path: Path) -> dict:
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter {name!r}: unreadable {CONFIG_FILE}: {exc}") from exc
    if not isinstance(meta, dict):
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not a JSON object")
    return meta


def _check_config(name: str, meta: dict, config: ModelConfig) -> None:
    """Refuse everything but plain LoRA on our projections of this model's family."""
    kind = str(meta.get("peft_type", "")).upper()
    if kind != "LORA":
        raise AdapterError(f"adapter {name!r}: PEFT type {kind or '?'} is not supported (LoRA only)")
    for flag, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save"),
                       ("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern")):
        if meta.get(flag):
            raise AdapterError(f"adapter {name!r}: {what} is not supported (plain LoRA only)")
    if meta.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: trained biases (bias={meta['bias']!r}) are not supported")
    if not isinstance(meta.get("r"), int) or meta["r"] <= 0:
        raise AdapterError(f"adapter {name!r}: rank r must be a positive integer")
    targets = meta.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise AdapterError(f"adapter {name!r}: target modules {unknown} are not supported "
                           f"(supported: {', '.join(TARGETS)})")
    _check_base_name(name, str(meta.get("base_model_name_or_path") or ""), config)


def _check_base_name(name: str, base: str, config: ModelConfig) -> None:
    """A base model named after another model family is a mismatch."""
    ours = config.model_type.lower()
    model = base.rstrip("/").rsplit("/", 1)[-1].lower()
    named = [f for f in _FAMILIES if f in model]
    if named and not any(f in ours for f in named):
        raise AdapterError(f"adapter {name!r} was trained for {base!r}, "
                           f"not for this {config.model_type} model")


def projection_shape(target: str, config: ModelConfig) -> tuple[int, int]:
    """(out, in) of projection `target` in a model of `config`."""
    c = config
    q, kv, h, i = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}[target]


def _pair_tensors(
    name: str, tensors: dict[str, torch.Tensor], config: ModelConfig, scaling: float
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(layer, target): (A, B * scaling)}, checking names and shapes."""
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in TARGETS:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is not a LoRA weight of a "
                               f"supported projection ({', '.join(TARGETS)})")
        layer = int(m.group(1))
        if layer >= config.num_layers:
            raise AdapterError(f"adapter {name!r} does not fit this model (another base model?): "
                               f"it has layer {layer}, the model {config.num_layers} layers")
        parts.setdefault((layer, m.group(2)), {})[m.group(3)] = tensor.float()
    if not parts:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    out = {}
    for (layer, target), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {layer} {target} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        want_out, want_in = projection_shape(target, config)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != want_in or b.shape[0] != want_out \
                or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"adapter {name!r} does not fit this model (another base model?): layer {layer} "
                f"{target} has A {tuple(a.shape)}, B {tuple(b.shape)}; the model's {target} is "
                f"[{want_out}, {want_in}]")
        out[(layer, target)] = (a.contiguous(), (b * scaling).contiguous())
    return out
