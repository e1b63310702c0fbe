"""fedqc's cache folder and file checksums, shared by the data, model and run files fedqc checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedqc.errors import FedqcError


def cache_dir() -> Path:
    """fedqc's cache of converted models and pinned wheels: ``$FEDQC_CACHE`` or ``~/.cache/fedqc``
    (also when the variable is set but empty, as ``FEDQC_CACHE= fedqc ...`` does: not the working
    directory)."""
    return Path(os.environ.get("FEDQC_CACHE") or Path.home() / ".cache" / "fedqc")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    """Stop unless the file's sha256 is the pinned one."""
    actual = sha256_of(path)
    if actual != expected:
        raise FedqcError(f"{path}: sha256 {actual} does not match the pinned {expected}")
