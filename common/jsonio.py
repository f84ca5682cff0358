"""Run records as JSON: one cleaner and one atomic writer for every record file.

JSON has no NaN or Infinity, so they are written as ``null``; numpy scalars
become Python numbers, tuples lists, paths strings, and keys strings.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def clean_json(x: Any) -> Any:
    """``x`` with non-finite floats as ``None`` and numpy/path values made plain."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): clean_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean_json(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and not isinstance(x, str):  # numpy scalar
        return clean_json(x.item())
    return x


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``clean_json(data)`` to ``path`` via a temporary file and a rename,
    so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean_json(data), indent=2))
    os.replace(tmp, path)
