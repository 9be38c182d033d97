"""loratools: merge, blend, resize, extract, convert and inspect LoRA adapters."""
from .adapter import LoraAdapter, LoraModule
from .errors import LoraToolsError
from .formats import detect, read_adapter, write_adapter
from .merge import merge
from .blend import blend

__version__ = "0.1.0"
__all__ = ["LoraAdapter", "LoraModule", "LoraToolsError", "detect", "read_adapter", "write_adapter", "merge", "blend"]
