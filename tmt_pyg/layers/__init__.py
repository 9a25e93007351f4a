"""TMT building blocks as PyTorch Geometric layers."""
from .anchors import MemoryAnchors
from .attention import MeshAttentionConv
from .decay import TemporalDecay
from .dense_attention import dense_attention
from .exit_gate import ExitGate, consistency_loss, decisiveness_loss
from .ffn import DualStreamFFN, FeedForward
from .mesh import DynamicMesh
from .mesh_gps import MeshGPSConv
from .rotary import apply_rotary

__all__ = ["DynamicMesh", "MeshAttentionConv", "MeshGPSConv", "TemporalDecay", "apply_rotary", "dense_attention",
           "DualStreamFFN", "FeedForward", "ExitGate", "decisiveness_loss", "consistency_loss", "MemoryAnchors"]
