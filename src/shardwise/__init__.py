"""shardwise: load, shard, run and save Llama-family weights across torch.distributed ranks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shardwise")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from .boxes import Box, ShardedTensor
from .collective_write import WriteError
from .hf_export import export
from .init import init_weights
from .launch import LaunchInterrupted, LaunchTimeout, RankError, launch
from .layout import Layout, LayoutError, RankPlan, plan_rank
from .loader import load_model, load_weights
from .model import Model
from .provider import Provider, ProviderError
from .publish import TargetError
from .reader import Checkpoint, CheckpointError
from .series import Series, SeriesError
from .sharded import ShardedCheckpoint, save_sharded
from .spec import ModelSpec, SpecError, load_spec
from .weights import Weights

__all__ = [
    "__version__",
    "Box",
    "Checkpoint",
    "CheckpointError",
    "LaunchInterrupted",
    "LaunchTimeout",
    "Layout",
    "LayoutError",
    "Model",
    "ModelSpec",
    "Provider",
    "ProviderError",
    "RankError",
    "RankPlan",
    "Series",
    "SeriesError",
    "ShardedTensor",
    "ShardedCheckpoint",
    "SpecError",
    "TargetError",
    "Weights",
    "WriteError",
    "export",
    "init_weights",
    "launch",
    "load_model",
    "load_weights",
    "load_spec",
    "plan_rank",
    "save_sharded",
]
