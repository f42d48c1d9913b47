"""shardwise: load, shard, run and save Llama-family weights across torch.distributed ranks."""

from .boxes import Box, ShardedTensor
from .launch import LaunchTimeout, RankError, launch
from .layout import Layout, LayoutError, RankPlan, plan_rank
from .loader import load_model
from .model import Model
from .reader import Checkpoint, CheckpointError
from .spec import ModelSpec, SpecError, load_spec

__all__ = [
    "Box",
    "Checkpoint",
    "CheckpointError",
    "LaunchTimeout",
    "Layout",
    "LayoutError",
    "Model",
    "ModelSpec",
    "RankError",
    "RankPlan",
    "ShardedTensor",
    "SpecError",
    "launch",
    "load_model",
    "load_spec",
    "plan_rank",
]
