"""Sharded training with the plugin: sharders, planner hints and plan check (:mod:`.sharding`),
per-rank padding (:mod:`.pad`), checkpoints (:mod:`.checkpoint`), collective byte counting
(:mod:`.comm`). See docs/distributed.md."""

from recd_plugin.dist.checkpoint import Checkpointer, CheckpointError
from recd_plugin.dist.comm import CommCounter
from recd_plugin.dist.pad import pad_to_max_over_ranks
from recd_plugin.dist.sharding import check_plan, constraints, explain, sharders

__all__ = ["Checkpointer", "CheckpointError", "CommCounter", "check_plan", "constraints", "explain",
           "pad_to_max_over_ranks", "sharders"]
