"""Re-exports of cdx/paths.py for callers not yet moved there (removed after the refactor)."""
from __future__ import annotations

from cdx.paths import (Rule, count, merge, partition, path_str, select,  # noqa: F401
                       tree_paths)
