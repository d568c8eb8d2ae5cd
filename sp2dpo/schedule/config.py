"""The schedule stage's settings: the β mapping (`ScheduleConfig`) and the controls an artifact can be built for."""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import Field, model_validator

from sp2dpo.annotate.schema import CATEGORIES, MAGNITUDE_MAX, MAGNITUDE_MIN
from sp2dpo.config import StageConfig

# semantic: β_i from the annotations; global: one β for every pair; shuffled: the semantic β_i
# permuted across pairs (the same distribution, no link to the pair).
Control = Literal["semantic", "global", "shuffled"]
CONTROLS: tuple[str, ...] = get_args(Control)

NOISE, REVERSED = "no_real_difference", "reversed"
SEMANTIC_CATEGORIES = tuple(c for c in CATEGORIES if c not in (NOISE, REVERSED))

DEFAULT_WEIGHTS = {
    "safety": 2.0,
    "factuality": 1.6,
    "instruction_following": 1.4,
    "reasoning": 1.4,
    "helpfulness": 1.0,
    "style": 0.5,
    "reversed": 1.0,
}


class ScheduleConfig(StageConfig):
    """`sp2dpo schedule` settings: the β mapping (hashed into the artifact) and the shuffle seed."""

    beta0: float = Field(0.1, gt=0, description="Global β of the baseline; the target mean when rescale_mean.")
    beta_min: float = Field(0.025, gt=0, description="Least β a pair gets (the clip's lower edge; pinned pairs).")
    beta_max: float = Field(0.4, gt=0, description="Largest β a pair gets (the clip's upper edge).")
    category_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS), description=(
        "w[category] per semantic category, and `reversed` (used only for flipped pairs)."))
    magnitude_factors: list[float] = Field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25], description=(
        "g(m) at magnitude 0, 1, 2, 3, linear in between (for aggregated magnitudes like 2.5)."))
    confidence_floor: float = Field(0.5, ge=0, le=1, description=(
        "h(0); h(1) = 1: an unsure teacher halves the semantic push, never zeroes it."))
    rescale_mean: bool = Field(True, description="Rescale the semantic β so the mean over the trained pairs is beta0.")
    noise_policy: Literal["min_beta", "drop"] = Field("min_beta", description=(
        "no_real_difference pairs: β = beta_min, or dropped from training."))
    reversed_policy: Literal["min_beta", "drop", "flip"] = Field("min_beta", description=(
        "reversed pairs: β = beta_min, dropped, or flipped (chosen/rejected swapped, β from the formula)."))
    unannotated_policy: Literal["beta0", "drop"] = Field("beta0", description=(
        "Pairs with no valid annotation (or an unresolved tie): β = beta0 (standard DPO), or dropped."))
    on_mean_miss: Literal["warn", "refuse"] = Field("warn", description=(
        "When rescale_mean cannot bring the mean β to beta0 (pinned pairs pull it away): warn (recorded in the "
        "artifact) or refuse (no artifact written)."))
    shuffle_seed: int = Field(0, description="Seed of the permutation of `--control shuffled`.")

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if not self.beta_min <= self.beta0 <= self.beta_max:
            raise ValueError(f"need beta_min <= beta0 <= beta_max, got {self.beta_min}, {self.beta0}, {self.beta_max}")
        unknown = sorted(set(self.category_weights) - set(SEMANTIC_CATEGORIES) - {REVERSED})
        if unknown:
            known = [*SEMANTIC_CATEGORIES, REVERSED]
            raise ValueError(f"category_weights: unknown categories {unknown}; known: {known} "
                             f"({NOISE} is set by noise_policy)")
        needed = set(SEMANTIC_CATEGORIES) | ({REVERSED} if self.reversed_policy == "flip" else set())
        missing = sorted(needed - set(self.category_weights))
        if missing:
            raise ValueError(f"category_weights: missing weights for {missing}")
        bad = {k: v for k, v in self.category_weights.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"category_weights must be positive and finite, got {bad}")
        factors = self.magnitude_factors
        if len(factors) != MAGNITUDE_MAX - MAGNITUDE_MIN + 1:
            raise ValueError(f"magnitude_factors needs one factor per magnitude {MAGNITUDE_MIN}..{MAGNITUDE_MAX}, "
                             f"got {len(factors)}")
        if not all(math.isfinite(f) and f > 0 for f in factors):
            raise ValueError(f"magnitude_factors must be positive and finite, got {self.magnitude_factors}")
        return self
