"""shardwise: load, shard, run and save Llama-family weights across torch.distributed ranks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shardwise")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from .io.collective_write import WriteError
from .io.hf_export import export
from .io.loader import load_model, load_weights
from .io.publish import TargetError
from .io.reader import Checkpoint, CheckpointError
from .io.sharded import ShardedCheckpoint, save_sharded
from .launch import LaunchInterrupted, LaunchTimeout, RankError, launch
from .model.forward import Model
from .model.init import init_weights
from .plan.boxes import Box, ShardedTensor
from .plan.mesh import Layout, LayoutError
from .plan.rank import RankPlan, plan_rank
from .plan.series import Series, SeriesError
from .plan.spec import ModelSpec, SpecError, load_spec, tp_plan
from .plan.tp import TpPlan, TpPlanError
from .providers.base import Provider, ProviderError
from .providers.weights import Weights

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
    "TpPlan",
    "TpPlanError",
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
    "tp_plan",
]
