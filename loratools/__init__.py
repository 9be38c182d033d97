"""loratools: merge, blend, resize, extract, convert and inspect LoRA adapters.

The public API is loaded on first use (PEP 562), so `import loratools` and the CLI's start-up do
not import torch. Operations live in modules named for the noun (`merging`, `blending`, …), so
the functions exported here never shadow a submodule: `loratools.merge(...)` is always the function.
"""
import importlib

__version__ = "0.1.0"  # first: submodules read it at import

# public name -> module that defines it
_API = {
    "LoraAdapter": "adapter", "LoraModule": "adapter", "LoraToolsError": "errors",
    "detect": "formats", "read_adapter": "formats", "write_adapter": "formats",
    "merge": "merging", "blend": "blending", "resize": "resizing", "extract": "extraction", "convert": "conversion",
    "inspect": "inspection", "validate": "validation",
}

__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'loratools' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
