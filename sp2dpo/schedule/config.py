"""The schedule stage's settings: the controls an artifact can be built for."""

from __future__ import annotations

from typing import Literal, get_args

# semantic: β_i from the annotations; global: one β for every pair; shuffled: the semantic β_i
# permuted across pairs (the same distribution, no link to the pair).
Control = Literal["semantic", "global", "shuffled"]
CONTROLS: tuple[str, ...] = get_args(Control)
