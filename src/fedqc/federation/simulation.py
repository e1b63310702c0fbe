"""Run the ServerApp and ClientApps on this machine with Flower's simulation runtime (Ray)."""

from __future__ import annotations

import logging
import os
import warnings

import torch
from flwr.simulation import run_simulation as flwr_run_simulation

from fedqc.config import Config
from fedqc.federation.client_app import build_client_app
from fedqc.federation.server_app import Stages, build_server_app


def run_simulation(
    cfg: Config, num_nodes: int, client_mods: list | None = None, stages: Stages | None = None
) -> None:
    """One SuperNode per client; the ServerApp runs in this process, ClientApps in Ray actors.

    A ClientApp gets ``federation.client-cpus`` CPUs and ``federation.client-gpus`` of a GPU; Ray
    hides the GPUs from a ClientApp given none, so its ``model.device=auto`` is then the CPU.
    """
    cpus = os.cpu_count() or 1
    f = cfg.federation
    backend_config = {
        "client_resources": {"num_cpus": min(f.client_cpus, cpus), "num_gpus": f.client_gpus},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": torch.cuda.device_count(),
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "log_to_driver": True,
        },
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # run_simulation's deprecation notice (flwr run is the CLI)
        flwr_run_simulation(
            server_app=build_server_app(cfg, stages),
            client_app=build_client_app(cfg, client_mods),
            num_supernodes=num_nodes,
            backend_config=backend_config,
        )
