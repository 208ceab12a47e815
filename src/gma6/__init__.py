"""GMA6: LM2-style long-term memory retrofitted onto frozen Hugging Face causal LMs."""

__version__ = "0.1.0"

from .base import load_base  # noqa: E402
from .config import GMA6Config  # noqa: E402
from .model import MemoryModel, MemoryOutput, attach_memory, load_adapter  # noqa: E402
from .snapshot import load_snapshot, read_snapshot, save_snapshot  # noqa: E402
from .state import MemoryState, load_state, save_state  # noqa: E402

__all__ = [
    "GMA6Config",
    "MemoryModel",
    "MemoryOutput",
    "MemoryState",
    "attach_memory",
    "load_adapter",
    "load_base",
    "load_snapshot",
    "load_state",
    "read_snapshot",
    "save_snapshot",
    "save_state",
    "__version__",
]
