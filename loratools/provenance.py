"""How an adapter was made, stored as JSON under the safetensors metadata key `loratools`.

`push` reads it back to describe blended / resized / extracted adapters in the model card.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence

from . import __version__

KEY = "loratools"


def stamp(metadata: Optional[Dict[str, str]], operation: str, inputs: Sequence[object] = (),
          **details) -> Dict[str, str]:
    """`metadata` plus a provenance record. Inputs are named by their last path component only,
    so local folder layouts do not leak into published files."""
    record = {"operation": operation, "version": __version__,
              "inputs": [os.path.basename(os.path.normpath(os.fspath(i))) if isinstance(i, (str, os.PathLike))
                         else type(i).__name__ for i in inputs]}
    record.update({k: v for k, v in details.items() if v is not None})
    out = dict(metadata or {})
    out[KEY] = json.dumps(record, sort_keys=True)
    return out


def read(metadata: Optional[Dict[str, str]]) -> Optional[dict]:
    raw = (metadata or {}).get(KEY)
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
