"""What is trained: the paper's two-column AlexNet, its layers, transforms and shard format.

Imports torch (and PIL/webdataset in the data modules); never torch.distributed or Ray.
"""

from alexnet.config import ModelConfig
from alexnet.layers import LocalResponseNorm, StepContext
from alexnet.model import BLOCK_NAMES, BLOCKS, FusedAlexNet, Stage, TwoColumnAlexNet

__all__ = [
    "BLOCKS",
    "BLOCK_NAMES",
    "FusedAlexNet",
    "LocalResponseNorm",
    "ModelConfig",
    "Stage",
    "StepContext",
    "TwoColumnAlexNet",
]
