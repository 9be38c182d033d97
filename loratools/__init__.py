"""loratools: merge, blend, resize, extract, convert and inspect LoRA adapters."""
__version__ = "0.1.0"  # first: submodules read it at import

from .adapter import LoraAdapter, LoraModule
from .errors import LoraToolsError
from .formats import detect, read_adapter, write_adapter
# like merge, these functions shadow their submodules' names: import helpers as `from loratools.resize import ...`
from .merge import merge
from .resize import resize
from .extract import extract
from .blend import blend

__all__ = ["LoraAdapter", "LoraModule", "LoraToolsError", "detect", "read_adapter", "write_adapter", "merge", "resize",
           "extract", "blend"]
