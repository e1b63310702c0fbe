"""Tables, plots and the self-contained HTML report."""

from __future__ import annotations

import base64
import csv
import math
import re

import numpy as np
import pytest

from fedqc.report import html as H
from fedqc.report import plots
from fedqc.report.tables import fmt, html_table, markdown_table, write_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "value, text",
    [
        (None, "–"),
        (math.nan, "–"),
        (0.123456, "0.123"),
        (48830.2, "4.883e+04"),
        (3.2e-5, "3.2e-05"),  # TracIn-sized: not 0.000
        (-0.0004567, "-0.0004567"),
        (0.0, "0.000"),
        (3, "3"),
        (True, "yes"),
        ("ppl/anchor-mean", "ppl/anchor-mean"),
        ("", ""),
    ],
)
def test_fmt(value, text):
    assert fmt(value) == text


def test_markdown_and_html_tables():
    rows = [{"arm": "a<b", "f1": 0.5}, {"arm": "c", "f1": None}]
    columns = [("arm", "arm"), ("f1", "F1")]
    assert markdown_table(rows, columns) == "| arm | F1 |\n|---|---|\n| a<b | 0.500 |\n| c | – |\n"
    page = html_table(rows, columns)
    assert "<td>a&lt;b</td><td>0.500</td>" in page and page.count("<tr>") == 3


def test_csv_keeps_every_key_and_blanks_what_is_missing(tmp_path):
    write_csv(tmp_path / "r.csv", [{"a": 1, "b": math.nan}, {"a": 2, "c": "x"}])
    with open(tmp_path / "r.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"a": "1", "b": "", "c": ""}, {"a": "2", "b": "", "c": "x"}]


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("scale", [1.0, 1000.0])  # the second spans decades: log axis
def test_score_histograms(tmp_path, scale):
    rng = np.random.default_rng(0)
    scores = [np.exp(rng.normal(size=30)) * scale, np.array([np.nan, 1.0, 2.0])]
    clean = [rng.random(30) > 0.3, np.array([True, False, True])]
    path = plots.score_histograms(
        tmp_path / "h.png", "t", scores, clean, {"a": [1.0, None], "b": [2.0, 2.0]}, "ppl"
    )
    assert _is_png(path)


def test_line_bar_and_curve_plots(tmp_path):
    rows = [
        {"scorer": s, "rule": r, "x": x, "y": x * k, "sd": 0.1}
        for s in ("ppl", "ifd")
        for k, r in enumerate(("mean", "q"))
        for x in (0.2, 0.5, 0.8)
    ]
    assert _is_png(plots.panels_by(tmp_path / "a.png", rows, "x", "y", title="t"))
    assert _is_png(plots.panels_by(tmp_path / "b.png", rows, "x", "y", title="t", err="sd"))
    assert _is_png(plots.grouped_bars(tmp_path / "c.png", rows, "y", title="t", group="x"))
    histories = {"mixed": {0: [{"round": 0, "eval_loss": 2.0}, {"round": 1, "eval_loss": 1.5}]}}
    assert _is_png(plots.eval_bands(tmp_path / "d.png", histories, "t"))


def test_report_is_one_file_with_the_images_inside(tmp_path):
    png = plots.eval_bands(tmp_path / "p.png", {"a": {0: [{"round": 0, "eval_loss": 1.0}]}}, "t")
    page = H.write_report(
        tmp_path / "report.html",
        "title <1>",
        [
            H.heading("s"),
            H.paragraph("x & y"),
            H.table([{"k": 1}], [("k", "K")]),
            H.image(png, "p"),
        ],
    ).read_text()
    assert "<title>title &lt;1&gt;</title>" in page and "x &amp; y" in page
    (data,) = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert base64.b64decode(data) == png.read_bytes()


def test_seed_band_over_the_rounds_every_seed_reached():
    seeds = {
        0: [{"round": 0, "eval_loss": 2.0}, {"round": 1, "eval_loss": 1.0}],
        1: [{"round": 0, "eval_loss": 2.0}, {"round": 1, "eval_loss": 1.4}, {"round": 2}],
        2: [{"round": 0, "eval_loss": 2.0}, {"round": 1, "eval_loss": 1.6}],
    }
    band = plots.seed_band(seeds)
    assert band.rounds == [0, 1]
    assert band.mean == pytest.approx([2.0, 4.0 / 3])
    assert band.sd == pytest.approx(
        [0.0, math.sqrt(((1 - 4 / 3) ** 2 + (1.4 - 4 / 3) ** 2 + (1.6 - 4 / 3) ** 2) / 2)]
    )
    assert (band.low, band.high) == ([2.0, 1.0], [2.0, 1.6])
    one = plots.seed_band({5: seeds[0]})
    assert one.mean == [2.0, 1.0] and all(math.isnan(v) for v in one.sd)


def test_eval_bands_shades_the_seed_range(tmp_path, monkeypatch):
    shaded = []
    real = plots.plt.Axes.fill_between
    monkeypatch.setattr(
        plots.plt.Axes,
        "fill_between",
        lambda ax, x, lo, hi, **kw: shaded.append((list(x), lo, hi)) or real(ax, x, lo, hi, **kw),
    )
    two = {0: [{"round": 0, "eval_loss": 2.0}], 1: [{"round": 0, "eval_loss": 1.0}]}
    plots.eval_bands(tmp_path / "b.png", {"mixed": two, "oracle": {0: two[0]}}, "t")
    assert shaded == [([0], [1.0], [2.0])]  # one band: the arm with two seeds
