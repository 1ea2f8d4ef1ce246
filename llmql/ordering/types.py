"""The result of reordering a table (DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ordering:
    """Send order of a table's rows and the field order inside each row's prompt."""

    row_order: list[int]  # indices into the input table, in send order
    field_orders: list[list[str]]  # field order for each row, aligned with row_order
