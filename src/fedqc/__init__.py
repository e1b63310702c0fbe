"""fedqc: data quality control for federated fine-tuning of foundation models.

``from fedqc import QualityFilter`` is the method as one object (:mod:`fedqc.filter`);
:mod:`fedqc.flower` drops it into an existing Flower app. Both load lazily: ``import fedqc`` (and
the CLI's start) does not import torch.
"""

import os

# Flower: no telemetry, no update check, and no per-run `uv sync` that would pull a CUDA torch.
for _key, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
__all__ = ["QualityFilter", "QualityPlan", "Selection"]


def __getattr__(name: str):
    if name in __all__:
        from fedqc import filter as _filter

        return getattr(_filter, name)
    raise AttributeError(f"module 'fedqc' has no attribute '{name}'")
