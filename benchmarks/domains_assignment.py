"""How well the scoring model's hidden states find a sample's source, from a few anchors each.

For each heterogeneity source of the bench (``fedqc.data.catalog``), draw ``--anchors`` anchors
and ``--samples`` other samples; embed all with the scoring model (:mod:`fedqc.models.embedding`);
assign each non-anchor sample to the nearest source centroid (labels known: one domain per
source) and print the share assigned to its true source, the share judged like no anchor, and
what :func:`fedqc.quality.domains.group_anchors` makes of the same anchors without labels.

    PYTHONPATH=src python benchmarks/domains_assignment.py --anchors 5 --samples 10
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedqc.config import ModelConfig
from fedqc.data.catalog import load_source
from fedqc.models.embedding import DEFAULT_LAYER, embed_samples
from fedqc.models.loading import load
from fedqc.quality.domains import OOD_MARGIN, assign, centroids, group_anchors, ood_bounds

SOURCES = ("gsm8k", "gpqa", "humaneval", "mgsm-symbolic:deu", "mgsm-symbolic:rus")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--anchors", type=int, default=5, help="anchors per source")
    p.add_argument("--samples", type=int, default=10, help="assigned samples per source")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--layer", type=int, default=DEFAULT_LAYER)
    p.add_argument("--margin", type=float, default=OOD_MARGIN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sources = args.sources.split(",")
    rng = np.random.default_rng(args.seed)
    samples, source, is_anchor = [], [], []
    for i, name in enumerate(sources):
        pool = load_source(name)
        take = rng.choice(len(pool), args.anchors + args.samples, replace=False)
        samples += [pool[j] for j in take]
        source += [i] * len(take)
        is_anchor += [True] * args.anchors + [False] * args.samples
    source, is_anchor = np.array(source), np.array(is_anchor)
    loaded = load(ModelConfig(name=args.model, max_length=args.max_length))
    start = time.perf_counter()
    emb = embed_samples(loaded, samples, max_length=args.max_length, layer=args.layer)
    took = time.perf_counter() - start
    a, s = is_anchor, ~is_anchor
    c = centroids(emb[a], source[a], len(sources))
    bounds = ood_bounds(emb[a], source[a], len(sources), args.margin)
    nearest, dist = assign(emb[s], c)
    right, out = nearest == source[s], dist > bounds[nearest]
    print(
        f"{args.model}, layer {args.layer}, max {args.max_length} tokens, seed {args.seed}: "
        f"{args.anchors} anchors + {args.samples} samples per source; "
        f"embedding {len(samples)} samples took {took:.0f} s"
    )
    print(f"{'source':<22} {'to own centroid':>16} {'like no anchor':>15}")
    for i, name in enumerate(sources):
        rows = source[s] == i
        print(f"{name:<22} {right[rows].mean():>16.2f} {out[rows].mean():>15.2f}")
    print(f"{'all':<22} {right.mean():>16.2f} {out.mean():>15.2f}")
    grouping = group_anchors(emb[a])
    pairs = sorted(set(zip(grouping.labels.tolist(), source[a].tolist(), strict=True)))
    print(f"without labels: {grouping.reason}")
    print(
        "  group <- sources: "
        + "; ".join(
            f"{grouping.names[g]} <- {', '.join(sources[j] for gg, j in pairs if gg == g)}"
            for g in range(grouping.num_domains)
        )
    )


if __name__ == "__main__":
    main()
