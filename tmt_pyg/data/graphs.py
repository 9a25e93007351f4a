"""PyG graph datasets from a local read-only copy (offline machines) or their download URLs."""
import os
import shutil
from pathlib import Path
from typing import Optional, Union

LOCAL_DATA = os.environ.get("TMT_DATA_DIR")  # a folder of local dataset copies, for machines without network
CACHE = Path(os.environ.get("TMT_CACHE_DIR", Path.home() / ".cache" / "tmt_pyg"))


def dataset_root(name: str, data_dir: Optional[Union[str, Path]] = None, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Writable root for a PyG dataset class, e.g. ``Planetoid(dataset_root("planetoid"), "Cora")``.

    PyG writes ``processed/`` next to ``raw/``, so a read-only copy at ``data_dir/name`` (default:
    ``$TMT_DATA_DIR``, if set) is copied once into ``cache_dir/name`` (default:
    ``$TMT_CACHE_DIR`` or ``~/.cache/tmt_pyg``). Without a local copy the dataset class downloads
    into that same folder.
    """
    local = data_dir or LOCAL_DATA
    source = None if local is None else Path(local) / name
    root = Path(cache_dir or CACHE) / name
    if source is not None and source.is_dir() and not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.copytree(source, staging)
        try:
            staging.rename(root)  # atomic: an interrupted copy never leaves a half folder at root
        except OSError:  # a concurrent process got there first
            shutil.rmtree(staging)
    return root
