"""The ServerApp: one quality round, then FedAvg of the LoRA adapters."""

import logging

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedqc import QualityFilter  # fedqc
from fedqc.flower import quality_round  # fedqc
from flowertune_qc.config import app_config
from flowertune_qc.dataset import load_anchors  # fedqc
from flowertune_qc.models import get_model, get_weights

log = logging.getLogger(__name__)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = app_config(context)
    model, _ = get_model(cfg["model"])
    settings = {**cfg["quality"], "model": cfg["model"]["name"]}  # fedqc: scorer, rule, shots
    quality = QualityFilter(**settings, max_length=cfg["model"]["max-length"])  # fedqc
    anchors = load_anchors(cfg)  # fedqc
    plan, counts = quality_round(grid, anchors, quality, min_nodes=cfg["min-nodes"])  # fedqc
    kept = sum(c.kept for c in counts.values())  # fedqc: counts are all the server learns
    log.warning("quality: τ = %.4g (%s), %d samples kept", plan.tau_raw, plan.rule, kept)  # fedqc
    strategy = FedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=cfg["min-nodes"]
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(get_weights(model)),
        num_rounds=cfg["num-server-rounds"],
    )
    log.warning("trained %d rounds: %s", cfg["num-server-rounds"], result.train_metrics_clientapp)
