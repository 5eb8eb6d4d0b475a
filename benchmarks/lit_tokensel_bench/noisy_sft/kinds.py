"""Per-kind breakdown of a method's scores: why a selection AUC is what it is.

The table's AUC pools every corrupted token against every clean one. When it sits near 0.5 the
pooled number cannot say whether the score misses the noise or ranks part of it *above* the clean
tokens. This splits the inspected response tokens into classes (clean, end of turn, the first token
of a filler word, the rest of a filler word, wrong answers) and reports, per class, the mean loss and
mean of every score the method logged, and the AUC of each score for clean tokens against each
corrupted class (0.5: chance; below 0.5: the score prefers the noise). It reads the `inspect` files
and corruption kinds a benchmark run leaves in its workdir.

    python -m lit_tokensel_bench.noisy_sft.kinds --workdir runs/noisy_sft --regime pretrained \\
        --rows sstoken-base-0.6 sstoken-gamma1-0.6 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lit_tokensel_bench.noisy_sft.data import FILLER, WRONG_ANSWER
from lit_tokensel_bench.noisy_sft.metrics import ranking_auc
from lit_tokensel_bench.noisy_sft.run import Paths

CLEAN, END, FILLER_FIRST, FILLER_REST, WRONG = "clean", "end", "filler-first", "filler-rest", "wrong-answer"
CLASSES = (CLEAN, END, FILLER_FIRST, FILLER_REST, WRONG)
"""Token classes: clean answer text, the end-of-turn token, the first and the later tokens of a filler word,
and the tokens of a wrong answer."""
CORRUPTED_CLASSES = (FILLER_FIRST, FILLER_REST, WRONG)
END_TOKEN = "<|im_end|>"


def token_classes(texts: Sequence[str], kinds: Sequence[str | None]) -> list[str]:
    """The class of each response token from its decoded text and corruption kind. A filler token starts
    a filler word when the token before it is not filler or when its text starts with whitespace (two
    filler words side by side); the later tokens of a word are predictable from its first one."""
    if len(texts) != len(kinds):
        raise ValueError(
            f"{len(kinds)} corruption kinds for {len(texts)} tokens; the kinds belong to other data"
        )
    classes, previous = [], None
    for text, kind in zip(texts, kinds, strict=True):
        if kind == FILLER:
            classes.append(FILLER_REST if previous == FILLER and not text[:1].isspace() else FILLER_FIRST)
        elif kind == WRONG_ANSWER:
            classes.append(WRONG)
        else:
            classes.append(END if text == END_TOKEN else CLEAN)
        previous = kind
    return classes


def kind_breakdown(
    records: Iterable[dict[str, Any]], kinds: Sequence[Sequence[str | None]]
) -> dict[str, Any]:
    """Per class: token count, mean of `loss` and of every score; per score: AUC of clean against each
    corrupted class. `kinds[sample_id]` is aligned with a record's `tokens`. Records without scores (a
    sample dropped whole) are skipped; a missing score value (None) is left out of its mean and AUC."""
    values: dict[str, dict[str, list[float]]] = {c: {} for c in CLASSES}
    step = None
    for record in records:
        if not record.get("scores"):
            continue
        step = record.get("step", step)
        series = {"loss": record["loss"], **record["scores"]}
        for i, cls in enumerate(token_classes(record["text"], kinds[record["sample_id"]])):
            for name, row in series.items():
                values[cls].setdefault(name, []).append(math.nan if row[i] is None else float(row[i]))
    names = list(dict.fromkeys(name for per_class in values.values() for name in per_class))
    means = {
        cls: {
            "n": len(per_class.get("loss", [])),
            **{
                name: (
                    statistics.fmean(f)
                    if (f := [v for v in per_class.get(name, []) if math.isfinite(v)])
                    else None
                )
                for name in names
            },
        }
        for cls, per_class in values.items()
    }
    aucs = {
        name: {
            cls: ranking_auc(values[CLEAN].get(name, []), values[cls].get(name, []))
            for cls in CORRUPTED_CLASSES
        }
        for name in names
        if name != "loss"
    }
    return {"step": step, "means": means, "auc": aucs}


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def breakdown_tables(title: str, breakdown: dict[str, Any]) -> tuple[Table, Table]:
    """Two rich tables: per class, its token count and means; per score, its AUC against each corrupted class."""
    names = [n for n in next(iter(breakdown["means"].values())) if n != "n"]
    means = Table(title=title, title_justify="left")
    for column in ("class", "tokens", *(f"mean {n}" for n in names)):
        means.add_column(column, justify="left" if column == "class" else "right")
    for cls, row in breakdown["means"].items():
        means.add_row(cls, str(row["n"]), *(_fmt(row[n]) for n in names))
    aucs = Table(
        title="AUC, clean tokens above ... (0.5 chance, below 0.5 prefers the noise)", title_justify="left"
    )
    for column in ("score", *CORRUPTED_CLASSES):
        aucs.add_column(column, justify="left" if column == "score" else "right")
    for name, per_class in breakdown["auc"].items():
        aucs.add_row(name, *(_fmt(per_class[cls]) for cls in CORRUPTED_CLASSES))
    return means, aucs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lit_tokensel_bench.noisy_sft.kinds", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("runs/noisy_sft"), help="the benchmark's workdir"
    )
    parser.add_argument("--regime", default="pretrained", choices=("scratch", "pretrained"))
    parser.add_argument("--rows", nargs="+", required=True, help="row keys, e.g. sstoken-base-0.6 rho1-0.6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the breakdowns here")
    args = parser.parse_args(argv)
    paths = Paths(args.workdir)
    kinds_file = paths.kinds
    if not kinds_file.is_file():
        parser.error(f"{kinds_file} not found: is {args.workdir} a noisy-SFT benchmark workdir?")
    kinds = json.loads(kinds_file.read_text(encoding="utf-8"))
    console, out = Console(width=max(Console().width, 110)), {}
    for row in args.rows:
        inspect_dir = paths.run_dir(args.regime, row) / f"seed{args.seed}" / "inspect"
        files = sorted(inspect_dir.glob("*.jsonl"))
        if not files:
            parser.error(
                f"no inspect files under {inspect_dir}: has the `{row}` run of seed {args.seed} finished?"
            )
        for path in files:
            breakdown = kind_breakdown(read_records(path), kinds)
            out[f"{args.regime}/{row}/{path.stem}"] = breakdown
            console.print(
                *breakdown_tables(
                    f"{args.regime} · {row} · seed {args.seed} · {path.stem} of training "
                    f"(step {breakdown['step']})",
                    breakdown,
                )
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
