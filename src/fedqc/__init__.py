"""fedqc: data quality control for federated fine-tuning of foundation models."""

import os

# Flower: no telemetry, no update check, and no per-run `uv sync` that would pull a CUDA torch.
for _key, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
