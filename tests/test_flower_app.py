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
