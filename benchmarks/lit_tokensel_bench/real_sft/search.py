"""The search beyond ssToken on real data (`--search`, issue 18, docs/beyond-sstoken.md): the six
pre-registered ssToken variants beside full SFT, ssToken (EMA and base history) and Rho-1 of the same study
workdir, with the study's statistics (`report.py`: mean ± std over seeds, paired bootstrap difference to
full SFT with its interval and verdict).

Written into the workdir (`search-report.md`, `search-results.json`) and, with `--search --report`, into
docs/beyond-sstoken.md between `<!-- beyond-sstoken-real-results:start -->` / `:end -->`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lit_tokensel_bench.noisy_sft.plan import MethodRow
from lit_tokensel_bench.noisy_sft.report import atomic_write_text, update_readme
from lit_tokensel_bench.real_sft.plan import METHODS, SEARCH_BASELINES, SEARCH_METHODS, StudySettings
from lit_tokensel_bench.real_sft.report import (
    NLL,
    collect,
    method_rows,
    partial_text,
    scored_tasks,
    settings_text,
    tables_markdown,
)
from lit_tokensel_bench.real_sft.stats import verdict

SECTION = "beyond-sstoken-real-results"
WRITER = "benchmarks/lit_tokensel_bench/real_sft/search.py"
SEARCH_SEEDS = (
    "Seeds {seeds} for every variant and for full SFT, ssToken base history and Rho-1; ssToken EMA has the "
    "study's seed {first} only."
)


def search_methods() -> list[MethodRow]:
    """The table's rows: the study's baselines of `SEARCH_BASELINES` (in that order), then the six variants."""
    by_key = {row.key: row for row in METHODS}
    return [by_key[key] for key in SEARCH_BASELINES] + list(SEARCH_METHODS)


def losing_text(rows: list[dict[str, Any]]) -> str:
    """The plan's real-data rule per variant: it loses when the NLL proxy's or the suite average's 95% interval
    lies entirely on the losing side of full SFT."""
    variants = {row.key for row in SEARCH_METHODS}
    loses, holds = [], []
    for row in rows:
        if row["key"] not in variants or "diff" not in row:
            continue
        verdicts = [verdict(row["diff"][NLL], higher_is_better=False)]
        if "average" in row["diff"]:
            verdicts.append(verdict(row["diff"]["average"], higher_is_better=True))
        (loses if "worse" in verdicts else holds).append(row["name"])
    if not loses and not holds:
        return ""
    return (
        "- **The plan's real-data rule** (a variant loses when the AlpacaEval NLL's or the suite average's "
        f"interval lies entirely on the losing side): loses: {', '.join(loses) or 'none'}; "
        f"does not lose: {', '.join(holds) or 'none'}.\n"
    )


def search_markdown(settings: StudySettings, root: Path, iters: int = 2000) -> tuple[str, dict[str, Any]]:
    """(the section's text, the numbers) of the search in the study workdir `root`."""
    methods = search_methods()
    settings = dataclasses.replace(settings, limits=scored_tasks(settings, root, methods))
    collected = collect(settings, root, methods)
    rows = method_rows(settings, collected, iters=iters, methods=methods)
    body = (
        f"{partial_text(collected)}The six ssToken variants of the plan above (ratio 0.6, EMA history unless the "
        "variant says otherwise; V3's base history is the base model's cached losses, as for ssToken base "
        "history) trained and scored as the real-data study's runs "
        "([benchmarks.md](benchmarks.md#real-data-study)), in the same workdir: "
        f"{settings_text(settings, root, collected, seeds_text=SEARCH_SEEDS)}\n\n"
        f"{tables_markdown(settings, rows, collected)}{losing_text(rows)}"
    )
    numbers = {
        "settings": settings.to_dict(),
        "missing": collected["missing"],
        "rows": rows,
        "base": None if collected["base"] is None else collected["base"]["scores"],
    }
    return body, numbers


def write_search_report(
    settings: StudySettings,
    root: Path,
    page: Path | None = None,
    command: str = "python -m lit_tokensel_bench.real_sft --search",
) -> dict[str, Path]:
    """`search-report.md` and `search-results.json` in `root`; with `page` (docs/beyond-sstoken.md), its
    section between the `beyond-sstoken-real-results` markers."""
    body, numbers = search_markdown(settings, root)
    paths = {"report": root / "search-report.md", "results": root / "search-results.json"}
    atomic_write_text(paths["report"], f"# Beyond ssToken: real data\n\n{body}")
    atomic_write_text(
        paths["results"], json.dumps({"command": command, **numbers}, indent=1, default=float) + "\n"
    )
    if page is not None:
        update_readme(Path(page), body, command, SECTION, writer=WRITER)
        paths["page"] = Path(page)
    return paths
