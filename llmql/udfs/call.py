"""`CallSpec`: one logical LLM call, and everything it does with a row, read in one place.

The optimizer builds it (`LLMCall.spec`), connectors and the operators construct it
directly; the executor asks it to render prompts, build engine requests, parse answers and
name its cache identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from llmql.engine.types import GenerationRequest
from llmql.udfs import functions, prompts
from llmql.udfs.types import FUNCTIONS, CallOptions, UDFError


@dataclass(frozen=True)
class CallSpec:
    """One logical LLM call: the function, its constant instruction, its prompt fields.

    Args:
        function: one of `FUNCTIONS`.
        instruction: the constant instruction (non-empty).
        fields: prompt field names, in written order (the input table's column names).
        options: per-call options.
    """

    function: str
    instruction: str
    fields: tuple[str, ...]
    options: CallOptions = field(default_factory=CallOptions)

    def __post_init__(self) -> None:
        if self.function not in FUNCTIONS:
            raise UDFError(f"unknown LLM function {self.function!r}; known: {list(FUNCTIONS)}")
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise UDFError(f"{self.function}: the instruction must be a non-empty constant string")
        if not self.fields:
            raise UDFError(f"{self.function}: needs at least one input column")

    @property
    def cacheable(self) -> bool:
        """Whether answers may be stored and replayed: greedy calls, and sampled calls that
        name a `seed` (cached per seed); a sampled call without a seed is never cached."""
        return self.options.temperature == 0 or self.options.seed is not None

    def validate(self) -> functions.FunctionSpec:
        """Check the function-specific options (UDFError if bad); the function's spec."""
        return functions.validate(self)

    @property
    def arrow_type(self) -> pa.DataType:
        """The Arrow type of one answer."""
        return functions.get_spec(self.function).arrow_type(self.options)

    @property
    def calibrates(self) -> bool:
        """Whether answers are picked by calibrated choice scores (`CallOptions.calibrate`)."""
        return functions.calibrates(self)

    def render(self, row: Mapping[str, Any], field_order: Sequence[str] | None = None) -> str:
        """The prompt of one input row: instruction, `field: value` lines, the answer cue."""
        return prompts.render_prompt(self, row, self.fields if field_order is None else field_order)

    def shared_prefix(self) -> str:
        """The text every prompt of the call starts with: the instruction and the few-shot
        examples (their fields in written order), before the row's first field line."""
        return prompts.shared_prefix(self)

    def null_prompt(self) -> str:
        """The content-free prompt calibration compares against (every field "N/A")."""
        return prompts.null_prompt(self)

    def request(self, prompt: str, *, json_schema: bool = True, chat: bool = False) -> GenerationRequest:
        """The engine request for a rendered prompt (`json_schema=False`: parse JSON ourselves;
        `chat`: the engine renders it through the model's chat template)."""
        o = self.options
        fn = functions.get_spec(self.function)
        return GenerationRequest(
            prompt=prompt,
            max_tokens=functions.max_tokens(self),
            temperature=float(o.temperature),
            choices=fn.choices(o),
            stop=fn.stop,
            json_schema=o.json_schema if json_schema else None,
            adapter=o.adapter,
            tenant=o.tenant,
            policy=o.policy,
            seed=o.seed,
            chat=chat,
        )

    def parse(self, text: str) -> Any:
        """An answer as the function's output value (OutputParseError if it is not one)."""
        return functions.get_spec(self.function).parse(text, self.options)

    def signature(self) -> dict[str, Any]:
        """Everything besides the inputs that determines an answer (part of the cache key)."""
        return prompts.output_signature(self)
