"""The memory modules: pure ``nn.Module``s with explicit state in and out."""

from .attention import MemoryAttentionGate
from .controller import MemoryController
from .layer import EnhancedMemoryLayer

__all__ = ["EnhancedMemoryLayer", "MemoryAttentionGate", "MemoryController"]
