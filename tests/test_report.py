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


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every figure the plots save, kept for its content (the PNG is still written)."""
    kept = []
    real = plots._save

    def save(fig, path):
        kept.append(fig)
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return kept


def _edges(bars) -> list[float]:
    """A histogram's bin edges, from its bars."""
    return [p.get_x() for p in bars] + [bars[-1].get_x() + bars[-1].get_width()]


def _heights(bars) -> list[float]:
    return [p.get_height() for p in bars]


@pytest.mark.parametrize("scale", [1.0, 1000.0])  # the second spans decades: log axis
def test_score_histograms(tmp_path, scale, figures):
    rng = np.random.default_rng(0)
    scores = [np.exp(rng.normal(size=30)) * scale, np.array([np.nan, 1.0, 2.0])]
    clean = [rng.random(30) > 0.3, np.array([True, False, True])]
    taus = {"a": [1.0, None], "b": [2.0, 2.0]}
    path = plots.score_histograms(tmp_path / "h.png", "t", scores, clean, taus, "ppl")
    assert _is_png(path)
    (fig,) = figures
    axes = fig.axes
    assert len(axes) == 2
    for c, ax in enumerate(axes):
        s, flags = scores[c], clean[c]
        ok = np.isfinite(s)
        good, bad = ax.containers  # one histogram of clean scores, then one of corrupted
        edges = _edges(good)
        assert _edges(bad) == edges
        assert edges[0] <= np.nanmin(np.concatenate(scores))
        assert edges[-1] >= np.nanmax(np.concatenate(scores)) * (1 - 1e-9)
        assert _heights(good) == np.histogram(s[ok & flags], edges)[0].tolist()
        assert _heights(bad) == np.histogram(s[ok & ~flags], edges)[0].tolist()
        lines = {line.get_label(): list(line.get_xdata()) for line in ax.lines}
        want = {f"τ {k}": [v[c], v[c]] for k, v in taus.items() if v[c] is not None}
        assert lines == want
        assert ax.get_legend_handles_labels()[1] == ["clean", "corrupted", *want]
        assert ax.get_title() == f"client {c} ({int((~flags).sum())}/{len(flags)} corrupted)"
        assert ax.get_xscale() == ("log" if scale > 1 else "linear")


ROWS = [  # y differs by scorer, rule and x; the rows are not in x order
    {"scorer": s, "rule": r, "x": x, "y": 10 * i + 3 * k + x, "sd": 0.1 * (1 + k + i)}
    for i, s in enumerate(("ppl", "ifd"))
    for k, r in enumerate(("mean", "q"))
    for x in (0.8, 0.2, 0.5)
]


def _series(scorer: str, rule: str, key: str) -> list[float]:
    """One line's values in x order, from ROWS."""
    mine = sorted(
        (r for r in ROWS if r["scorer"] == scorer and r["rule"] == rule), key=lambda r: r["x"]
    )
    return [r[key] for r in mine]


@pytest.mark.parametrize("err", [None, "sd"])
def test_panels_by_draws_each_rules_series_in_its_scorers_panel(tmp_path, figures, err):
    assert _is_png(plots.panels_by(tmp_path / "a.png", ROWS, "x", "y", title="t", err=err))
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["ppl", "ifd"]
    for ax, scorer in zip(fig.axes, ("ppl", "ifd"), strict=True):
        if err:  # errorbar: the data line is the first of each container's artists
            lines = {c.get_label(): c.lines[0] for c in ax.containers}
        else:
            lines = {line.get_label(): line for line in ax.lines}
        assert sorted(lines) == ["mean", "q"]
        for rule, line in lines.items():
            assert list(line.get_xdata()) == _series(scorer, rule, "x")
            assert list(line.get_ydata()) == _series(scorer, rule, "y")
        if err:
            bars = [c for c in ax.containers if c.has_yerr]
            assert [c.get_label() for c in bars] == ["mean", "q"]
            for bar in bars:
                (segments,) = [col.get_segments() for col in bar.lines[2]]
                y, sd = (
                    _series(scorer, bar.get_label(), "y"),
                    _series(scorer, bar.get_label(), "sd"),
                )
                low, high = [s[0][1] for s in segments], [s[1][1] for s in segments]
                np.testing.assert_allclose(low, np.subtract(y, sd))
                np.testing.assert_allclose(high, np.add(y, sd))


def test_grouped_bars_draw_each_value_in_its_group_and_panel(tmp_path, figures):
    assert _is_png(plots.grouped_bars(tmp_path / "c.png", ROWS, "y", title="t", group="x"))
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["mean", "q"]  # panel: rule
    for ax, rule in zip(fig.axes, ("mean", "q"), strict=True):
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.8", "0.2", "0.5"]  # groups
        bars = list(ax.containers)
        assert [b.get_label() for b in bars] == ["ppl", "ifd"]  # a bar per scorer
        for bar in bars:
            want = [
                next(
                    r["y"]
                    for r in ROWS
                    if (r["rule"], r["scorer"], r["x"]) == (rule, bar.get_label(), x)
                )
                for x in (0.8, 0.2, 0.5)
            ]
            assert _heights(bar) == want


def test_eval_bands_draw_the_mean_over_seeds_per_round(tmp_path, figures):
    histories = {
        "mixed": {
            0: [{"round": 0, "eval_loss": 2.0}, {"round": 1, "eval_loss": 1.5}],
            1: [{"round": 0, "eval_loss": 2.2}, {"round": 1, "eval_loss": 1.1}],
        },
        "oracle": {0: [{"round": 0, "eval_loss": 2.0}, {"round": 1, "eval_loss": 0.9}]},
    }
    assert _is_png(plots.eval_bands(tmp_path / "d.png", histories, "t"))
    (fig,) = figures
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert list(lines) == ["mixed", "oracle"]
    assert list(lines["mixed"].get_xdata()) == [0, 1]
    np.testing.assert_allclose(lines["mixed"].get_ydata(), [2.1, 1.3])
    np.testing.assert_allclose(lines["oracle"].get_ydata(), [2.0, 0.9])


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
