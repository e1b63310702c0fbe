"""The app's settings: Flower's run config, over the defaults in pyproject.toml.

`flwr run` passes them fused already; the in-process `run_simulation` passes none, so the
defaults fill in.
"""

import tomllib
from pathlib import Path

from flwr.app import Context
from flwr.common.config import flatten_dict, unflatten_dict

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def app_config(context: Context) -> dict:
    """The nested settings of this run (``cfg["train"]["max-steps"]``)."""
    with open(PYPROJECT, "rb") as fh:
        defaults = flatten_dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    return unflatten_dict({**defaults, **context.run_config})
