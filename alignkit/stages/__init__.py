"""The stages, in the order a recipe runs them. Adding a stage is writing its module (one `STAGE` declaration and
its `run()`, see spec.Stage) and listing it here."""

from __future__ import annotations

from . import dpo, ppo, pretrain, reward, sft
from .spec import Stage

ORDER: tuple[Stage, ...] = (pretrain.STAGE, sft.STAGE, reward.STAGE, ppo.STAGE, dpo.STAGE)
REGISTRY: dict[str, Stage] = {stage.name: stage for stage in ORDER}
NAMES: tuple[str, ...] = tuple(REGISTRY)
POLICIES: tuple[str, ...] = tuple(s.name for s in ORDER if s.policy)
# what a later round (recipe `rounds`) retrains: the stage it continues and the reward stage that stage reads
ROUND_STAGES: tuple[str, ...] = tuple(s.name for s in ORDER if s.rounds or s.writes == "reward_model")


def all_defaults() -> list[tuple[str, str, str, str]]:
    """Every departure from TRL's defaults as docs/defaults.md's table lists it: (stage or 'all', setting, value,
    why)."""
    from .spec import COMMON

    rows = [("all", d.setting, d.value, d.why) for d in COMMON]
    return rows + [(s.name, d.setting, d.value, d.why) for s in ORDER for d in s.defaults]
