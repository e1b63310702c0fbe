"""FedDQC Table 8's counterpart (``bench.by-type``): the trained arms on federations whose
corrupted samples all have one corruption type, next to the main federation's mixture.

A type's federation is the main federation with every corrupted sample replaced by the same
item's corruption of that type. The clean samples, their clients and their places stay, so the
oracle's selection is the main federation's and trains once, there; between two rows of the table
only what the corrupted samples are changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from fedqc.bench.effect import pm
from fedqc.bench.experiment import Federation, federation_of
from fedqc.bench.pool import BenchData
from fedqc.data.partition import Member
from fedqc.errors import FedqcError

MIXTURE = "mixture (main)"
COLUMNS = [
    ("corruption", "corruption"),
    ("arm", "arm"),
    ("kept", "kept"),
    ("f1", "selection F1"),
    ("eval_loss_text", "eval loss"),
    ("d_eval_loss_text", "Δ loss"),
    ("gap_eval_loss", "gap (loss)"),
    ("answer_format_text", "final #### N line"),
    ("exact_match_text", "EM"),
    ("rouge_l_text", "ROUGE-L"),
]


def retype(fed: Federation, data: BenchData, kind: str) -> Federation:
    """``fed`` with each corrupted sample replaced by its item's ``kind`` corruption."""
    members = [[Member(m.item, kind) if m.corrupted else m for m in c] for c in fed.members]
    missing = sum(kind not in data.variants[m.item] for c in members for m in c if m.corrupted)
    if missing:
        raise FedqcError(
            f"bench.by-type: {missing} corrupted sample(s) have no '{kind}' version; set "
            "bench.variants to the number of bench.types so every item has every type"
        )
    return federation_of(data, members, f"type-{kind}")


def table_rows(
    selection: Mapping[str, Sequence[dict]],
    summaries: Mapping[str, Mapping[str, Mapping[str, float]]],
    order: Sequence[str],
) -> list[dict]:
    """One row per corruption and trained arm (in ``order``): the arm's selection on that
    federation and its trained model (mean ± sd over seeds, Δ and gap against that federation's
    mixed and the oracle).

    ``selection``: corruption -> the overall selection rows of its federation;
    ``summaries``: corruption -> arm -> :func:`fedqc.bench.effect.summarize`'s metrics.
    """
    rows = []
    for kind, summary in summaries.items():
        selected = {r["arm"]: r for r in selection[kind]}
        for arm in [a for a in order if a in summary]:
            s, chosen = summary[arm], selected.get(arm, {})
            row = {
                "corruption": kind,
                "arm": arm,
                "kept": chosen.get("kept", math.nan),
                "f1": chosen.get("f1", math.nan),
                "gap_eval_loss": math.nan
                if arm in ("mixed", "oracle")
                else s.get("gap_eval_loss", math.nan),
            }
            for metric in ("eval_loss", "answer_format", "exact_match", "rouge_l"):
                row[f"{metric}_text"] = pm(s[metric], s[f"{metric}_sd"])
            if arm != "mixed" and "d_eval_loss" in s:
                row["d_eval_loss_text"] = pm(s["d_eval_loss"], s["d_eval_loss_sd"])
            rows.append(row)
    return rows
