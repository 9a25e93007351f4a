"""Atomic checkpoints with keep-last-N, the RNG states an exact resume needs, and a trained model back
from a checkpoint or run folder."""
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from ..data.corpus import tokenizer_from_state
from ..models import TMTConfig, TMTModel

PathLike = Union[str, os.PathLike]


def rng_state() -> dict:
    """Python, torch CPU and (if present) CUDA generator states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_dir: PathLike) -> list:
    """Checkpoint files ``step_*.pt`` in ``ckpt_dir``, oldest first."""
    return sorted(Path(ckpt_dir).glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def write_atomic(state: dict, path: PathLike) -> Path:
    """``torch.save(state)`` to a temporary file next to ``path``, then ``os.replace``: a crash never leaves a
    truncated file under a real name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_checkpoint(state: dict, ckpt_dir: PathLike, step: int, keep_last: int = 3) -> Path:
    """Write ``state`` to ``ckpt_dir/step_{step}.pt`` atomically, then keep only the newest ``keep_last``."""
    assert keep_last >= 1, f"keep_last must be >= 1, got {keep_last}"
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = write_atomic(state, ckpt_dir / f"step_{step:08d}.pt")
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        old.unlink()
    return path


def find_checkpoint(path: PathLike) -> Optional[Path]:
    """Resolve a checkpoint file, a checkpoint directory or a run directory to a file (newest), or None."""
    path = Path(path)
    if path.is_file():
        return path
    for d in (path / "checkpoints", path):
        found = list_checkpoints(d) if d.is_dir() else []
        if found:
            return found[-1]
    return None


def load_checkpoint(path: PathLike, map_location="cpu") -> dict:
    """Load a checkpoint (file, checkpoint dir or run dir) with ``torch.load(weights_only=True)``;
    unreadable contents raise a ValueError naming the file."""
    file = find_checkpoint(path)
    if file is None:
        raise FileNotFoundError(f"no checkpoint found at {path} (expected a .pt file or a directory with step_*.pt)")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:  # what torch.load raises on bad bytes
        raise ValueError(f"checkpoint {file} is corrupted or truncated (or not a tmt-pyg checkpoint): "
                         f"{type(e).__name__}: {e}") from e


def load_run(path: PathLike, device: Union[str, torch.device] = "cpu") -> tuple:
    """``(model, tokenizer, state)``: the model (eval mode, on ``device``) and tokenizer of a checkpoint file
    or run folder (its newest checkpoint), and the raw checkpoint."""
    state = load_checkpoint(path)
    model = TMTModel(TMTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer_from_state(state["extra"]["tokenizer"]), state
