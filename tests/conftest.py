import importlib.util
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
# the slot attention runs eagerly in the tests (and the CLIs they start), so that the suite does not pay a
# compile per model configuration; tests/test_fused_slots.py checks the compiled op against it
os.environ.setdefault("TMT_PYG_COMPILE", "0")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA_DIR = Path(os.environ.get("TMT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _keep_threads():
    """The benchmarks a test runs set torch's thread count: every test gives it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.exists():
        pytest.skip(f"shared corpora not found at {DATA_DIR} (set TMT_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the invariant tests that take this fixture run their layers and models: $TMT_PYG_TEST_DEVICE
    (default cpu; benchmarks/gpu_check.sh sets cuda). References are computed on the CPU."""
    return torch.device(os.environ.get("TMT_PYG_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def load_example(name: str):
    """The module of ``examples/<name>.py`` (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
