"""The Flower app definition in pyproject.toml matches the code."""

from __future__ import annotations

import tomllib
from pathlib import Path

from fedqc.config import Config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_flower_run_config_mirrors_the_config_defaults():
    flwr = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]
    assert flwr["config"] == Config().to_flat()
    assert Config.from_flat(flwr["config"]) == Config()


def test_flower_components_point_at_the_apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from fedqc.federation import client_app, server_app

    components = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fedqc.federation.server_app:app",
        "clientapp": "fedqc.federation.client_app:app",
    }
    assert isinstance(server_app.app, ServerApp) and isinstance(client_app.app, ClientApp)


def test_the_app_bundle_ships_the_package_source_and_nothing_else(tmp_path):
    """`flwr run .` sends the FAB to the SuperLink and every node: never data, runs or tests."""
    import io
    import shutil
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    root = PYPROJECT.parent
    shutil.copytree(
        root / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    strays = ["data/clients/client-0.jsonl", "runs/r/selection.json", "tests/conftest.py", "x.md"]
    for stray in strays:
        (tmp_path / stray).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / stray).write_text('{"question": "private", "answer": "data"}\n')
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(tmp_path))).namelist())
    assert {"src/fedqc/federation/server_app.py", "src/fedqc/federation/client_app.py"} <= names
    assert all(n.startswith("src/fedqc/") for n in names - {"pyproject.toml", ".info/CONTENT"})
    assert not names & set(strays)
