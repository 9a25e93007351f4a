"""TMTConfig: every size and switch of a TemporalMesh Transformer."""
from dataclasses import dataclass, fields
from typing import Any, Dict

from ..layers.mesh import BACKENDS, SEARCHES

GATE_LOSSES = ("consistency", "decisiveness", "none")
MESH_SIMILARITIES = ("auto", "state", "attention")


@dataclass
class TMTConfig:
    vocab_size: int = 256  # number of token ids
    d_model: int = 256  # model width D
    n_heads: int = 8  # attention heads; head width D / n_heads
    n_layers: int = 4  # TMT layers
    graph_k: int = 8  # mesh neighbours per token (the self edge comes on top); 0 with mesh_window >= 1: the
    # window alone, no content search (a control)
    mesh_window: int = -1  # previous tokens every token also reads (local window slots; 0: none);
    # -1: 8 for a causal model, 0 for a bidirectional one (the window is causal only)
    mesh_similarity: str = "auto"  # what the kNN compares: "state" (normalised token states, the seed's
    # mesh) | "attention" (each layer's own rotated queries against its keys, every head normalised);
    # "auto": attention for a causal model, state for a bidirectional one
    mesh_search: str = "exact"  # "exact": every earlier token is a candidate (O(S^2) search) | "routed": the
    # exact top-k among the route_top best earlier blocks of route_block positions + the own block
    mesh_explore: int = 0  # random earlier tokens every token also reads in training (exploration slots: keys
    # the search did not pick still get a gradient); 0: none. Inference reads the mesh alone
    mesh_dense_warmup: int = 0  # first training steps in which the mesh layers attend densely (the same weights;
    # every key gets a gradient before the search takes over); 0: none
    route_block: int = 64  # positions per routing block (mesh_search="routed")
    route_top: int = 4  # earlier blocks every token routes to (mesh_search="routed")
    message_passing: bool = False  # mesh attention as MeshAttentionConv message passing over the mesh's
    # PyG edges (the general path) instead of the fused slot op (the fast path): the same attention, slower
    search_heads: int = 0  # heads whose queries and keys the attention-similarity mesh compares (the first
    # search_heads; 0: all): the search's S x S product shrinks by n_heads / search_heads
    decay_rate: float = 2.0  # initial per-head temporal decay rate softplus(omega)
    exit_threshold: float = 0.85  # tau: a token exits once its gate confidence exceeds it
    dual_stream: bool = True  # dual-stream FFN; False: plain GELU MLP of width mlp_dim
    ffn_stream_dim: int = 512  # hidden width of each FFN stream
    mlp_dim: int = 1024  # hidden width of the plain MLP (dual_stream=False)
    memory_anchors: int = 16  # persistent memory anchors (virtual nodes) per graph
    max_seq_len: int = 1024  # longest sequence; also the decay's distance normaliser
    dropout: float = 0.1  # dropout on embeddings and residual branches
    attn_dropout: float = 0.0  # dropout on attention weights (0 lets vanilla use the fused SDPA kernel)
    causal: bool = True  # causal language model (else bidirectional encoder)
    use_mesh: bool = True  # kNN mesh attention; False: dense attention over the whole (causal) context
    use_decay: bool = True  # multiplicative temporal decay on attention weights
    use_exit: bool = True  # per-token exit gates (frozen and skipped once exited)
    use_anchors: bool = True  # memory anchors
    rope: bool = True  # rotary positions in attention; False: learned absolute position embeddings
    mesh_backend: str = "auto"  # "auto" | "dense" | "cluster" (see DynamicMesh)
    gate_loss: str = "consistency"  # exit-gate objective: "consistency" | "decisiveness" | "none"
    gate_loss_weight: float = 0.1  # weight of the gate objective in the total loss
    gate_sample: int = 512  # tokens per batch scored by the consistency objective
    gate_detach: bool = True  # gates read detached states: their objective trains the gates only, not the trunk
    exit_loss_weight: float = 0.0  # weight of the early-exit LM loss: every earlier layer's next-token loss
    # through the shared head, layer l weighted by l (CALM), so that early states can predict
    exit_loss_sample: int = 0  # tokens per batch the early-exit loss scores (drawn uniformly, the same for every
    # layer; scaled so that its expectation is the loss over every token): the head runs on these rows only; 0: all
    exit_loss_layers: int = 0  # early layers the early-exit loss scores per step, drawn with replacement with
    # probability proportional to their weight l (so that its expectation is the every-layer loss); 0: every one
    layer_dropout: float = 0.0  # LayerSkip's layer dropout (training only): a sequence skips layer l with probability
    # layer_dropout * l / (n_layers - 1) (rising with depth, never layer 0); a kept layer's update is scaled by 1 / (1 - p)
    exit_in_training: bool = False  # also freeze exited tokens in training mode
    anchor_momentum: float = 0.99  # EMA momentum beta of the anchor state

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"TMTConfig: {msg}")
        for f in fields(self):  # types first, so that the checks below compare numbers
            value, allowed = getattr(self, f.name), (int, float) if f.type is float else f.type
            if not isinstance(value, allowed) or (isinstance(value, bool) and f.type is not bool):
                raise TypeError(f"TMTConfig: {f.name} must be {f.type.__name__}, got {value!r}")
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_seq_len", "ffn_stream_dim",
                     "mlp_dim", "gate_sample", "route_block", "route_top"):
            need(getattr(self, name) >= 1, f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.mesh_window == -1:  # the defaults chosen by measurement (README: the mesh), causal models only
            self.mesh_window = 8 if self.causal else 0
        if self.mesh_similarity == "auto":
            self.mesh_similarity = "attention" if self.causal else "state"
        need(self.mesh_window >= 0, f"mesh_window must be >= 0 (or -1: the default), got {self.mesh_window}")
        need(self.graph_k >= 1 or (self.graph_k == 0 and self.mesh_window >= 1 and self.mesh_search == "exact"),
             f"graph_k must be a positive integer, got {self.graph_k!r}"
             + (" (0, a window-only mesh, needs mesh_window >= 1 and mesh_search='exact')" if self.graph_k == 0 else ""))
        need(self.mesh_window == 0 or self.causal, "mesh_window (a window of previous tokens) needs causal=True")
        need(self.mesh_similarity in MESH_SIMILARITIES,
             f"mesh_similarity must be one of {MESH_SIMILARITIES}, got {self.mesh_similarity!r}")
        need(self.mesh_similarity == "state" or self.causal, "mesh_similarity='attention' needs causal=True")
        need(self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        need(not self.rope or (self.d_model // self.n_heads) % 2 == 0, "rope needs an even head width")
        need(0.0 < self.exit_threshold <= 1.0, f"exit_threshold must lie in (0, 1], got {self.exit_threshold}")
        need(0.0 <= self.dropout < 1.0, f"dropout must lie in [0, 1), got {self.dropout}")
        need(0.0 <= self.attn_dropout < 1.0, f"attn_dropout must lie in [0, 1), got {self.attn_dropout}")
        need(self.decay_rate > 0, f"decay_rate must be > 0, got {self.decay_rate}")
        need(self.memory_anchors >= 1 or not self.use_anchors, "use_anchors needs memory_anchors >= 1")
        need(0 <= self.search_heads <= self.n_heads,
             f"search_heads must lie in [0, n_heads={self.n_heads}] (0: all heads), got {self.search_heads}")
        need(self.search_heads == 0 or self.mesh_similarity == "attention",
             "search_heads selects heads of the attention-similarity mesh: it needs mesh_similarity='attention'")
        need(self.mesh_explore >= 0, f"mesh_explore must be >= 0, got {self.mesh_explore}")
        need(self.mesh_explore == 0 or self.causal, "mesh_explore (random earlier tokens) needs causal=True")
        need(self.exit_loss_sample >= 0, f"exit_loss_sample must be >= 0, got {self.exit_loss_sample}")
        need(self.exit_loss_layers >= 0, f"exit_loss_layers must be >= 0, got {self.exit_loss_layers}")
        need(self.mesh_dense_warmup >= 0, f"mesh_dense_warmup must be >= 0, got {self.mesh_dense_warmup}")
        need(self.mesh_search in SEARCHES, f"mesh_search must be one of {SEARCHES}, got {self.mesh_search!r}")
        need(self.mesh_search == "exact" or self.causal, "mesh_search='routed' needs causal=True")
        need(self.mesh_backend in BACKENDS, f"mesh_backend must be one of {BACKENDS}, got {self.mesh_backend!r}")
        need(0.0 <= self.layer_dropout < 1.0, f"layer_dropout must lie in [0, 1), got {self.layer_dropout}")
        need(self.exit_loss_weight >= 0, f"exit_loss_weight must be >= 0, got {self.exit_loss_weight}")
        need(self.gate_loss_weight >= 0, f"gate_loss_weight must be >= 0, got {self.gate_loss_weight}")
        need(self.gate_loss in GATE_LOSSES, f"gate_loss must be one of {GATE_LOSSES}, got {self.gate_loss!r}")
        need(0.0 <= self.anchor_momentum < 1.0, f"anchor_momentum must lie in [0, 1), got {self.anchor_momentum}")

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TMTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TMTConfig: unknown field(s) {unknown}")
        return cls(**values)

    @classmethod
    def vanilla(cls, **overrides) -> "TMTConfig":
        """A plain causal transformer: every TMT part switched off."""
        switches = dict(use_mesh=False, use_decay=False, use_exit=False, use_anchors=False, dual_stream=False)
        return cls(**{**switches, **overrides})
