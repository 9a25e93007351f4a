"""tmt_pyg: the TemporalMesh Transformer as PyTorch Geometric layers."""
import warnings

with warnings.catch_warnings():  # PyG 2.8 says torch-cluster is "no longer necessary": it is for us, we call it directly
    warnings.filterwarnings("ignore", message=".*torch-cluster.*", category=DeprecationWarning)
    import torch_geometric  # noqa: F401
from .data.batching import tokens_to_batch
from .layers import (DualStreamFFN, DynamicMesh, ExitGate, MemoryAnchors, MeshAttentionConv, MeshGPSConv,
                     TemporalDecay)
from .models import TMTConfig, TMTModel, TMTOutput, count_parameters, match_parameters

__version__ = "0.1.0"
__all__ = ["tokens_to_batch", "DynamicMesh", "MeshAttentionConv", "MeshGPSConv", "TemporalDecay", "DualStreamFFN",
           "ExitGate", "MemoryAnchors", "TMTConfig", "TMTModel", "TMTOutput",
           "count_parameters", "match_parameters"]
