r"""`lit-tokensel recipe NAME`: a whole token-selection pipeline in one command, resumable.

    lit-tokensel recipe token-cleaning -c configs/quickstart.yaml --workdir runs/tc \
        --warmup_size 300            # or --warmup_fraction F, or --warmup_file FILE (a separate set)
    lit-tokensel recipe token-cleaning --variant self-evolving -c configs/quickstart.yaml --workdir runs/tc_se

Your -c configs and --model/--data/--trainer arguments describe the base run (base model and its
training settings, data, trainer), as for `lit-tokensel fit`. The stages, in `--workdir`:

  warmup.jsonl      with --warmup_size/--warmup_fraction: a seeded subset of the training rows
                    (never the val_fraction hold-out; the rows stay in the training data)
  reference/        full SFT of the base on the warm-up set, every token, --reference_epochs epochs,
                    exported with export_pretrained (reference/export)
  cache/base        the base model's per-token losses on the training data (a scoring pass)
  cache/reference   the reference's losses on the same data (recipes that need a reference)
  train/            the final method (the recipe's method config), with both caches joined
  recipe.json       each stage's status and outputs; the paths of reference export, caches,
                    final run, checkpoint and export

A stage whose output is complete is skipped, so an interrupted recipe re-run continues where it
stopped (training resumes from the stage's resume/last.ckpt). A finished stage whose configuration
changed is an error, as is an earlier stage that must run again while later outputs exist. Each
training stage writes config.yaml, CSV logs in logs/ (in place of a configured logger), its own
checkpoint resume/last.ckpt (besides any ModelCheckpoint of yours, under logs/checkpoints) and export/.
The warm-up run has no validation data; all stages share the base run's settings (learning rate,
LoRA, max_steps...), the warm-up run with max_epochs = --reference_epochs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from lit_tokensel.recipes import stages
from lit_tokensel.recipes.registry import RecipeSpec, resolve
from lit_tokensel.recipes.state import RecipeError, RecipeState


@dataclass
class RecipeOptions:
    """The recipe's own options (everything else is a LightningCLI argument of the base run)."""

    workdir: str
    variant: str | None = None
    warmup_file: str | None = None
    warmup_size: int | None = None
    warmup_fraction: float | None = None
    chunks: int | None = None
    method_config: str | None = None
    reference_epochs: int = 1
    shard_size: int = 256
    save_every_n_steps: int | None = None


@dataclass
class Stage:
    """A step of the plan: `complete()` says it can be skipped, `started()` that its output exists at all."""

    name: str
    title: str
    output: Path
    complete: Callable[[], bool]
    execute: Callable[[], dict[str, Any]]
    started: Callable[[], bool] = field(default=lambda: False)


def run_recipe(
    name: str,
    lightning_args: list[str],
    options: RecipeOptions,
    build: stages.CliBuilder,
    console: Console | None = None,
) -> dict:
    """Run (or continue) recipe `name` in `options.workdir`; return the `recipe.json` contents.

    `build` parses LightningCLI arguments into model, DataModule and Trainer (`lit_tokensel.cli.build_cli`).
    """
    console = console or Console(stderr=True)
    variant, spec = resolve(name, options.variant)
    _check_options(f"{name}/{variant}", spec, options)
    method_config = Path(options.method_config).resolve() if options.method_config else spec.config_path()
    stages.check_method_config(method_config)
    base = build(lightning_args)  # the base run as configured: data source, tokenizer, devices
    if base.trainer.world_size > 1:
        raise RecipeError(
            "the recipe runs its stages in this one process, and a multi-process strategy would run every stage "
            "(and write every file) once per rank; run it with one device, or run the stages yourself with "
            "`lit-tokensel fit` and `lit-tokensel score`"
        )
    workdir = Path(options.workdir).resolve()
    state = RecipeState(workdir, name, variant)
    plan, outputs = _plan(workdir, spec, method_config, lightning_args, options, state, base, build)
    for index, stage in enumerate(plan, start=1):
        tag = f"[bold][{index}/{len(plan)}] {stage.name}[/bold]"
        if stage.complete():
            console.print(f"{tag} done, skipped: {stage.output}", soft_wrap=True)
            continue
        if stale := [str(later.output) for later in plan[index:] if later.started()]:
            raise RecipeError(
                f"stage {stage.name} must run, but outputs of later stages exist and would be stale: "
                f"{', '.join(stale)}. Delete them, or use another --workdir."
            )
        console.print(f"{tag} {stage.title} -> {stage.output}", soft_wrap=True)
        start = time.perf_counter()
        state.record(stage.name, status="running")
        fields = stage.execute()
        state.record(stage.name, status="done", seconds=round(time.perf_counter() - start, 1), **fields)
        console.print(f"{tag} done in {time.perf_counter() - start:.1f}s")
    state.summarize(method_config=str(method_config), **outputs)
    console.print(f"[bold]recipe {name}/{variant} finished[/bold]: {state.path}", soft_wrap=True)
    return state.data


def _check_options(recipe: str, spec: RecipeSpec, options: RecipeOptions) -> None:
    warmups = [
        o for o in ("warmup_file", "warmup_size", "warmup_fraction") if getattr(options, o) is not None
    ]
    if spec.needs_reference and len(warmups) != 1:
        raise RecipeError(
            f"recipe {recipe} trains a reference: pass exactly one of --warmup_file, "
            f"--warmup_size, --warmup_fraction (got {warmups or 'none'})"
        )
    if not spec.needs_reference and warmups:
        raise RecipeError(f"recipe {recipe} needs no reference model; drop {warmups}")
    if options.chunks is not None and not spec.chunked:
        raise RecipeError(f"--chunks applies to chunked recipes; {recipe} is not one")
    if options.reference_epochs < 1:
        raise RecipeError(f"--reference_epochs must be >= 1, got {options.reference_epochs}")


def _plan(
    workdir: Path,
    spec: RecipeSpec,
    method_config: Path,
    args: list[str],
    options: RecipeOptions,
    state: RecipeState,
    base: Any,
    build: stages.CliBuilder,
) -> tuple[list[Stage], dict[str, Any]]:
    """The recipe's stages in order, and the summary of their outputs."""
    caches = {"base": workdir / "cache" / "base"}
    if spec.needs_reference:
        caches["reference"] = workdir / "cache" / "reference"
    scoring = [
        *args,
        "-c",
        str(method_config),
        "--model.class_path",
        "lit_tokensel.FullSFT",
        "--model.init_args.lora",
        "null",
        "--data.cached_losses",
        "{}",
    ]
    final_args = [
        *args,
        "-c",
        str(method_config),
        "--data.cached_losses",
        json.dumps({k: str(v) for k, v in caches.items()}),
    ]
    if options.chunks is not None:
        final_args += [
            "--model.init_args.chunks",
            str(options.chunks),
            "--data.epoch_chunks",
            str(options.chunks),
            "--trainer.max_epochs",
            str(options.chunks),
        ]
    plan: list[Stage] = []
    reference: stages.TrainRun | None = None
    if spec.needs_reference:
        warmup = options.warmup_file
        if warmup is None:
            plan.append(_warmup_stage(workdir / "warmup.jsonl", options, state, base))
            warmup = str(plan[-1].output)
        reference = stages.TrainRun(
            workdir / "reference",
            [
                *args,
                "--model.class_path",
                "lit_tokensel.FullSFT",
                "--data.train_file",
                warmup,
                "--data.dataset_name",
                "null",
                "--data.val_file",
                "null",
                "--data.val_split",
                "null",
                "--data.val_fraction",
                "0",
                "--data.cached_losses",
                "{}",
                "--data.epoch_chunks",
                "null",
                "--trainer.max_epochs",
                str(options.reference_epochs),
            ],
            build,
            options.save_every_n_steps,
        )
        plan.append(
            _train_stage("reference", "reference: full SFT of the base on the warm-up set", reference, state)
        )
    plan.append(
        _score_stage("cache_base", "scoring the base model", caches["base"], scoring, options, build, None)
    )
    if reference is not None:
        plan.append(
            _score_stage(
                "cache_reference",
                "scoring the reference model",
                caches["reference"],
                [
                    *scoring,
                    "--model.init_args.model",
                    str(reference.export),
                    "--model.init_args.gguf_file",
                    "null",
                    "--model.init_args.tokenizer",
                    "null",
                ],
                options,
                build,
                lambda: base.model.tokenizer,
            )
        )
    final = stages.TrainRun(workdir / "train", final_args, build, options.save_every_n_steps)
    plan.append(_train_stage("train", f"final run: {method_config.name}", final, state))
    outputs = {
        "reference_export": str(reference.export) if reference is not None else None,
        "caches": {k: str(v) for k, v in caches.items()},
        "final_run": str(final.directory),
        "checkpoint": str(final.checkpoint),
        "export": str(final.export),
    }
    return plan, outputs


def _warmup_stage(path: Path, options: RecipeOptions, state: RecipeState, base: Any) -> Stage:
    wanted = {"size": options.warmup_size, "fraction": options.warmup_fraction}
    return Stage(
        "warmup_data",
        f"warm-up set: {options.warmup_size or options.warmup_fraction} of the training rows",
        path,
        complete=lambda: path.is_file() and state.stage("warmup_data").get("wanted") == wanted,
        execute=lambda: {
            "wanted": wanted,
            **stages.write_warmup_subset(base.datamodule, path, options.warmup_size, options.warmup_fraction),
        },
        started=path.exists,
    )


def _train_stage(name: str, title: str, run: stages.TrainRun, state: RecipeState) -> Stage:
    return Stage(
        name,
        title,
        run.directory,
        complete=lambda: run.complete(state.stage(name)),
        execute=run.run,
        started=run.directory.exists,
    )


def _score_stage(
    name: str,
    title: str,
    output: Path,
    args: list[str],
    options: RecipeOptions,
    build: stages.CliBuilder,
    tokenizer: Callable[[], Any] | None,
) -> Stage:
    def execute() -> dict[str, Any]:
        path = stages.score(build(args), output, options.shard_size, tokenizer() if tokenizer else None)
        return {"path": str(path)}

    return Stage(
        name,
        title,
        output,
        complete=lambda: stages.cache_complete(output),
        execute=execute,
        started=output.exists,
    )
