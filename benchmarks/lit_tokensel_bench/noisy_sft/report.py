"""What people look at after a noisy-SFT benchmark run: tables, plots, a token view and the README section.

Pure functions of the runner's results; nothing here trains or reads a checkpoint. matplotlib (the
`bench` extra) is imported only by the plotting functions, so the table and the README update work
without it.

Data contract
=============

The runner writes two JSON documents; every number is a plain float (use None for "not measured",
never NaN, which is not valid JSON).

`results` (written back verbatim as `results.json`)::

    {
      "command": str,                 # the exact command line that produced the run (shown in the README)
      "settings": {...},              # free-form, echoed in results.md
      "rows": [row, ...]
    }

    row = {
      "regime": "scratch" | "pretrained",   # one table / one subplot per regime, in order of first appearance
      "method": str,                  # display name, unique within a regime, e.g. "Rho-1 (0.6)"
      "family": str,                  # e.g. "rho1": rows of one family share a colour in the plots
      "ratio": float | None,          # keep ratio, None for methods without one
      "seeds": [int, ...],            # seeds this row's statistics are over
      "gen_acc": stat,                # test accuracy, generation, as a fraction in [0, 1]
      "mc_acc": stat,                 # test accuracy, multiple choice, fraction in [0, 1]
      "nll": stat,                    # answer NLL (nats per answer token) on the test set
      "drop_corrupted": stat | None,  # fraction in [0, 1] of corrupted response tokens left out of the loss
      "drop_clean": stat | None,      # fraction in [0, 1] of clean response tokens left out of the loss
      "auc": stat | None,             # ROC AUC of the method's score at ranking clean tokens above corrupted
                                      # ones (1 = perfect, 0.5 = chance), at the end of training
      "auc_curve": [{"fraction": float, "auc": stat}, ...] | [],   # the same AUC during training,
                                      # fraction = share of training done, in [0, 1]; any order
      "step_time_ratio": float | None,    # median step time / full SFT's, measured in the same run
      "peak_memory_ratio": float | None,  # peak memory / full SFT's, measured in the same run
      "kind": "baseline" | "method" | "oracle" | "reference"
    }

    stat = {"mean": float, "std": float, "values": [float, ...]}
           # values: one per seed, in the order of the row's "seeds"; std: sample standard deviation
           # (statistics.stdev) over the values, 0 with one seed. A stat whose mean is None reads as missing.

Tables list baselines first, then methods, then oracle and reference rows; within a kind the runner's
order is kept.

`samples_by_regime` (one entry per regime, for the token view)::

    [{"regime": str,
      "samples": [{
          "sample_id": int,
          "prompt": str,
          "tokens": [str, ...],              # decoded response tokens, any characters (escaped here)
          "corrupted": [0 | 1, ...],         # per token, ground truth
          "kinds": [str | None, ...],        # per token: "filler", "wrong_answer", ... or None when clean
          "methods": {method_name: {
              "keep": [bool, ...],           # the token enters the loss (with a positive or negative weight)
              "score": [float | None, ...] | None,  # the method's ranking score, oriented so that higher
                                                    # means more likely kept; None where it has none
              "weight": [float, ...] | None, # per-token loss weight as used; negative = gradient ascent
          }, ...}}, ...]}, ...]

All per-token lists of a sample have len(tokens) entries; a mismatch is a ValueError naming the sample
and method.

Outputs (`write_outputs`): results.json, results.md, auc_curves.png, accuracy_vs_cost.png, tokens.html;
when given, the full tables into the benchmark page (docs/benchmarks.md) between
`<!-- noisy-sft-results:start -->` and `<!-- noisy-sft-results:end -->`, and a short summary (each method
at its default setting against full SFT) into the README between `<!-- noisy-sft-results-summary:start -->`
and `<!-- noisy-sft-results-summary:end -->`. Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

README_START = "<!-- noisy-sft-results:start -->"
README_END = "<!-- noisy-sft-results:end -->"
MISSING = "–"
KINDS = ("baseline", "method", "oracle", "reference")
"""Row kinds, in table order."""

_COLUMNS = (
    "Method",
    "Ratio",
    "Test acc (gen)",
    "Test acc (MC)",
    "Answer NLL",
    "Corrupted dropped",
    "Clean dropped",
    "Selection AUC",
    "Step time",
    "Peak mem",
)
_ALIGN = ("---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:")
_BOLD_KINDS = ("baseline", "method")
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = {"baseline": "s", "method": "o", "oracle": "*", "reference": "D"}


# ------------------------------------------------------------------------------------------ validation


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _has_mean(stat: dict | None) -> bool:
    return isinstance(stat, dict) and _finite(stat.get("mean"))


def _rows(results: dict) -> list[dict]:
    """The rows of `results`, checked for the fields that decide layout (regime, method, kind)."""
    rows = results.get("rows")
    if not isinstance(rows, list):
        raise ValueError("results['rows'] must be a list of rows")
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(rows):
        for key in ("regime", "method", "kind"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"results row {i}: {key!r} must be a string, got {row.get(key)!r}")
        if row["kind"] not in KINDS:
            raise ValueError(f"results row {i} ({row['method']}): kind {row['kind']!r} is not one of {KINDS}")
        if (row["regime"], row["method"]) in seen:
            raise ValueError(
                f"results row {i}: method {row['method']!r} appears twice in regime {row['regime']!r}"
            )
        seen.add((row["regime"], row["method"]))
    return rows


def _regimes(rows: Iterable[dict]) -> list[str]:
    return list(dict.fromkeys(row["regime"] for row in rows))


def _ordered(rows: Iterable[dict]) -> list[dict]:
    """Baselines, methods, oracles, references; the input order within a kind (sort is stable)."""
    return sorted(rows, key=lambda row: KINDS.index(row["kind"]))


def _regime_rows(rows: list[dict], regime: str) -> list[dict]:
    return _ordered(row for row in rows if row["regime"] == regime)


# -------------------------------------------------------------------------------------------- table


def format_stat(stat: dict | None, *, percent: bool = False, digits: int | None = None) -> str:
    """`mean ± std` of a stat (`62.5 ± 4.1%` with `percent`, fractions scaled by 100); `–` when missing.

    The `± std` part is left out when the stat has a single value (one seed).
    """
    if not _has_mean(stat):
        return MISSING
    digits = (1 if percent else 2) if digits is None else digits
    scale, suffix = (100.0, "%") if percent else (1.0, "")
    text = f"{stat['mean'] * scale:.{digits}f}"
    values = stat.get("values") or []
    std = stat.get("std")
    if len(values) != 1 and _finite(std):
        text += f" ± {std * scale:.{digits}f}"
    return text + suffix


def _format_ratio(x: Any) -> str:
    return f"{x:g}" if _finite(x) else MISSING


def _format_cost(x: Any) -> str:
    return f"{x:.2f}×" if _finite(x) else MISSING


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _best_mean(rows: list[dict], key: str, pick) -> float | None:
    means = [row[key]["mean"] for row in rows if row["kind"] in _BOLD_KINDS and _has_mean(row.get(key))]
    return pick(means) if len(means) >= 2 else None


def _is_best(row: dict, key: str, best: float | None) -> bool:
    return (
        best is not None
        and row["kind"] in _BOLD_KINDS
        and _has_mean(row.get(key))
        and row[key]["mean"] == best
    )


def _seeds_text(rows: list[dict]) -> str:
    counts = sorted({len(row.get("seeds") or []) for row in rows})
    seeds = sorted({s for row in rows for s in row.get("seeds") or []})
    listed = ", ".join(str(s) for s in seeds)
    if len(counts) == 1:
        n = counts[0]
        return f"{n} seed{'s' if n != 1 else ''} ({listed})" if n else "seeds not recorded"
    return f"{counts[0]}–{counts[-1]} seeds per row (seeds {listed})"


def results_table(results: dict) -> str:
    """Markdown: one table per regime (heading `#### <regime>`), each followed by a one-line legend."""
    rows = _rows(results)
    if not rows:
        return "_No results._\n"
    blocks = []
    for regime in _regimes(rows):
        rrows = _regime_rows(rows, regime)
        best_acc = _best_mean(rrows, "gen_acc", max)
        best_nll = _best_mean(rrows, "nll", min)
        lines = [f"#### {regime}", "", "| " + " | ".join(_COLUMNS) + " |", "|" + "|".join(_ALIGN) + "|"]
        bolded = False
        for row in rrows:
            acc = format_stat(row.get("gen_acc"), percent=True)
            nll = format_stat(row.get("nll"), digits=3)
            if _is_best(row, "gen_acc", best_acc):
                acc, bolded = f"**{acc}**", True
            if _is_best(row, "nll", best_nll):
                nll, bolded = f"**{nll}**", True
            cells = (
                row["method"],
                _format_ratio(row.get("ratio")),
                acc,
                format_stat(row.get("mc_acc"), percent=True),
                nll,
                format_stat(row.get("drop_corrupted"), percent=True),
                format_stat(row.get("drop_clean"), percent=True),
                format_stat(row.get("auc")),
                _format_cost(row.get("step_time_ratio")),
                _format_cost(row.get("peak_memory_ratio")),
            )
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        spread = (
            "; ± is the standard deviation over seeds"
            if any(len(r.get("seeds") or []) > 1 for r in rrows)
            else ""
        )
        legend = (
            f"{_seeds_text(rrows)}{spread}. Step time and peak memory are "
            "ratios to full SFT in the same run. Dropped: share of corrupted / clean response tokens left "
            "out of the loss. Selection AUC: clean ranked above corrupted, 0.5 = chance."
        )
        if bolded:
            legend += " Bold: best mean among baseline and method rows."
        lines += ["", f"_{legend}_"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


SUMMARY_RATIO = 0.6
"""Methods with a keep ratio appear in the summary at this one, the papers' default."""


def summary_table(results: dict) -> str:
    """Markdown: one row per baseline or method at its default setting (ratio 0.6 or none), one pair of
    columns (gen accuracy, answer NLL, each with its difference to full SFT) per regime."""
    rows = [
        row
        for row in _rows(results)
        if row["kind"] in _BOLD_KINDS and row.get("ratio") in (None, SUMMARY_RATIO)
    ]
    if not rows:
        return "_No results._\n"
    regimes = _regimes(rows)
    full = {row["regime"]: row for row in rows if row["kind"] == "baseline" and row.get("family") == "full"}
    methods = list(dict.fromkeys(row["method"] for row in _ordered(rows)))
    by_key = {(row["regime"], row["method"]): row for row in rows}
    header = ["Method"] + [f"{regime}: {what}" for regime in regimes for what in ("gen acc", "answer NLL")]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]

    def cell(row: dict | None, key: str, percent: bool) -> str:
        if row is None or not _has_mean(row.get(key)):
            return MISSING
        text = format_stat(row[key], percent=percent, digits=1 if percent else 2)
        base = full.get(row["regime"])
        if base is not None and base is not row and _has_mean(base.get(key)):
            delta = (row[key]["mean"] - base[key]["mean"]) * (100.0 if percent else 1.0)
            text += f" ({delta:+.1f})" if percent else f" ({delta:+.2f})"
        return text

    for method in methods:
        cells = [method]
        for regime in regimes:
            row = by_key.get((regime, method))
            cells += [cell(row, "gen_acc", True), cell(row, "nll", False)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    spread = (
        "; ± is the standard deviation over seeds" if any(len(r.get("seeds") or []) > 1 for r in rows) else ""
    )
    lines += [
        "",
        f"_{_seeds_text(rows)}{spread}; in brackets the difference to full SFT (accuracy in points, "
        "NLL in nats: lower is better)._",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ writing


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, then rename it over `path`: never a half-written file."""
    path = Path(path)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run in `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


WRITER = "benchmarks/lit_tokensel_bench/noisy_sft/report.py"


def readme_block(table_md: str, command: str, writer: str = WRITER) -> str:
    """What `update_readme` puts between the markers (markers excluded), with "\\n" line ends."""
    fence = _fence(command)
    return (
        f"<!-- Written by {writer}: edits between these markers are overwritten. -->\n"
        "Produced by:\n\n"
        f"{fence}bash\n{command.strip()}\n{fence}\n\n"
        f"{table_md.strip()}\n"
    )


def readme_markers(section: str = "noisy-sft-results") -> tuple[str, str]:
    """The start and end markers of a README section the benchmark writes."""
    return f"<!-- {section}:start -->", f"<!-- {section}:end -->"


def update_readme(
    readme: Path, table_md: str, command: str, section: str = "noisy-sft-results", writer: str = WRITER
) -> bool:
    """Replace the README text between the `section`'s markers (kept) with the command and table.

    Text outside the markers is left byte for byte. Raises ValueError naming the file when a marker is
    missing, repeated or out of order (the file is then untouched). Returns whether the file changed.
    """
    readme = Path(readme)
    raw = readme.read_bytes()
    text = raw.decode("utf-8")
    start_marker, end_marker = readme_markers(section)
    problems = []
    for marker in (start_marker, end_marker):
        if text.count(marker) != 1:
            problems.append(f"{marker!r} found {text.count(marker)} times, expected once")
    if problems:
        raise ValueError(f"{readme}: cannot update the {section} section: " + "; ".join(problems))
    start, end = text.index(start_marker), text.index(end_marker)
    if end < start:
        raise ValueError(f"{readme}: {end_marker!r} comes before {start_marker!r}")
    newline = "\r\n" if text.count("\r\n") * 2 > text.count("\n") else "\n"  # the file's usual line end
    block = readme_block(table_md, command, writer).replace("\n", newline)
    new = text[: start + len(start_marker)] + newline + block + text[end:]
    if new == text:
        return False
    atomic_write_text(readme, new)
    return True


# -------------------------------------------------------------------------------------------- plots


def _styles(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Colour per family (order of first appearance), line style per row within its family."""
    from matplotlib import colormaps

    ordered = _ordered(rows)
    families = list(dict.fromkeys(row.get("family") or row["method"] for row in ordered))
    if len(families) <= 10:
        palette = list(colormaps["tab10"].colors)
    else:  # tab20's dark shades first: neighbouring families get different hues, not a dark/light pair
        tab20 = list(colormaps["tab20"].colors)
        palette = tab20[0::2] + tab20[1::2]
    colours = {fam: palette[i % len(palette)] for i, fam in enumerate(families)}
    members: dict[str, list[str]] = {}
    styles: dict[str, dict[str, Any]] = {}
    for row in ordered:
        fam = row.get("family") or row["method"]
        names = members.setdefault(fam, [])
        if row["method"] not in names:
            names.append(row["method"])
        styles[row["method"]] = {
            "color": colours[fam],
            "linestyle": _LINESTYLES[names.index(row["method"]) % len(_LINESTYLES)],
            "marker": _MARKERS[row["kind"]],
        }
    return styles


def _new_figure(
    n_panels: int, height: float, legend_width: float = 0.0, panel_width: float = 5.0
) -> tuple[Figure, list]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_width * n_panels + legend_width, height), layout="constrained", dpi=110)
    axes = list(fig.subplots(1, n_panels, squeeze=False, sharey=True)[0])
    return fig, axes


def _save_png(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def auc_curves_figure(results: dict) -> Figure:
    """The Figure of `plot_auc_curves`: per regime, one line per row with an `auc_curve`, labelled with the
    method name (y = mean AUC, shaded ± std), and a dashed line at 0.5 labelled `chance`."""
    rows = _rows(results)
    regimes = _regimes(rows) or ["no results"]
    styles = _styles(rows)
    fig, axes = _new_figure(len(regimes), 5.0, legend_width=3.2)
    handles: dict[str, Any] = {}
    most = max(sum(bool(row.get("auc_curve")) for row in rows if row["regime"] == r) for r in regimes)
    band_alpha = 0.15 if most <= 6 else 0.07  # many overlapping bands: fainter, the lines stay readable
    for ax, regime in zip(axes, regimes):
        plotted = 0
        for row in _regime_rows(rows, regime):
            points = sorted(
                (p["fraction"], p["auc"])
                for p in row.get("auc_curve") or []
                if _finite(p.get("fraction")) and _has_mean(p.get("auc"))
            )
            if not points:
                continue
            x = [f for f, _ in points]
            mean = [s["mean"] for _, s in points]
            std = [s["std"] if _finite(s.get("std")) else 0.0 for _, s in points]
            style = styles[row["method"]]
            (line,) = ax.plot(
                x,
                mean,
                label=row["method"],
                color=style["color"],
                linestyle=style["linestyle"],
                marker=style["marker"],
                markersize=4,
                linewidth=1.6,
            )
            ax.fill_between(
                x,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=style["color"],
                alpha=band_alpha,
                linewidth=0,
            )
            handles.setdefault(row["method"], line)
            plotted += 1
        chance = ax.axhline(0.5, color="0.35", linestyle="--", linewidth=1.0, label="chance")
        handles.setdefault("chance", chance)
        if not plotted:
            ax.text(0.5, 0.6, "no selection curves", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_title(regime)
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of training")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("selection AUC (clean ranked above corrupted)")
    fig.suptitle("Selection AUC during training (mean ± std over seeds)")
    order = [row["method"] for row in _ordered(rows) if row["method"] in handles]
    order = list(dict.fromkeys(order)) + ["chance"]
    fig.legend([handles[name] for name in order], order, loc="outside center right", fontsize="small")
    return fig


def plot_auc_curves(results: dict, path: Path) -> Path:
    """PNG of the selection AUC against the fraction of training, one subplot per regime."""
    return _save_png(auc_curves_figure(results), path)


def accuracy_vs_cost_figure(results: dict) -> Figure:
    """The Figure of `plot_accuracy_vs_cost`: per regime, one errorbar container per row with a step time
    ratio and a gen accuracy, labelled with the method name (x = ratio, y = 100 * mean, yerr = 100 * std)."""
    rows = _rows(results)
    regimes = _regimes(rows) or ["no results"]
    styles = _styles(rows)
    shown = {
        regime: [
            row
            for row in _regime_rows(rows, regime)
            if _finite(row.get("step_time_ratio")) and _has_mean(row.get("gen_acc"))
        ]
        for regime in regimes
    }
    most = max(len(points) for points in shown.values())  # more names to place: larger panels
    fig, axes = _new_figure(len(regimes), 4.5 + 0.08 * most, panel_width=5.0 + 0.12 * most)
    for ax, regime in zip(axes, regimes):
        points = shown[regime]
        xs = [row["step_time_ratio"] for row in points] + [1.0]
        middle = (min(xs) + max(xs)) / 2
        for row in points:
            x, acc = row["step_time_ratio"], row["gen_acc"]
            y = 100.0 * acc["mean"]
            err = 100.0 * acc["std"] if _finite(acc.get("std")) else 0.0
            style = styles[row["method"]]
            ax.errorbar(
                [x],
                [y],
                yerr=[err],
                label=row["method"],
                color=style["color"],
                marker=style["marker"],
                markersize=6,
                capsize=3,
                linestyle="none",
            )
            # Names right of points in the left half, left of them in the right half: none runs off the axes.
            right = x > middle
            ax.annotate(
                row["method"],
                (x, y),
                xytext=(-6 if right else 6, 4),
                textcoords="offset points",
                ha="right" if right else "left",
                fontsize=7,
                color="0.15",
            )
        ax.axvline(1.0, color="0.6", linestyle=":", linewidth=1.0)
        if not points:
            ax.text(
                0.5, 0.5, "no rows with a step time ratio", transform=ax.transAxes, ha="center", color="0.4"
            )
        ax.set_title(regime)
        ax.set_xlabel("step time relative to full SFT (×)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.1)
    axes[0].set_ylabel("test accuracy, generation (%)")
    fig.suptitle("Accuracy against cost (mean ± std over seeds)")
    return fig


def plot_accuracy_vs_cost(results: dict, path: Path) -> Path:
    """PNG of gen test accuracy against step time ratio, one subplot per regime, points named."""
    return _save_png(accuracy_vs_cost_figure(results), path)


# ------------------------------------------------------------------------------------------ token view

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em 2em; color: #222;
       background: #fff; }
h1 { font-size: 1.5em; }
h2 { border-bottom: 2px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1em; margin: 0 0 .4em; }
nav a { margin-right: 1em; }
.legend { border: 1px solid #ddd; background: #fafafa; padding: .6em 1em; border-radius: 6px; }
.legend li { margin: .35em 0; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: .7em 1em; margin: 1em 0; }
.prompt { white-space: pre-wrap; background: #f3f3f3; padding: .4em .6em; border-radius: 4px;
          font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .88em; margin-bottom: .5em; }
.method { display: flex; gap: 1em; align-items: flex-start; padding: .3em 0; border-top: 1px dotted #ddd; }
.method .name { flex: 0 0 15em; font-weight: 600; font-size: .88em; }
.method .counts { display: block; font-weight: normal; color: #666; font-size: .9em; }
.toks { flex: 1; white-space: pre-wrap; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
        font-size: .88em; line-height: 2.1; }
.tok { border-radius: 2px; padding: 1px 0; }
.tok.kept { background: #dcdcdc; }
.tok.dropped { color: #9a9a9a; text-decoration: line-through; background: none; }
.tok.corrupted { border-bottom: 3px solid #e8590c; }
.tok.corrupted.kind-wrong_answer { border-bottom-color: #7048e8; }
.tok.negative { outline: 2px solid #e03131; outline-offset: -1px; }
.scale { display: inline-block; width: 9em; height: .9em; vertical-align: middle; border: 1px solid #bbb;
         background: linear-gradient(to right, hsl(210, 85%, 94%), hsl(210, 85%, 58%)); }
"""


def _score_colour(t: float) -> str:
    """Background of a kept token whose min-max scaled score is `t` in [0, 1]: light to saturated blue."""
    return f"hsl(210, 85%, {94 - 36 * t:.0f}%)"


def _check_len(values: Sequence | None, n: int, what: str, where: str) -> None:
    if values is not None and len(values) != n:
        raise ValueError(f"{where}: {what} has {len(values)} entries for {n} tokens")


def _token_text(token: str) -> str:
    """Escaped token text; a newline shows as `↵` before the line break."""
    return html.escape(token.replace("\n", "↵\n"), quote=False)


def _method_line(name: str, spec: dict, sample: dict, where: str) -> str:
    tokens, corrupted = sample["tokens"], sample["corrupted"]
    kinds = sample.get("kinds") or [None] * len(tokens)
    n = len(tokens)
    keep, scores, weights = spec.get("keep"), spec.get("score"), spec.get("weight")
    if keep is None:
        raise ValueError(f"{where}, method {name!r}: 'keep' is missing")
    for what, values in (("keep", keep), ("score", scores), ("weight", weights)):
        _check_len(values, n, what, f"{where}, method {name!r}")
    finite = [s for s in scores or [] if _finite(s)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    spans = []
    for i, token in enumerate(tokens):
        kept = bool(keep[i])
        score = scores[i] if scores is not None else None
        weight = weights[i] if weights is not None else None
        classes = ["tok", "kept" if kept else "dropped"]
        tip = []
        if corrupted[i]:
            classes.append("corrupted")
            kind = kinds[i]
            if kind:
                classes.append("kind-" + re.sub(r"[^A-Za-z0-9_-]", "_", str(kind)))
            tip.append(f"corrupted ({kind})" if kind else "corrupted")
        else:
            tip.append("clean")
        tip.append("kept" if kept else "dropped")
        tip.append(f"score {score:.4g}" if _finite(score) else "no score")
        if _finite(weight):
            tip.append(f"weight {weight:.4g}")
            if weight < 0:
                classes.append("negative")
        style = ""
        if kept and _finite(score):
            t = (score - lo) / (hi - lo) if hi > lo else 0.5
            style = f' style="background: {_score_colour(t)}"'
        spans.append(
            f'<span class="{" ".join(classes)}"{style} title="{html.escape(" · ".join(tip))}">'
            f"{_token_text(token)}</span>"
        )
    n_kept = sum(bool(k) for k in keep)
    n_corr = sum(bool(c) for c in corrupted)
    corr_dropped = sum(1 for k, c in zip(keep, corrupted) if c and not k)
    counts = f"kept {n_kept}/{n}"
    if n_corr:
        counts += f" · corrupted dropped {corr_dropped}/{n_corr}"
    n_neg = sum(1 for w in weights or [] if _finite(w) and w < 0)
    if n_neg:
        counts += f" · {n_neg} ascent"
    return (
        f'<div class="method" data-method="{html.escape(name)}">'
        f'<span class="name">{html.escape(name)}<span class="counts">{counts}</span></span>'
        f'<span class="toks">{"".join(spans)}</span></div>'
    )


_LEGEND = """<section class="legend"><strong>How to read this page.</strong> Each sample shows its prompt, then
one line per method with the response tokens as that method trains on them. Hover a token for its corruption
kind, score, keep decision and weight.
<ul>
<li><span class="tok kept" style="background: hsl(210, 85%, 94%)">kept</span>
<span class="scale"></span>
<span class="tok kept" style="background: hsl(210, 85%, 58%)">kept</span>
kept tokens, coloured by the method's score (min-max within the sample and method: light = lowest,
dark = highest); <span class="tok kept">grey</span> when the method has no score.</li>
<li><span class="tok dropped">dropped</span> dropped: left out of the loss.</li>
<li><span class="tok kept corrupted kind-filler">filler</span>
<span class="tok kept corrupted kind-wrong_answer">wrong answer</span>
corrupted tokens (ground truth), underlined by kind.</li>
<li><span class="tok kept negative">ascent</span> negative loss weight (unlearned, e.g. Forgetting).</li>
</ul></section>"""


def _regime_id(regime: str) -> str:
    return "regime-" + re.sub(r"[^A-Za-z0-9_-]", "_", regime)


def token_html(
    samples_by_regime: list[dict],
    path: Path,
    title: str = "Noisy SFT: which response tokens each method trains on",
) -> Path:
    """Write a self-contained static HTML page (inline CSS, no script, no external resources) showing,
    per regime and sample, each method's keep / score / weight decisions on the response tokens."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if len(samples_by_regime) > 1:
        links = " ".join(
            f'<a href="#{_regime_id(entry["regime"])}">{html.escape(entry["regime"])}</a>'
            for entry in samples_by_regime
        )
        parts.append(f"<nav>{links}</nav>")
    parts.append(_LEGEND)
    if not samples_by_regime:
        parts.append("<p>No samples.</p>")
    for entry in samples_by_regime:
        regime = entry["regime"]
        parts.append(
            f'<section class="regime" id="{_regime_id(regime)}" data-regime="{html.escape(regime)}">'
        )
        parts.append(f"<h2>{html.escape(regime)}</h2>")
        for sample in entry.get("samples") or []:
            sid = sample["sample_id"]
            where = f"regime {regime!r}, sample {sid}"
            n = len(sample["tokens"])
            _check_len(sample["corrupted"], n, "corrupted", where)
            _check_len(sample.get("kinds"), n, "kinds", where)
            parts.append(f'<div class="sample" data-sample-id="{html.escape(str(sid))}">')
            parts.append(f"<h3>Sample {html.escape(str(sid))}</h3>")
            parts.append(f'<div class="prompt">{html.escape(sample["prompt"], quote=False)}</div>')
            for name, spec in (sample.get("methods") or {}).items():
                parts.append(_method_line(name, spec, sample, where))
            parts.append("</div>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    path = Path(path)
    atomic_write_text(path, "\n".join(parts))
    return path


# ---------------------------------------------------------------------------------------------- all


def _results_md(results: dict, table_md: str) -> str:
    command = results.get("command", "")
    fence = _fence(command)
    settings = json.dumps(results.get("settings", {}), indent=2, sort_keys=True)
    return (
        "# Noisy SFT benchmark results\n\n"
        f"Produced by:\n\n{fence}bash\n{command}\n{fence}\n\n"
        f"{table_md.strip()}\n\n"
        "Plots: [selection AUC during training](auc_curves.png), [accuracy against cost](accuracy_vs_cost.png). "
        "Tokens each method keeps: [tokens.html](tokens.html).\n\n"
        f"## Settings\n\n```json\n{settings}\n```\n"
    )


def _with_plot_links(table_md: str, out_dir: Path, page: Path) -> str:
    """`table_md` followed by links to the plots and token page, relative to `page`'s folder."""
    try:
        rel = Path(os.path.relpath(out_dir.resolve(), page.resolve().parent)).as_posix()
    except ValueError:  # another drive on Windows
        return table_md
    return table_md.strip() + (
        f"\n\nPlots: [selection AUC during training]({rel}/auc_curves.png), "
        f"[accuracy against cost]({rel}/accuracy_vs_cost.png); "
        f"tokens each method keeps: [{rel}/tokens.html]({rel}/tokens.html).\n"
    )


def write_outputs(
    results: dict,
    samples_by_regime: list[dict],
    out_dir: Path,
    page: Path | None,
    section: str = "noisy-sft-results",
    summary_readme: Path | None = None,
) -> dict[str, Path]:
    """Write every output into `out_dir` (created if needed), the full tables into `page`'s `section`
    and the summary into `summary_readme`'s `<section>-summary`, each when given.

    Returns the written paths under the keys `results_json`, `results_md`, `auc_curves`,
    `accuracy_vs_cost`, `tokens_html` and, when written, `page` and `readme`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_md = results_table(results)
    paths = {
        "results_json": out_dir / "results.json",
        "results_md": out_dir / "results.md",
        "auc_curves": out_dir / "auc_curves.png",
        "accuracy_vs_cost": out_dir / "accuracy_vs_cost.png",
        "tokens_html": out_dir / "tokens.html",
    }
    atomic_write_text(paths["results_json"], json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(paths["results_md"], _results_md(results, table_md))
    plot_auc_curves(results, paths["auc_curves"])
    plot_accuracy_vs_cost(results, paths["accuracy_vs_cost"])
    token_html(samples_by_regime, paths["tokens_html"])
    command = results.get("command", "")
    if page is not None:
        page = Path(page)
        update_readme(page, _with_plot_links(table_md, out_dir, page), command, section)
        paths["page"] = page
    if summary_readme is not None:
        summary_readme = Path(summary_readme)
        update_readme(summary_readme, summary_table(results), command, f"{section}-summary")
        paths["readme"] = summary_readme
    return paths
