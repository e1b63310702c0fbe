"""The bench's own options (a ``[bench]`` section), next to the normal `fedqc run` config.

One TOML file serves both: ``[model]``, ``[data]``, ``[train]`` … go to :class:`fedqc.config.Config`
and ``[bench]`` to :class:`BenchConfig`; ``--set bench.key=value`` works like any other key. A
profile (``--quick``, ``--full``) is a set of defaults applied first, so a config file and ``--set``
still override it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from fedqc.config import Config, _coerce, toml_settings  # _coerce: the run config's own conversion
from fedqc.data.corrupt import CORRUPTIONS
from fedqc.data.partition import Partition, parse_partition
from fedqc.errors import FedqcError
from fedqc.quality.plan import check_scoring_model
from fedqc.quality.rules import Rule, conformal_threshold, parse_rule
from fedqc.scoring.scorers import CHECKPOINT_SCORERS, get_scorer

# The rules the bench compares: τ from the anchors, or the federation-wide histogram fit.
ANCHOR_RULES = ("anchor-mean", "anchor-quantile", "anchor-conformal", "anchor-gaussian", "mixture")
# end-loss alone is left out: it has no value for a sample cut at model.max-length.
DEFAULT_SCORERS = "ppl,cond-prob,ifd,ira,ensemble:ppl+ifd,ensemble-min:cond-prob+ifd+end-loss"
DEFAULT_RULES = "anchor-mean,anchor-quantile:0.1,anchor-conformal:0.1,anchor-gaussian:0.1,mixture"
# Checkpoint scorers the bench cannot run faithfully, and why.
UNSUPPORTED = {
    "clues": (
        "clues needs every client's Adam moments from its own warm-up steps; the bench's warm-up "
        "is the training arms' `fedqc run` (phase 2 rounds), whose clients do not keep them, and "
        "the moments are per client, so pool scores could not be shared between federations. "
        "Use tracin, tracin-cos, datainf, icl or nuggets in the bench, and "
        "`fedqc run --set quality.scorer=clues` for clues"
    ),
}


@dataclass
class BenchConfig:
    # The main federation. "explicit" takes data.contamination (one rate per client, or one for
    # all); iid / niid-1[:β] take one global rate from data.contamination; niid-2[:LO,HI] its own.
    partition: str = "explicit"
    types: str = ",".join(CORRUPTIONS)  # the corruption mixture
    variants: int = 1  # corrupted versions scored per pool item (5: every type for every item)
    # Forward-only scorers, ensembles (ensemble:ppl+ifd) and checkpoint scorers (tracin,
    # tracin-cos, datainf, icl, nuggets: scored at the warm-up checkpoints).
    scorers: str = DEFAULT_SCORERS
    rules: str = DEFAULT_RULES
    # Checkpoint scorers: W warm-up rounds of federated LoRA on the main federation's unfiltered
    # data (a real `fedqc run`); the global adapter after round k is the checkpoint θ_k.
    warmup_rounds: int = 2
    # Re-score checkpoint scorers where a sweep changes what they depend on (another anchor draw:
    # ḡ_k or the icl prefix; datainf: another client's samples). Slow; off: those rows are n/a.
    rescore_checkpoints: bool = False
    # Sweeps (selection only, on federations re-assembled from the same scored pool).
    sweep_partition: str = "iid"
    contamination_sweep: str = "0.2,0.5,0.8"
    anchor_sweep: str = "5,10,50"
    anchor_repeats: int = 5  # random anchor draws per anchor count
    type_rate: float = 0.5  # corrupted share of each single-type federation
    # Training arms: names, or mixed / oracle / default (`fedqc run`'s default scorer and rule) /
    # paper (ppl + anchor-mean scored zero-shot, the papers' rule; the pool is scored once more
    # without demonstrations when quality.shots > 0) / best (the QC arm with the best selection
    # F1, picked with the ground truth) / all / none.
    train: str = "mixed,oracle,default"
    # Training seeds (train.seed: batch order, LoRA dropout, client sampling; the initial adapter
    # is the same in every run): each trained arm trains once per seed on the same selection.
    # Comma-separated whole numbers; empty: train.seed alone.
    seeds: str = ""
    # FedDQC Table 8's counterpart: train the bench.train arms again on each corruption type's
    # federation (the main one with every corrupted sample in that type; the oracle trains once,
    # on the main one). Needs bench.variants = the number of bench.types.
    by_type: bool = False
    # Federated-learning arms: each trained arm again under other training settings, separated by
    # ";", each one or more run-config overrides joined by "&", e.g.
    # "train.strategy=fedprox:0.01; train.aggregation=merge:ties:0.5; quality.curriculum=stages:3"
    # (named "<arm> + <overrides>"). In the bench the curriculum ranks by ppl: an arm's run scores
    # its upfront selection with ppl.
    fl_arms: str = ""
    em_questions: int = 20  # held-out questions for greedy-generation exact match (0: off)
    max_new_tokens: int = 160
    source: str = ""  # a file of clean samples instead of GSM8K (any fedqc schema), or a name
    # of fedqc.data.catalog (gsm8k, gpqa, humaneval, mgsm-symbolic:LANG)
    # A heterogeneity federation: one source per client (a catalog name or a file), e.g.
    # "gpqa,humaneval,mgsm-symbolic:deu,mgsm-symbolic:rus". Each client's pool comes from its own
    # source (clients naming the same one share it out), corrupted within it; the anchors and the
    # eval set still come from bench.source. Empty: every client draws from bench.source.
    client_sources: str = ""
    # `fedqc bench --draws N` (fedqc.bench.draws): which anchors calibrate the ensemble and set τ
    # (drawn, run, split:C), and the seed of the draws (the pool's seed stays data.seed).
    draw_plans: str = "drawn,run,split:2"
    draw_seed: int = 0
    reuse_losses: str = ""  # a previous --draws run directory of the same pool: no re-scoring

    # --- parsed views -------------------------------------------------------------------------

    def list_of(self, name: str) -> list[str]:
        return [x.strip() for x in str(getattr(self, name)).split(",") if x.strip()]

    @property
    def client_source_list(self) -> list[str]:
        return self.list_of("client_sources")

    @property
    def type_list(self) -> list[str]:
        return self.list_of("types")

    @property
    def scorer_list(self) -> list[str]:
        return self.list_of("scorers")

    @property
    def checkpoint_scorers(self) -> list[str]:
        """The named scorers that are computed at the warm-up checkpoints."""
        return [s for s in self.scorer_list if s in CHECKPOINT_SCORERS]

    @property
    def rule_list(self) -> list[Rule]:
        return [parse_rule(r) for r in self.list_of("rules")]

    @property
    def plan_list(self) -> list[str]:
        return self.list_of("draw_plans")

    def seed_list(self, cfg: Config) -> list[int]:
        """The training seeds: bench.seeds, or train.seed when it is empty."""
        words = self.list_of("seeds")
        if not words:
            return [cfg.train.seed]
        if not all(w.isdigit() for w in words) or len(set(map(int, words))) != len(words):
            raise FedqcError(
                f"bench.seeds '{self.seeds}': different whole numbers ≥ 0, e.g. bench.seeds=0,1,2"
            )
        return [int(w) for w in words]

    def check_plans(self, shots: int, num_anchors: int) -> None:
        """Every draw plan parses; a split leaves the demonstrations out of τ and keeps two anchors
        on each side."""
        for plan in self.plan_list:
            if plan in ("drawn", "run"):
                continue
            kind, _, size = plan.partition(":")
            if kind != "split" or not size.isdigit():
                raise FedqcError(
                    f"bench.draw-plans: unknown plan '{plan}'; use drawn, run or split:C "
                    "(C anchors calibrate the ensemble, the others set τ)"
                )
            if not max(2, shots) <= int(size) <= num_anchors - 2:
                raise FedqcError(
                    f"bench.draw-plans: '{plan}' needs max(2, quality.shots = {shots}) ≤ C ≤ "
                    f"data.num-anchors − 2 = {num_anchors - 2}"
                )

    @property
    def contamination_list(self) -> list[float]:
        return _floats(self, "contamination_sweep", 0.0, 1.0)

    @property
    def anchor_counts(self) -> list[int]:
        values = _floats(self, "anchor_sweep", 1.0, float("inf"))
        if not all(v.is_integer() for v in values):
            raise FedqcError(f"bench.anchor-sweep '{self.anchor_sweep}': anchor counts are whole")
        return [int(v) for v in values]

    def main_partition(self, cfg: Config) -> tuple[Partition, float]:
        """The main federation's partition and, for iid / niid-1, its global contamination."""
        part = parse_partition(self.partition)
        rates = _floats_of(cfg.data.contamination, "data.contamination", 0.0, 1.0)
        if part.kind == "explicit" and not part.rates:
            part = Partition("explicit", rates=tuple(rates))
        if part.kind in ("iid", "niid-1"):
            if len(rates) != 1:
                raise FedqcError(
                    f"partition '{part}' takes one global rate: set data.contamination=0.4 "
                    f"(it is '{cfg.data.contamination}'), or use bench.partition=explicit"
                )
            return part, rates[0]
        return part, float("nan")

    def check(self, cfg: Config) -> None:
        """Every option parses and fits the config; one clear line otherwise."""
        for name in self.scorer_list:
            if name in UNSUPPORTED:
                raise FedqcError(f"bench.scorers: {UNSUPPORTED[name]}")
            if name not in CHECKPOINT_SCORERS:
                get_scorer(name)
        if not self.scorer_list:
            raise FedqcError("bench.scorers: name at least one scorer")
        if len(set(self.scorer_list)) != len(self.scorer_list):
            raise FedqcError(f"bench.scorers '{self.scorers}': a scorer is named twice")
        check_scoring_model(
            self.scorer_list, cfg.quality.curriculum, cfg.scoring_model().name, cfg.model.name
        )
        if self.checkpoint_scorers and self.warmup_rounds < 1:
            raise FedqcError(
                f"bench.warmup-rounds must be ≥ 1 for {', '.join(self.checkpoint_scorers)}"
            )
        for rule in self.rule_list:
            if rule.kind not in ANCHOR_RULES:
                raise FedqcError(
                    f"bench.rules: '{rule}' is not an anchor rule; the bench compares "
                    f"{', '.join(ANCHOR_RULES)} (drop-fraction and the global threshold are "
                    "its built-in baselines)"
                )
            if rule.kind == "anchor-conformal":
                # the main federation's anchors must support α (the anchor sweep marks the rest
                # n/a)
                try:
                    conformal_threshold(np.arange(float(cfg.data.num_anchors)), rule.value)
                except FedqcError as exc:
                    raise FedqcError(
                        f"bench.rules: {exc} (data.num-anchors = {cfg.data.num_anchors})"
                    ) from None
            if rule.kind == "mixture" and cfg.data.num_anchors < 2:
                raise FedqcError("bench.rules: mixture needs data.num-anchors ≥ 2 (the bins)")
        unknown = set(self.type_list) - set(CORRUPTIONS)
        if unknown or not self.type_list:
            raise FedqcError(f"bench.types '{self.types}': use some of {', '.join(CORRUPTIONS)}")
        if self.variants < 1:
            raise FedqcError("bench.variants must be ≥ 1")
        part, _ = self.main_partition(cfg)
        if part.kind == "explicit" and len(part.rates) not in (1, cfg.data.num_clients):
            raise FedqcError(
                f"partition '{part}': {len(part.rates)} rates for {cfg.data.num_clients} clients"
            )
        parse_partition(self.sweep_partition)
        self.contamination_list  # noqa: B018 (parses)
        self.anchor_counts  # noqa: B018
        if not 0 < self.type_rate < 1:
            raise FedqcError("bench.type-rate must be in (0, 1)")
        if self.anchor_repeats < 1 or self.em_questions < 0 or self.max_new_tokens < 1:
            raise FedqcError("bench: anchor-repeats, max-new-tokens ≥ 1 and em-questions ≥ 0")
        if cfg.data.num_clients < 1 or cfg.data.samples_per_client < 1:
            raise FedqcError("data.num-clients and data.samples-per-client must be ≥ 1")
        self.check_sources(cfg)
        self.fl_arm_list(cfg)
        self.seed_list(cfg)
        if self.by_type:
            self.check_by_type()

    def check_by_type(self) -> None:
        """bench.by-type trains arms on federations of every type: each item needs each type."""
        if self.variants < len(self.type_list):
            raise FedqcError(
                f"bench.by-type needs every pool item corrupted by every type: set "
                f"bench.variants={len(self.type_list)} (the number of bench.types; it is "
                f"{self.variants})"
            )
        if self.checkpoint_scorers:
            raise FedqcError(
                "bench.by-type: the checkpoint scorers are scored on the main federation only; "
                f"leave {', '.join(self.checkpoint_scorers)} out of bench.scorers"
            )
        if not [w for w in self.list_of("train") if w not in ("none", "oracle")]:
            raise FedqcError(
                f"bench.by-type: bench.train '{self.train}' trains no arm besides the oracle; "
                "e.g. bench.train=mixed,paper,default,oracle"
            )

    def check_sources(self, cfg: Config) -> None:
        """bench.source and bench.client-sources name sources that exist, one per client."""
        from fedqc.data.catalog import check_source

        if self.source:
            check_source(self.source, "bench.source")
        sources = self.client_source_list
        if self.client_sources.strip() and len(sources) != cfg.data.num_clients:
            raise FedqcError(
                f"bench.client-sources: {len(sources)} source(s) for {cfg.data.num_clients} "
                "clients (data.num-clients); name one per client"
            )
        for source in sources:
            check_source(source, "bench.client-sources")

    def fl_arm_list(self, cfg: Config) -> list[tuple[str, dict[str, str]]]:
        """(name, run-config overrides) of each bench.fl-arms entry, checked against ``cfg``."""
        from fedqc.federation.strategy import check_strategy
        from fedqc.quality.curriculum import check_curriculum

        arms = []
        for entry in (e.strip() for e in self.fl_arms.split(";") if e.strip()):
            overrides = {}
            for item in (i.strip() for i in entry.split("&")):
                key, sep, value = item.partition("=")
                if not sep:
                    raise FedqcError(f"bench.fl-arms: '{item}' is not key=value")
                overrides[key.strip()] = value.strip()
            arm_cfg = cfg.replace(**overrides)  # one line on an unknown key or a bad value
            check_strategy(arm_cfg)
            check_curriculum(arm_cfg.quality.curriculum, arm_cfg.train.rounds, False)
            arms.append((" & ".join(f"{k}={v}" for k, v in overrides.items()), overrides))
        return arms

    # --- reading and writing --------------------------------------------------------------------

    def set(self, key: str, value: Any, source: str) -> None:
        attr = key.replace("-", "_")
        known = {f.name: f for f in fields(self)}
        if attr not in known:
            names = ", ".join(f"bench.{f.name.replace('_', '-')}" for f in fields(self))
            raise FedqcError(f"{source}: unknown config key 'bench.{key}'. Known keys: {names}")
        kind = type(getattr(BenchConfig(), attr))
        setattr(self, attr, _coerce(value, kind, f"bench.{key}", source))

    def to_toml(self) -> str:
        lines = ["[bench]"]
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = repr(value) if isinstance(value, int | float) else json.dumps(value)
            lines.append(f"{f.name.replace('_', '-')} = {text}")
        return "\n".join(lines) + "\n"


# Profiles: defaults applied before the config file and --set.
PROFILES: dict[str, dict[str, Any]] = {
    # 2-core CPU, under 20 minutes: 80 client samples, 50 anchors, 2 short rounds per trained arm;
    # the forward-only scorers and the ppl+ifd ensemble, every rule. Checkpoint scorers do not fit
    # the budget here (each costs a forward+backward per sample and checkpoint): add them with
    # --set bench.scorers=ppl,...,tracin,tracin-cos,icl.
    "quick": {
        "data.samples-per-client": 20,
        "data.num-eval": 20,
        "train.rounds": 2,
        "train.local-steps": 2,
        "bench.em-questions": 20,
        "bench.max-new-tokens": 160,
        "bench.train": "mixed,oracle,default",
    },
    # The trained model's benefit (issue 14), within about an hour on 2 idle cores in float32: the
    # 4 arms mixed, paper, default and oracle, each trained with 3 seeds on the same selection
    # (12 federated trainings), then greedy answers of every trained adapter and the base model
    # (13 generation passes). Measured with this profile at 1 round, 1 seed (machine nearly idle,
    # float32): scoring 140 s (2-shot, 4 × 12 pool); one training 171 s, of which each client's 4
    # local steps of batch 2 took 18 s (the 2 Ray actors run 2 clients at a time) and about
    # 115 s is fixed cost (Ray start, model loading, saving; the same in every training);
    # generation 76 s per model for 32 answers × 224 tokens. A LoRA step on 2 threads took
    # 2.4–4.7 s at batch 2 and 7.9–8.5 s at batch 4 (max-length 384). The fixed cost leaves
    # about 100 s of steps and evaluations per training, hence:
    # - 2 clients × 12 samples, half corrupted (FedDQC's share) by cut, deletion and exchange:
    #   cut answers lose their final `#### N` line, which is what lowers the answer-format rate.
    #   Two clients run in parallel, so a round costs one client's steps. 4 rounds × 4 local
    #   steps × batch 2 = 32 samples per client: 2.7 epochs of a mixed pool (12), 5.3 of an
    #   oracle pool (6): several passes over small pools, not one over large ones. Batch 2 with
    #   more local steps moves the adapter further for the same compute (FedAvg's progress counts
    #   local steps); lr 1e-3 instead of 5e-4 for the same reason (chosen up front, not tuned on
    #   this profile's results).
    # - model.max-length 384: at the default 256, 26% of GSM8K samples (prompt with the chat
    #   template + answer) are cut before their final line, clean ones too, which would teach
    #   every arm to stop early; 384 cuts 2%.
    # - 24 held-out samples: the eval loss after every round (5 evaluations per training) and the
    #   generation questions (one batch of greedy decoding). 224 new tokens: 95% of GSM8K
    #   reference answers are shorter (median 118, 90th percentile 201 tokens), so a model that
    #   writes the final line can reach it.
    # - bench.anchor-sweep 5,10: the anchor set stays the 10 anchors (the sweep's 50 would be
    #   scored for nothing here).
    # Estimate, 2 idle cores: scoring about 2 min (2-shot, then zero-shot for the paper arm),
    # 12 trainings × about 225 s = 45 min, 13 generations × about 60 s = 13 min: about 60 min.
    "effect": {
        "data.num-clients": 2,
        "data.samples-per-client": 12,
        "data.contamination": "0.5",
        "data.num-eval": 24,
        "model.max-length": 384,
        "train.rounds": 4,
        "train.local-steps": 4,
        "train.batch-size": 2,
        "train.lr": 1e-3,
        "bench.types": "cut,deletion,exchange",
        "bench.anchor-sweep": "5,10",
        "bench.em-questions": 24,
        "bench.max-new-tokens": 224,
        "bench.train": "mixed,paper,default,oracle",
        "bench.seeds": "0,1,2",
    },
    # A big machine (hours on 2 CPU cores; set model.device for a GPU): 1000 client samples,
    # every corruption of each, every arm trained.
    "full": {
        "data.samples-per-client": 250,
        "data.num-eval": 200,
        "train.rounds": 10,
        "train.local-steps": 10,
        "train.batch-size": 16,
        "bench.variants": len(CORRUPTIONS),
        "bench.scorers": DEFAULT_SCORERS + ",tracin,tracin-cos,datainf,icl",
        "bench.anchor-repeats": 20,
        "bench.em-questions": 200,
        "bench.max-new-tokens": 256,
        "bench.train": "all",
    },
}


def load_bench_config(
    path: str | Path | None, overrides: list[str] | None = None, profile: str | None = None
) -> tuple[Config, BenchConfig]:
    """Defaults, then the profile, then a TOML file ([bench] and the run sections), then --set."""
    cfg, bench = Config(), BenchConfig()

    def put(key: str, value: Any, source: str) -> None:
        section, _, name = key.partition(".")
        if section == "bench":
            bench.set(name, value, source)
        else:
            cfg.set(key, value, source)

    if profile is not None:
        if profile not in PROFILES:
            raise FedqcError(f"unknown profile '{profile}'; use one of {', '.join(PROFILES)}")
        for key, value in PROFILES[profile].items():
            put(key, value, f"--{profile}")
    if path is not None:
        for key, value in toml_settings(path):
            put(key, value, str(Path(path)))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedqcError(f"--set {item!r}: expected key=value, e.g. --set bench.variants=5")
        put(key.strip(), value.strip(), "--set")
    return cfg, bench


def _floats(bench: BenchConfig, name: str, low: float, high: float) -> list[float]:
    return _floats_of(getattr(bench, name), f"bench.{name.replace('_', '-')}", low, high)


def _floats_of(text: str, key: str, low: float, high: float) -> list[float]:
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(low <= v <= high for v in values):
        raise FedqcError(f"{key} '{text}': a comma-separated list of numbers in [{low}, {high}]")
    return values
