"""tmt_pyg: the TemporalMesh Transformer as PyTorch Geometric layers."""
from .data.batching import tokens_to_batch
from .layers import DualStreamFFN, DynamicMesh, ExitGate, MemoryAnchors, MeshAttentionConv, TemporalDecay
from .models import TMTConfig, TMTModel, TMTOutput, count_parameters, match_parameters

__version__ = "0.1.0"
__all__ = ["tokens_to_batch", "DynamicMesh", "MeshAttentionConv", "TemporalDecay", "DualStreamFFN", "ExitGate",
           "MemoryAnchors", "TMTConfig", "TMTModel", "TMTOutput",
           "count_parameters", "match_parameters"]
