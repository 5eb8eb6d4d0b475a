"""Answer tokens kept on clean samples, and how long a dropped token stays dropped.

Two measures of a method's selection, per row of a noisy-SFT run, from the `inspect` files it leaves
(`<workdir>/<regime>/<row>/seed<N>/inspect/<point>.jsonl`):

1. Answer kept: on clean samples (no corrupted token), the kept fraction of the answer tokens and of the
   other response tokens, the end-of-turn token excluded from both. A selection that drops the answer
   more than the rest throws away exactly what the data is meant to teach. The answer span comes from the
   generator's own templates (`data.answer_words`): the piece it replaces by a wrong value when it corrupts
   an answer, i.e. the text after "... is" (capital), "... =" (addition) or "... was born in" (birth year)
   and before the final ".". Each template is rendered with placeholder strings and turned into a regular
   expression over the joined token texts; a token is an answer token when one of its characters lies in
   the answer (" 6" of " 62" is, " =" is not). Responses that match none of the chosen families' templates
   (by default capital and addition; `reverse` lists have no prefix, their whole response is the answer)
   are skipped and counted.
2. Drop persistence: over the samples present at every inspect point, the share of response tokens (end of
   turn included, as logged) dropped at the first point, the share dropped at every point, and of those
   dropped at the first point the share still dropped at every later point. Beside it, what independent
   random selection would give: the product of the later points' drop rates (`drop_rate ** (points - 1)`
   when the rate is constant). Persistence far above it means the first decision locks in.

With several seeds every figure is the mean ± sample std over the seeds.

    python -m lit_tokensel_bench.noisy_sft.persistence --workdir runs/beyond_sstoken --regime pretrained \\
        --rows rho1-0.6 sstoken-0.6 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lit_tokensel_bench.noisy_sft.data import WRONG_ANSWER, answer_words, render
from lit_tokensel_bench.noisy_sft.kinds import END_TOKEN, read_records
from lit_tokensel_bench.noisy_sft.run import Paths

ANSWER_FAMILIES = ("capital", "birth_year", "addition")
"""Families whose answer is one value after a fixed prefix; `reverse` has no prefix and is never matched."""
DEFAULT_FAMILIES = ("capital", "addition")
ANSWER, OTHER, END = "answer", "other", "end"

_KEY, _KEY2, _VALUE, _TRUTH = "\ue000", "\ue001", "\ue002", "\ue003"  # placeholders: no whitespace, no regex


@functools.cache
def answer_pattern(family: str) -> re.Pattern[str]:
    """The generator's answer sentence of `family` as a regex whose group `answer` is the value."""
    if family not in ANSWER_FAMILIES:
        raise ValueError(f"no answer template for family {family!r}; choose from {ANSWER_FAMILIES}")
    # answer_words formats every family's prefix at once, so a text key needs a key[1] too: two placeholders
    key = (_KEY, _KEY2) if family == "addition" else _KEY + _KEY2
    text, spans = render(answer_words(family, key, _VALUE, _TRUTH))
    ((start, end, kind),) = spans  # the value differs from the truth: the generator marks exactly it
    assert kind == WRONG_ANSWER and text[start:end] == _VALUE, (family, text, spans)
    regex = (
        re.escape(text)
        .replace(_KEY + _KEY2, "(?:.+?)")
        .replace(_KEY, "(?:.+?)")
        .replace(_KEY2, "(?:.+?)")
        .replace(_VALUE, "(?P<answer>.+?)")
    )
    return re.compile(f"^{regex}$", re.DOTALL)


def token_roles(texts: Sequence[str], families: Sequence[str] = DEFAULT_FAMILIES) -> list[str] | None:
    """`answer`, `other` or `end` (the end-of-turn token) per response token; None when the response (its
    tokens joined, end-of-turn tokens left out) matches none of the families' answer templates."""
    content = [t for t in texts if t != END_TOKEN]
    joined = "".join(content)
    for family in families:
        if match := answer_pattern(family).match(joined):
            start, end = match.span("answer")
            break
    else:
        return None
    roles, position = [], 0
    for text in texts:
        if text == END_TOKEN:
            roles.append(END)
            continue
        roles.append(ANSWER if position < end and position + len(text) > start else OTHER)
        position += len(text)
    return roles


def answer_keep(
    records: Iterable[dict[str, Any]],
    kinds: Sequence[Sequence[str | None]],
    families: Sequence[str] = DEFAULT_FAMILIES,
    source: str = "records",
) -> dict[str, Any]:
    """Kept fraction of the answer and of the other response tokens over the clean samples of `records`
    (one inspect file), with the token and sample counts; a sample is clean when all its `kinds` are None.
    `source` names the file in errors."""
    counts = dict.fromkeys(
        (
            "answer_tokens",
            "answer_kept_tokens",
            "other_tokens",
            "other_kept_tokens",
            "clean_samples",
            "corrupted_samples",
            "skipped_samples",
        ),
        0,
    )
    for record in records:
        sample_kinds = _kinds_of(record, kinds, source)
        if any(k is not None for k in sample_kinds):
            counts["corrupted_samples"] += 1
            continue
        roles = token_roles(record["text"], families)
        if roles is None:
            counts["skipped_samples"] += 1
            continue
        counts["clean_samples"] += 1
        for role, keep in zip(roles, record["keep"], strict=True):
            if role != END:
                counts[f"{role}_tokens"] += 1
                counts[f"{role}_kept_tokens"] += bool(keep)
    return {
        "answer_kept": _ratio(counts["answer_kept_tokens"], counts["answer_tokens"]),
        "other_kept": _ratio(counts["other_kept_tokens"], counts["other_tokens"]),
        **counts,
    }


def drop_persistence(masks: Sequence[Mapping[int, Sequence[bool]]]) -> dict[str, Any]:
    """Drop persistence over the samples in every one of `masks` (per inspect point, in training order:
    sample id -> keep per response token): drop rate per point, share dropped at the first and at every point,
    the persistence (dropped at every point / dropped at the first) and its value under independent random
    selection at the same rates (the product of the later points' drop rates)."""
    if len(masks) < 2:
        raise ValueError(f"drop persistence needs at least two inspect points, got {len(masks)}")
    shared = sorted(set.intersection(*(set(m) for m in masks)))
    tokens = dropped_first = dropped_all = 0
    dropped = [0] * len(masks)
    for sample_id in shared:
        rows = [m[sample_id] for m in masks]
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"sample {sample_id} has {[len(r) for r in rows]} tokens at the inspect points")
        for keeps in zip(*rows):
            tokens += 1
            for i, keep in enumerate(keeps):
                dropped[i] += not keep
            dropped_first += not keeps[0]
            dropped_all += not any(keeps)
    rates = [_ratio(d, tokens) for d in dropped]
    return {
        "samples": len(shared),
        "tokens": tokens,
        "drop_rate": rates,
        "dropped_first": _ratio(dropped_first, tokens),
        "dropped_every": _ratio(dropped_all, tokens),
        "persistence": _ratio(dropped_all, dropped_first),
        "random": None if None in rates else math.prod(rates[1:]),
    }


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _kinds_of(
    record: dict[str, Any], kinds: Sequence[Sequence[str | None]], source: str
) -> Sequence[str | None]:
    sample_id = record["sample_id"]
    if not 0 <= sample_id < len(kinds):
        raise ValueError(
            f"{source}: sample {sample_id} is not in the corruption kinds ({len(kinds)} samples)"
        )
    if len(kinds[sample_id]) != len(record["text"]):
        raise ValueError(
            f"{source}: sample {sample_id} has {len(record['text'])} tokens but "
            f"{len(kinds[sample_id])} corruption kinds; the kinds belong to other data"
        )
    return kinds[sample_id]


def read_inspect(path: Path) -> list[dict[str, Any]]:
    """The records of one inspect file, checked for the fields used here; errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"inspect file {path} not found")
    try:
        records = read_records(path)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON Lines ({error})") from error
    for number, record in enumerate(records, 1):
        for name in ("sample_id", "text", "keep"):
            if name not in record:
                raise ValueError(f"{path}: record {number} has no field {name!r}")
        if len(record["keep"]) != len(record["text"]):
            raise ValueError(
                f"{path}: record {number} (sample {record['sample_id']}): "
                f"{len(record['keep'])} keep flags for {len(record['text'])} tokens"
            )
    return records


def point_files(inspect_dir: Path, points: Sequence[str] | None) -> list[Path]:
    """The inspect files of `points` (all found when None), ordered by training progress."""
    if points is None:
        files = list(inspect_dir.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no inspect files under {inspect_dir}")
    else:
        files = [inspect_dir / f"{p}.jsonl" for p in points]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"inspect file {path} not found")
    return sorted(files, key=lambda p: float(p.stem))


def seed_measures(
    inspect_dir: Path,
    kinds: Sequence[Sequence[str | None]],
    points: Sequence[str] | None,
    families: Sequence[str],
) -> dict[str, Any]:
    """Both measures for one seed of one row: answer kept per point, drop persistence over the points."""
    records = {path.stem: read_inspect(path) for path in point_files(inspect_dir, points)}
    answer = {
        point: answer_keep(rs, kinds, families, source=str(inspect_dir / f"{point}.jsonl"))
        for point, rs in records.items()
    }
    masks = [{r["sample_id"]: r["keep"] for r in rs} for rs in records.values()]
    return {"points": list(records), "answer": answer, "persistence": drop_persistence(masks)}


def stat(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample std over seeds (std 0 with one seed); mean None when a seed has no value."""
    if not values or None in values:
        return {"mean": None, "std": None, "values": list(values)}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def row_summary(per_seed: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every figure of `seed_measures`; the seeds must share their inspect points."""
    runs = list(per_seed.values())
    points = runs[0]["points"]
    for seed, run in per_seed.items():
        if run["points"] != points:
            raise ValueError(f"seed {seed} has inspect points {run['points']}, another seed {points}")
    answer = {
        p: {
            k: stat([r["answer"][p][k] for r in runs])
            for k in (
                "answer_kept",
                "other_kept",
                "answer_tokens",
                "other_tokens",
                "clean_samples",
                "skipped_samples",
            )
        }
        for p in points
    }
    persistence = {
        k: stat([r["persistence"][k] for r in runs])
        for k in ("dropped_first", "dropped_every", "persistence", "random", "samples")
    }
    return {"seeds": list(per_seed), "points": points, "answer": answer, "persistence": persistence}


def _fmt(s: dict[str, Any], digits: int = 3) -> str:
    if s["mean"] is None:
        return "–"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if len(s["values"]) > 1 else "")


def _count(s: dict[str, Any]) -> str:
    return "–" if s["mean"] is None else f"{s['mean']:.0f}"


def tables(regime: str, summaries: Mapping[str, dict[str, Any]]) -> tuple[Table, Table]:
    """Two rich tables: answer kept per row and point; drop persistence per row."""
    seeds = ", ".join(str(s) for s in next(iter(summaries.values()))["seeds"])
    answer = Table(
        title=f"{regime} · seeds {seeds} · clean samples: kept fraction of answer tokens and of the "
        "other response tokens (end of turn excluded)",
        title_justify="left",
    )
    for column in (
        "row",
        "point",
        "answer kept",
        "other kept",
        "answer tok",
        "other tok",
        "samples",
        "skipped",
    ):
        answer.add_column(column, justify="left" if column in ("row", "point") else "right")
    for row, summary in summaries.items():
        for point, a in summary["answer"].items():
            answer.add_row(
                row,
                point,
                _fmt(a["answer_kept"]),
                _fmt(a["other_kept"]),
                _count(a["answer_tokens"]),
                _count(a["other_tokens"]),
                _count(a["clean_samples"]),
                _count(a["skipped_samples"]),
            )
    persistence = Table(
        title=f"{regime} · seeds {seeds} · drops over the inspect points (response tokens): "
        "persistence = share of first-point drops still dropped at every later point",
        title_justify="left",
    )
    for column in ("row", "points", "dropped first", "dropped every", "persistence", "random", "samples"):
        persistence.add_column(column, justify="left" if column in ("row", "points") else "right")
    for row, summary in summaries.items():
        p = summary["persistence"]
        persistence.add_row(
            row,
            " ".join(summary["points"]),
            _fmt(p["dropped_first"]),
            _fmt(p["dropped_every"]),
            _fmt(p["persistence"]),
            _fmt(p["random"]),
            _count(p["samples"]),
        )
    return answer, persistence


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lit_tokensel_bench.noisy_sft.persistence", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("runs/noisy_sft"), help="the benchmark's workdir"
    )
    parser.add_argument("--regime", default="pretrained", choices=("scratch", "pretrained"))
    parser.add_argument("--rows", nargs="+", required=True, help="row keys, e.g. sstoken-0.6 rho1-0.6")
    parser.add_argument(
        "--seeds", "--seed", nargs="+", type=int, default=[0], help="seeds; mean ± std over them"
    )
    parser.add_argument(
        "--points", nargs="+", help="inspect points, e.g. 0.333 1.000 (default: every file found)"
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=list(DEFAULT_FAMILIES),
        choices=ANSWER_FAMILIES,
        help="task families whose answer span is measured (others are skipped)",
    )
    parser.add_argument("--json", type=Path, help="also write the per-seed figures and the summaries here")
    args = parser.parse_args(argv)
    paths = Paths(args.workdir)
    if not paths.kinds.is_file():
        parser.error(f"{paths.kinds} not found: is {args.workdir} a noisy-SFT benchmark workdir?")
    kinds = json.loads(paths.kinds.read_text(encoding="utf-8"))
    summaries, out = {}, {}
    for row in args.rows:
        per_seed, points = {}, args.points
        for seed in args.seeds:
            inspect_dir = paths.run_dir(args.regime, row) / f"seed{seed}" / "inspect"
            try:
                per_seed[seed] = seed_measures(inspect_dir, kinds, points, args.families)
            except (FileNotFoundError, ValueError) as error:
                parser.error(f"{args.regime}/{row} seed {seed}: {error}")
            points = per_seed[seed]["points"]  # later seeds must have the first one's points
        summaries[row] = row_summary(per_seed)
        out[f"{args.regime}/{row}"] = {**summaries[row], "per_seed": per_seed}
    Console(width=max(Console().width, 130)).print(*tables(args.regime, summaries))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
