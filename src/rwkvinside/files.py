"""Writing a file so that a crash never leaves half of it: the one helper every layer uses."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(temporary_path)`, then rename the result onto `path`: a reader sees the old file or
    the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)
