"""The noisy-SFT report: markdown table, README section, plots, token HTML (parsed, and rendered by Chromium)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from lit_tokensel_bench.noisy_sft import report

# ---------------------------------------------------------------------------------------------- inputs

COMMAND = "python -m lit_tokensel_bench.noisy_sft.run --out results/noisy_sft"


def _stat(*values: float) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": std, "values": list(values)}


def _curve(*points: tuple[float, tuple[float, ...]]) -> list[dict]:
    return [{"fraction": f, "auc": _stat(*v)} for f, v in points]


def _row(
    regime: str, method: str, family: str, kind: str, ratio: float | None = None, seeds=(0, 1), **kw
) -> dict:
    row = {
        "regime": regime,
        "method": method,
        "family": family,
        "ratio": ratio,
        "seeds": list(seeds),
        "kind": kind,
        "gen_acc": None,
        "mc_acc": None,
        "nll": None,
        "drop_corrupted": None,
        "drop_clean": None,
        "auc": None,
        "auc_curve": [],
        "step_time_ratio": None,
        "peak_memory_ratio": None,
    }
    row.update(kw)
    return row


ORACLE = "Oracle (drops exactly the corrupted tokens)"
REFERENCE = "Reference model alone"


def _results() -> dict:
    """Two regimes; rows deliberately out of table order; Forgetting lacks several values."""
    rows = []
    for regime, shift in (("scratch", 0.0), ("pretrained", 0.1)):
        rows.append(
            _row(
                regime,
                ORACLE,
                "oracle",
                "oracle",
                gen_acc=_stat(0.8 + shift, 0.82 + shift),
                mc_acc=_stat(0.9, 0.92),
                nll=_stat(1.0, 1.02),
                drop_corrupted=_stat(1.0, 1.0),
                drop_clean=_stat(0.0, 0.0),
                auc=_stat(1.0, 1.0),
                auc_curve=_curve((0.5, (1.0, 1.0)), (0.0, (1.0, 1.0)), (1.0, (1.0, 1.0))),
            )
        )
        rows.append(
            _row(
                regime,
                "Rho-1 (0.6)",
                "rho1",
                "method",
                0.6,
                gen_acc=_stat(0.6 + shift, 0.65 + shift),
                mc_acc=_stat(0.7, 0.8),
                nll=_stat(1.2, 1.4),
                drop_corrupted=_stat(0.5, 0.7),
                drop_clean=_stat(0.3, 0.3),
                auc=_stat(0.7, 0.8),
                auc_curve=_curve((1.0, (0.7, 0.8)), (0.0, (0.5, 0.52)), (0.5, (0.62, 0.7))),
                step_time_ratio=1.42,
                peak_memory_ratio=1.1,
            )
        )
        rows.append(
            _row(
                regime,
                "Full SFT",
                "full",
                "baseline",
                gen_acc=_stat(0.55 + shift, 0.57 + shift),
                mc_acc=_stat(0.6, 0.64),
                nll=_stat(1.5, 1.52),
                drop_corrupted=_stat(0.0, 0.0),
                drop_clean=_stat(0.0, 0.0),
                step_time_ratio=1.0,
                peak_memory_ratio=1.0,
            )
        )
        rows.append(
            _row(
                regime,
                "Forgetting (0.6)",
                "forgetting",
                "method",
                0.6,
                gen_acc=_stat(0.58 + shift, 0.6 + shift),
                mc_acc=_stat(0.66, 0.7),
                nll=_stat(1.24, 1.26),
                drop_corrupted=_stat(0.2, 0.3),
                auc_curve=_curve((0.0, (0.55, 0.6)), (1.0, (0.6, 0.7))) if regime == "pretrained" else [],
                step_time_ratio=1.05 if regime == "pretrained" else None,
            )
        )
    rows.append(
        _row(
            "pretrained",
            REFERENCE,
            "reference",
            "reference",
            seeds=(0,),
            gen_acc=_stat(0.71),
            mc_acc=_stat(0.75),
            nll=_stat(1.1),
        )
    )
    return {"command": COMMAND, "settings": {"seeds": [0, 1], "quick": False}, "rows": rows}


TOKENS = ["The", " answer", " is", " <b>", "42", " &amp;", "\n", "um", " so", ' "x<y"']
CORRUPTED = [0, 0, 0, 1, 1, 0, 0, 1, 1, 0]
KINDS = [None, None, None, "wrong_answer", "wrong_answer", None, None, "filler", "filler", None]
METHODS = {
    "Full SFT": {"keep": [True] * 10, "score": None, "weight": None},
    "Rho-1 (0.6)": {
        "keep": [True, True, False, False, True, True, False, False, False, True],
        "score": [0.9, 0.5, -0.2, -1.0, 0.1, 0.3, None, -0.5, -0.7, 1.2],
        "weight": None,
    },
    'Forgetting "γ" <0.6>': {
        "keep": [True] * 9 + [False],
        "score": [0.4, 0.3, 0.2, -0.9, -0.8, 0.1, 0.0, -0.6, -0.5, 0.6],
        "weight": [1.0, 1.0, 1.0, -0.25, -0.25, 1.0, 1.0, -0.25, -0.25, 0.0],
    },
}


def _sample(sample_id: int) -> dict:
    return {
        "sample_id": sample_id,
        "prompt": f"Q{sample_id}: what is 6*7? <tag> & more",
        "tokens": TOKENS,
        "corrupted": CORRUPTED,
        "kinds": KINDS,
        "methods": METHODS,
    }


def _samples() -> list[dict]:
    return [
        {"regime": "scratch", "samples": [_sample(3), _sample(17)]},
        {"regime": "pretrained", "samples": [_sample(5)]},
    ]


SAMPLE_IDS = {("scratch", "3"), ("scratch", "17"), ("pretrained", "5")}

# ----------------------------------------------------------------------------------------------- table


def _table_rows(md: str) -> dict[str, list[str]]:
    """Method names per regime heading, in table order."""
    out: dict[str, list[str]] = {}
    regime = None
    for line in md.splitlines():
        if line.startswith("#### "):
            regime = line[5:]
            out[regime] = []
        elif line.startswith("| ") and not line.startswith("| Method |"):
            out[regime].append(line.split(" | ")[0][2:])
    return out


def test_results_table_formats_stats_and_missing_values():
    md = report.results_table(_results())
    lines = md.splitlines()
    assert (
        "| Method | Ratio | Test acc (gen) | Test acc (MC) | Answer NLL | Corrupted dropped | Clean dropped "
        "| Selection AUC | Step time | Peak mem |" in lines
    )
    # Best gen accuracy among baseline/method rows is bold (the oracle's higher one is not).
    assert (
        "| Rho-1 (0.6) | 0.6 | **62.5 ± 3.5%** | 75.0 ± 7.1% | 1.300 ± 0.141 | 60.0 ± 14.1% | 30.0 ± 0.0% "
        "| 0.75 ± 0.07 | 1.42× | 1.10× |"
    ) in lines
    # Missing values are dashes; the lowest NLL among baseline/method rows is bold.
    assert (
        "| Forgetting (0.6) | 0.6 | 59.0 ± 1.4% | 68.0 ± 2.8% | **1.250 ± 0.014** | 25.0 ± 7.1% | – | – "
        "| – | – |"
    ) in lines
    assert (
        "| Oracle (drops exactly the corrupted tokens) | – | 81.0 ± 1.4% | 91.0 ± 1.4% | 1.010 ± 0.014 "
        "| 100.0 ± 0.0% | 0.0 ± 0.0% | 1.00 ± 0.00 | – | – |"
    ) in lines
    # One seed: no "± 0".
    assert f"| {REFERENCE} | – | 71.0% | 75.0% | 1.100 | – | – | – | – | – |" in lines
    legends = [line for line in lines if line.startswith("_") and line.endswith("_")]
    assert len(legends) == 2
    assert legends[0].startswith("_2 seeds (0, 1); ± is the standard deviation over seeds.")
    assert legends[1].startswith("_1–2 seeds per row (seeds 0, 1);")
    assert all("ratios to full SFT in the same run" in legend for legend in legends)


def test_results_table_legend_of_a_one_seed_run_mentions_no_spread():
    results = _results()
    results["rows"] = [dict(row, seeds=[0]) for row in results["rows"]]
    legends = [line for line in report.results_table(results).splitlines() if line.startswith("_")]
    assert legends and all(legend.startswith("_1 seed (0). Step time") for legend in legends)


def test_results_table_orders_rows_baseline_methods_oracle_reference():
    assert _table_rows(report.results_table(_results())) == {
        "scratch": ["Full SFT", "Rho-1 (0.6)", "Forgetting (0.6)", ORACLE],
        "pretrained": ["Full SFT", "Rho-1 (0.6)", "Forgetting (0.6)", ORACLE, REFERENCE],
    }


def test_results_table_rejects_unknown_kind():
    results = _results()
    results["rows"][0]["kind"] = "baselines"
    with pytest.raises(ValueError, match="kind 'baselines'"):
        report.results_table(results)


# ---------------------------------------------------------------------------------------------- README

BEFORE = "# Project\r\n\nIntro ünïcode, trailing spaces   \n\n## Results\n\n"
AFTER = "\n\n## After\nlast line without newline"


def _readme(tmp_path: Path, middle: str = "\nold table\n") -> Path:
    path = tmp_path / "README.md"
    path.write_bytes((BEFORE + report.README_START + middle + report.README_END + AFTER).encode())
    return path


def test_update_readme_replaces_only_between_markers_and_is_idempotent(tmp_path):
    readme = _readme(tmp_path)
    table = report.results_table(_results())
    assert report.update_readme(readme, table, COMMAND) is True
    raw = readme.read_bytes()
    head = (BEFORE + report.README_START).encode()
    tail = (report.README_END + AFTER).encode()
    assert raw.startswith(head) and raw.endswith(tail)
    middle = raw[len(head) : -len(tail)].decode()
    assert "old table" not in middle
    assert f"```bash\n{COMMAND}\n```" in middle
    assert table.strip() in middle
    assert report.update_readme(readme, table, COMMAND) is False
    assert readme.read_bytes() == raw
    assert report.update_readme(readme, table, COMMAND + " --quick") is True


def test_update_readme_keeps_crlf_line_ends(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_bytes(f"# CRLF\r\n{report.README_START}\r\n{report.README_END}\r\ntail\r\n".encode())
    assert report.update_readme(readme, "| a |\n|---|\n| 1 |\n", COMMAND) is True
    raw = readme.read_bytes()
    assert raw.count(b"\n") == raw.count(b"\r\n") and b"| 1 |\r\n" in raw
    assert report.update_readme(readme, "| a |\n|---|\n| 1 |\n", COMMAND) is False


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        f"{report.README_START}\nonly the start\n",
        f"only the end\n{report.README_END}\n",
        f"{report.README_END}\nout of order\n{report.README_START}\n",
        f"{report.README_START}\n{report.README_START}\ntwice\n{report.README_END}\n",
    ],
)
def test_update_readme_bad_markers_raise_and_leave_readme(tmp_path, text):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(ValueError, match=str(readme)):
        report.update_readme(readme, "| table |", COMMAND)
    assert readme.read_text() == text


def test_update_readme_interrupted_write_keeps_readme(tmp_path, monkeypatch):
    readme = _readme(tmp_path)
    before = readme.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        report.update_readme(readme, "| table |", COMMAND)
    assert readme.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temp file left behind


# ----------------------------------------------------------------------------------------------- plots


def _axes_by_title(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes}


def test_auc_curves_figure_plots_each_curve_sorted_by_fraction():
    results = _results()
    fig = report.auc_curves_figure(results)
    axes = _axes_by_title(fig)
    order = {"scratch": ["Rho-1 (0.6)", ORACLE], "pretrained": ["Rho-1 (0.6)", "Forgetting (0.6)", ORACLE]}
    assert list(axes) == ["scratch", "pretrained"]
    for regime, ax in axes.items():
        expected = {
            row["method"]: row["auc_curve"]
            for row in results["rows"]
            if row["regime"] == regime and row["auc_curve"]
        }
        lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() != "chance"}
        assert list(lines) == order[regime]  # table order; rows without a curve left out
        for method, curve in expected.items():
            points = sorted((p["fraction"], p["auc"]["mean"]) for p in curve)
            np.testing.assert_allclose(lines[method].get_xdata(), [f for f, _ in points])
            np.testing.assert_allclose(lines[method].get_ydata(), [m for _, m in points])
        chance = [line for line in ax.get_lines() if line.get_label() == "chance"]
        assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.5, 0.5]
        assert len(ax.collections) == len(expected)  # one ± std band per curve
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["Rho-1 (0.6)", "Forgetting (0.6)", ORACLE, "chance"]


def test_accuracy_vs_cost_figure_plots_rows_with_a_step_time():
    results = _results()
    axes = _axes_by_title(report.accuracy_vs_cost_figure(results))
    expected_methods = {
        "scratch": ["Full SFT", "Rho-1 (0.6)"],
        "pretrained": ["Full SFT", "Rho-1 (0.6)", "Forgetting (0.6)"],
    }
    for regime, ax in axes.items():
        assert [c.get_label() for c in ax.containers] == expected_methods[regime]
        assert [t.get_text() for t in ax.texts] == expected_methods[regime]
        rows = {row["method"]: row for row in results["rows"] if row["regime"] == regime}
        for container in ax.containers:
            row = rows[container.get_label()]
            x, mean, std = row["step_time_ratio"], 100 * row["gen_acc"]["mean"], 100 * row["gen_acc"]["std"]
            np.testing.assert_allclose(container.lines[0].get_xydata(), [[x, mean]])
            (segment,) = container.lines[2][0].get_segments()
            np.testing.assert_allclose(segment, [[x, mean - std], [x, mean + std]])


def test_plots_write_valid_pngs(tmp_path):
    for plot in (report.plot_auc_curves, report.plot_accuracy_vs_cost):
        path = plot(_results(), tmp_path / f"{plot.__name__}.png")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 5_000
        assert matplotlib.image.imread(path).std() > 0.05  # not a blank image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot_accuracy_vs_cost.png", "plot_auc_curves.png"]


# ------------------------------------------------------------------------------------------------ HTML


class _TokenParser(HTMLParser):
    """Token spans per (regime, sample id, method line), and every tag name seen."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open: list[tuple[str, dict]] = []  # open <section>/<div> elements
        self.token: dict | None = None
        self.lines: dict[tuple[str, str, str], list[dict]] = {}
        self.tags: set[str] = set()

    def _enclosing(self, cls: str, attr: str) -> str | None:
        for _, attrs in reversed(self.open):
            if cls in (attrs.get("class") or "").split():
                return attrs.get(attr)
        return None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag in ("div", "section"):
            self.open.append((tag, attrs))
        elif tag == "span" and "tok" in (attrs.get("class") or "").split():
            key = (
                self._enclosing("regime", "data-regime"),
                self._enclosing("sample", "data-sample-id"),
                self._enclosing("method", "data-method"),
            )
            if None not in key:
                self.token = {
                    "classes": set(attrs["class"].split()),
                    "text": "",
                    "title": attrs.get("title"),
                    "style": attrs.get("style"),
                }
                self.lines.setdefault(key, []).append(self.token)

    def handle_endtag(self, tag):
        if tag in ("div", "section"):
            assert self.open.pop()[0] == tag
        elif tag == "span":
            self.token = None

    def handle_data(self, data):
        if self.token is not None:
            self.token["text"] += data


def _parse(text: str) -> _TokenParser:
    parser = _TokenParser()
    parser.feed(text)
    parser.close()
    return parser


def _assert_token_lines(parser: _TokenParser) -> None:
    assert set(parser.lines) == {(r, s, m) for r, s in SAMPLE_IDS for m in METHODS}
    for (_, _, method), spans in parser.lines.items():
        spec = METHODS[method]
        assert [t["text"] for t in spans] == [tok.replace("\n", "↵\n") for tok in TOKENS]
        for i, token in enumerate(spans):
            keep, corrupted = spec["keep"][i], CORRUPTED[i]
            weight = spec["weight"][i] if spec["weight"] else None
            assert ("kept" in token["classes"]) == keep and ("dropped" in token["classes"]) == (not keep)
            assert ("corrupted" in token["classes"]) == bool(corrupted)
            assert ("negative" in token["classes"]) == (weight is not None and weight < 0)
            if corrupted:
                assert f"kind-{KINDS[i]}" in token["classes"]
                assert f"corrupted ({KINDS[i]})" in token["title"]
            assert ("kept" if keep else "dropped") in token["title"]
            score = spec["score"][i] if spec["score"] else None
            # Score colour only on kept tokens that have a score.
            assert (token["style"] is not None) == (keep and score is not None)
        kept = [t for t in spans if "kept" in t["classes"]]
        assert len(kept) == sum(spec["keep"])
        assert sum("corrupted" in t["classes"] for t in spans) == sum(CORRUPTED)


def test_token_html_spans_match_inputs_and_escape_text(tmp_path):
    path = report.token_html(_samples(), tmp_path / "tokens.html", title="Tokens <&>")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "&lt;b&gt;" in text and "&amp;amp;" in text and "&lt;tag&gt; &amp; more" in text
    assert 'data-method="Forgetting &quot;γ&quot; &lt;0.6&gt;"' in text
    assert "<title>Tokens &lt;&amp;&gt;</title>" in text
    assert "<script" not in text and "http" not in text and "src=" not in text  # self-contained
    parser = _parse(text)
    assert not parser.tags & {"b", "tag", "y"}  # token and prompt text never became markup
    _assert_token_lines(parser)
    # Darkest colour on the highest score, lightest on the lowest kept one (min-max per sample and method).
    rho = parser.lines[("scratch", "3", "Rho-1 (0.6)")]
    assert rho[9]["style"] == "background: hsl(210, 85%, 58%)"  # score 1.2, the maximum
    assert rho[1]["style"] == "background: hsl(210, 85%, 69%)"  # score 0.5: 94 - 36 * (0.5 + 1) / 2.2
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.html"]


def test_token_html_rejects_length_mismatch(tmp_path):
    samples = _samples()
    samples[1]["samples"][0] = {
        **_sample(5),
        "methods": {"Bad": {"keep": [True] * 9, "score": None, "weight": None}},
    }
    with pytest.raises(
        ValueError, match="regime 'pretrained', sample 5, method 'Bad': keep has 9 entries for 10"
    ):
        report.token_html(samples, tmp_path / "tokens.html")


def _chromium() -> str:
    """Debian's Chromium. Missing: a skip on a developer machine, a failure where the browser is required
    (`.ci/run` installs it and sets LIT_TOKENSEL_REQUIRE_BROWSER=1)."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        message = (
            "Chromium is needed to check that the token HTML renders: install it with "
            "`apt-get install -y chromium` (Debian/Ubuntu)"
        )
        if os.environ.get("LIT_TOKENSEL_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_token_html_renders_in_headless_chromium(tmp_path):
    chromium = _chromium()
    page = report.token_html(_samples(), tmp_path / "tokens.html")
    base = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = page.resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'class="sample"' in dom.stdout
    for _, sample_id in SAMPLE_IDS:
        assert f'data-sample-id="{sample_id}"' in dom.stdout
    _assert_token_lines(_parse(dom.stdout))  # the browser's DOM has every method line and token as written

    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,2000", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.05  # not blank
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, score colours, underlines


# ------------------------------------------------------------------------------------------ everything


def test_write_outputs_writes_every_file_the_page_and_the_readme_summary(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "benchmarks.md"
    page.write_bytes(_readme(tmp_path).read_bytes())
    readme = tmp_path / "README.md"
    start, end = report.readme_markers("noisy-sft-results-summary")
    readme.write_bytes((BEFORE + start + "\nold summary\n" + end + AFTER).encode())
    out = tmp_path / "benchmarks" / "results" / "noisy_sft"
    results = _results()
    paths = report.write_outputs(results, _samples(), out, page, summary_readme=readme)
    assert paths == {
        "results_json": out / "results.json",
        "results_md": out / "results.md",
        "auc_curves": out / "auc_curves.png",
        "accuracy_vs_cost": out / "accuracy_vs_cost.png",
        "tokens_html": out / "tokens.html",
        "page": page,
        "readme": readme,
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in paths.values() if p not in (page, readme)
    )
    assert json.loads(paths["results_json"].read_text()) == results
    md = paths["results_md"].read_text()
    assert report.results_table(results).strip() in md and COMMAND in md
    text = page.read_text()
    assert report.results_table(results).strip() in text
    # links to the plots, relative to the page's folder
    assert "(../benchmarks/results/noisy_sft/auc_curves.png)" in text
    summary = readme.read_bytes().decode()
    assert report.summary_table(results).strip() in summary and "old summary" not in summary
    assert summary.startswith(BEFORE) and summary.endswith(AFTER)
    before = page.read_bytes(), readme.read_bytes()
    report.write_outputs(results, _samples(), out, page, summary_readme=readme)
    assert (page.read_bytes(), readme.read_bytes()) == before
    assert report.write_outputs(results, _samples(), tmp_path / "elsewhere", None)["tokens_html"].exists()


def test_summary_table_keeps_default_settings_and_shows_the_difference_to_full_sft():
    results = _results()
    results["rows"].append(_row("scratch", "Rho-1 (0.8)", "rho1", "method", 0.8, gen_acc=_stat(0.9, 0.9)))
    table = report.summary_table(results)
    lines = table.splitlines()
    assert lines[0] == (
        "| Method | scratch: gen acc | scratch: answer NLL | pretrained: gen acc | pretrained: answer NLL |"
    )
    assert "Rho-1 (0.8)" not in table  # sweeps stay in the full table
    assert ORACLE not in table and REFERENCE not in table
    full = next(line for line in lines if line.startswith("| Full SFT |"))
    assert full == "| Full SFT | 56.0 ± 1.4% | 1.51 ± 0.01 | 66.0 ± 1.4% | 1.51 ± 0.01 |"
    rho = next(line for line in lines if line.startswith("| Rho-1 (0.6) |"))
    # Rho-1: gen 62.5% vs 56.0% in scratch (+6.5 points), NLL 1.30 vs 1.51 (-0.21)
    assert rho.split(" | ")[1:3] == ["62.5 ± 3.5% (+6.5)", "1.30 ± 0.14 (-0.21)"]
