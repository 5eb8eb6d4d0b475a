"""`SFTDataModule`: chat/instruction data -> tokenized, assistant-only-labeled batches with stable sample ids."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lit_tokensel.cache.fingerprint import data_fingerprint
from lit_tokensel.cache.store import TokenLossCache
from lit_tokensel.choices import check_choices
from lit_tokensel.data.chunks import ChunkSampler
from lit_tokensel.data.collate import DataCollatorForSFT, pad_token_id_of
from lit_tokensel.data.packing import PackedCollatorForSFT
from lit_tokensel.data.pipeline import SplitStats, TokenizedSource, holdout_split, tokenize_source
from lit_tokensel.data.samplers import EpochShuffleSampler, ResumableSampler
from lit_tokensel.data.sources import BUILTIN_PREFIX, Source, local_path
from lit_tokensel.data.tokenization import ensure_chat_template, tokenizer_fingerprint
from lit_tokensel.data.weights import collect_token_weights

log = logging.getLogger(__name__)


def pa_list_lengths(column: Any) -> list[int]:
    """Lengths of the lists in a pyarrow list column."""
    import pyarrow.compute as pc

    return pc.list_value_length(column).to_pylist()


class SFTDataModule(L.LightningDataModule):
    """Supervised fine-tuning data: rows of a local file or hub dataset, rendered with the chat template,
    labeled on assistant tokens only (-100 elsewhere), right-padded into batches.

    Batches are dicts of `input_ids`, `attention_mask`, `labels` (`[B, T]` long) and `sample_id` (`[B]`
    long, the row's 0-based index in its file or split, stable across shuffling and runs). Tokenized
    data is cached on disk by `datasets`, keyed by the data, tokenizer, template and these options.
    Counts per split (rows read, rejected, dropped, truncated, kept) are in `self.stats` after `setup`.

    Args:
        train_file: Local training data: `.jsonl`, `.json` (a list of objects) or `.parquet`;
            `builtin:<path>` names a file shipped in the package (e.g. `builtin:quickstart/train.jsonl`).
        dataset_name: Hub dataset (or local dataset folder) for `datasets.load_dataset`, instead of `train_file`.
        dataset_config: Configuration name passed to `datasets.load_dataset`.
        train_split: Split of `dataset_name` to train on.
        val_file: Local validation data, same formats as `train_file`.
        val_split: Split of `dataset_name` to validate on.
        val_fraction: Fraction of the training rows held out for validation (seeded by `seed`); 0 for none.
        seed: Seed of the validation hold-out and of the training shuffle.
        format: Row format: `messages` (chat, `{"messages": [{"role", "content"}, ...]}`),
            `prompt_completion` (`prompt`, `completion`), `alpaca` (`instruction`, optional `input`,
            `output`), or `auto` to detect it from the first row's keys.
        system_prompt: System message prepended to conversations that have none.
        tokenizer: Tokenizer path or hub id (`AutoTokenizer.from_pretrained`), a tokenizer object, or None
            to use the model's (`trainer.lightning_module.tokenizer`).
        chat_template: Template used when the tokenizer has none (default: ChatML with generation tags).
            It is set on the tokenizer object itself, so an exported model carries it.
        override_chat_template: Use `chat_template` (or ChatML) even when the tokenizer has a template.
        max_length: Maximum tokens per sample; longer samples keep their beginning. Samples with no
            response token left are dropped and counted.
        train_on: Which assistant turns get labels: `all_turns` or `last_turn`.
        on_invalid: What an invalid row does: `error` raises naming file, row and field; `skip` skips it,
            counts it and writes it to the rejects file.
        rejects_file: JSONL file for skipped rows (split, source, row, field, reason, raw row). Default:
            `<data file>.rejects.jsonl` next to each local file, or `<default_root_dir>/<dataset>.rejects.jsonl`
            for hub and `builtin:` data. Only written when rows were skipped.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size (default: `batch_size`).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: Round the padded length up to a multiple of this (e.g. 8 for tensor cores).
        cache_dir: `datasets` cache folder (default: the `datasets` default, `~/.cache/huggingface/datasets`).
        cached_losses: Token-loss caches written by `lit-tokensel score`, as `{name: directory}`. Each is
            checked against this data's fingerprint in `setup` (data, tokenizer, max_length, train_on) and
            must hold every training sample; training batches then carry `cached/<name>`, float32
            `[B, T-1]` aligned with `labels[:, 1:]`, joined by `sample_id` (shuffling stays on).
        epoch_chunks: Split the training samples into this many disjoint chunks (a seeded partition, fixed
            for the run) and train epoch `e` on a shuffle of chunk `e % epoch_chunks` only
            (`lit_tokensel.data.chunks.ChunkSampler`; self-evolving TokenCleaning, one round per epoch).
            None: every epoch sees all the data.
        packing: Pack each batch's samples into rows instead of padding each sample
            (`lit_tokensel.data.packing`): same samples per batch, attention confined to each sample.
            Off by default. See docs/packing.md.
        packing_row_tokens: Width of a packed row; None (default): the batch's longest sample (best for
            SDPA/eager attention), an integer >= max_length for denser rows (FlashAttention varlen).
    """

    def __init__(
        self,
        train_file: str | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_file: str | None = None,
        val_split: str | None = None,
        val_fraction: float = 0.0,
        seed: int = 42,
        format: Literal["auto", "messages", "prompt_completion", "alpaca"] = "auto",
        system_prompt: str | None = None,
        tokenizer: str | Any | None = None,
        chat_template: str | None = None,
        override_chat_template: bool = False,
        max_length: int = 1024,
        train_on: Literal["all_turns", "last_turn"] = "all_turns",
        on_invalid: Literal["error", "skip"] = "error",
        rejects_file: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        cache_dir: str | None = None,
        cached_losses: dict[str, str] | None = None,
        epoch_chunks: int | None = None,
        packing: bool = False,
        packing_row_tokens: int | None = None,
    ) -> None:
        super().__init__()
        check_choices(SFTDataModule.__init__, locals())  # format, train_on, on_invalid: their Literal types
        if train_file is not None and dataset_name is not None:
            raise ValueError("pass either --data.train_file or --data.dataset_name, not both")
        if val_split is not None and dataset_name is None:
            raise ValueError(
                "--data.val_split selects a split of --data.dataset_name; for a local file use "
                "--data.val_file"
            )
        if sum([val_file is not None, val_split is not None, val_fraction > 0]) > 1:
            raise ValueError("pass at most one of --data.val_file, --data.val_split and --data.val_fraction")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"--data.val_fraction must be in [0, 1), got {val_fraction}")
        if epoch_chunks is not None and (isinstance(epoch_chunks, bool) or epoch_chunks < 1):
            raise ValueError(f"--data.epoch_chunks must be None or an integer >= 1, got {epoch_chunks!r}")
        if packing_row_tokens is not None and packing_row_tokens < max_length:
            raise ValueError(
                f"--data.packing_row_tokens={packing_row_tokens} must be >= max_length={max_length} (a row holds a whole "
                "sample) or None (rows as wide as each batch's longest sample)"
            )
        if max_length < 1 or batch_size < 1:
            raise ValueError(
                f"--data.max_length and --data.batch_size must be >= 1, got {max_length} and {batch_size}"
            )
        self.train_file = train_file
        self.dataset_name = dataset_name
        self.dataset_config = dataset_config
        self.train_split = train_split
        self.val_file = val_file
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.seed = seed
        self.format = format
        self.system_prompt = system_prompt
        self.tokenizer_source = tokenizer  # the init argument; `self.tokenizer` is the resolved object
        self.tokenizer: Any = None
        self.chat_template = chat_template
        self.override_chat_template = override_chat_template
        self.max_length = max_length
        self.train_on = train_on
        self.on_invalid = on_invalid
        self.rejects_file = rejects_file
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.cache_dir = cache_dir
        self.cached_losses = dict(cached_losses or {})
        self.epoch_chunks = epoch_chunks
        self.packing = packing
        self.packing_row_tokens = packing_row_tokens

        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.collator: DataCollatorForSFT | None = None
        self.train_collator: DataCollatorForSFT | None = None  # `collator` plus the cached-loss join
        self._train_sampler: ResumableSampler | None = None
        self._resume_state: tuple[int, int] | None = None  # (epoch, consumed samples) from a checkpoint
        self.loss_caches: dict[str, TokenLossCache] = {}
        self.data_fingerprints: dict[str, str] = {}
        self.stats: dict[str, SplitStats] = {}
        self.rejects_paths: list[str] = []
        self._train_source: TokenizedSource | None = None  # the training split's source, for its data weights

    # ----------------------------------------------------------------------------------------- setup

    def setup(self, stage: str | None = None) -> None:
        """Build the data (`setup_data`), then open, check and join the `cached_losses`."""
        self.setup_data()
        if self.train_collator is None:
            self._join_cached_losses()
            self._join_data_weights()

    def setup_data(self) -> None:
        """Resolve the tokenizer and its template, then build (or load from cache) the train/val datasets."""
        if self.train_dataset is not None:
            return
        if self.train_file is None and self.dataset_name is None:
            raise ValueError(
                "no training data: pass --data.train_file (a local .jsonl/.json/.parquet) or --data.dataset_name"
            )
        for setting, path in (("train_file", self.train_file), ("val_file", self.val_file)):
            if path is not None:
                local_path(
                    path, f"--data.{setting}"
                )  # missing, a directory, or an unsupported type: say which
        self.tokenizer = self._resolve_tokenizer()
        template = ensure_chat_template(self.tokenizer, self.chat_template, self.override_chat_template)
        self.collator = DataCollatorForSFT(pad_token_id_of(self.tokenizer), self.pad_to_multiple_of)
        if self.packing:
            self.collator = PackedCollatorForSFT(
                pad_token_id_of(self.tokenizer),
                self.pad_to_multiple_of,
                max_tokens_per_row=self.packing_row_tokens,
            )
        with self._rank_zero_first():
            self._build()
        self._log_stats(template)

    def _resolve_tokenizer(self) -> Any:
        source = self.tokenizer_source
        if isinstance(source, str):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(source)
        if source is not None:
            return source
        module = self.trainer.lightning_module if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "tokenizer=None takes the tokenizer from the model (trainer.lightning_module.tokenizer), but "
                + ("the datamodule is not attached to a trainer" if module is None else "the model has none")
                + "; pass tokenizer=<path, hub id or tokenizer object> (`--data.tokenizer <path or hub id>` on the "
                "command line)."
            )
        return tokenizer

    @contextmanager
    def _rank_zero_first(self) -> Iterator[None]:
        """Let global rank 0 fill the `datasets` cache before the other ranks read it."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            yield
            return
        if not trainer.is_global_zero:
            trainer.strategy.barrier("sft_data_setup")
            yield
            return
        try:
            yield
        finally:
            trainer.strategy.barrier("sft_data_setup")

    def _source(self, path: str | None, split: str) -> Source:
        if path is not None:
            return Source(path=path)
        return Source(
            dataset_name=self.dataset_name,
            dataset_config=self.dataset_config,
            split=split,
            cache_dir=self.cache_dir,
        )

    def _setting(self, source: Source, name: str) -> str:
        """The option that names `source` in error messages, as a CLI flag."""
        if source.path is not None:
            return f"--data.{name}_file"
        return "--data.dataset_name" + (f" (--data.{name}_split {source.split})" if source.split else "")

    def _tokenize(self, source: Source, name: str) -> TokenizedSource:
        return tokenize_source(
            source,
            self.format,
            self.tokenizer,
            max_length=self.max_length,
            train_on=self.train_on,
            system_prompt=self.system_prompt,
            cache_dir=self.cache_dir,
            name=name,
            fail_on_invalid=self.on_invalid == "error",
            setting=self._setting(source, name),
        )

    def _build(self) -> None:
        train = self._tokenize(self._source(self.train_file, self.train_split), "train")
        self._train_source = train
        parts: list[tuple[str, TokenizedSource, list[int]]] = []
        if self.val_fraction > 0:
            train_rows, val_rows = holdout_split(len(train), self.val_fraction, self.seed)
            parts = [("train", train, train_rows), ("val", train, val_rows)]
        else:
            parts = [("train", train, list(range(len(train))))]
            if self.val_file is not None or self.val_split is not None:
                val = self._tokenize(self._source(self.val_file, self.val_split or ""), "val")
                parts.append(("val", val, list(range(len(val)))))
        rejects: dict[str, list[dict[str, Any]]] = {}
        for name, tokenized, rows in parts:
            dataset, self.stats[name] = tokenized.select(rows, name)
            self.data_fingerprints[name] = data_fingerprint(
                tokenized.content_id, tokenized.format, self.system_prompt, rows
            )
            setattr(self, f"{name}_dataset", dataset)
            if invalid := tokenized.invalid_rows(rows):
                path = self._rejects_path(tokenized.source)
                rejects.setdefault(path, []).extend(tokenized.reject_records(invalid, name))
        if len(self.train_dataset) == 0:
            raise ValueError(
                f"no trainable samples in {train.source.display}: {self.stats['train'].as_dict()}. Check "
                f"--data.on_invalid and the rejects file, or raise --data.max_length if samples lost their "
                f"response to truncation."
            )
        if self.trainer is None or self.trainer.is_global_zero:
            self._write_rejects(rejects)
        self.rejects_paths = sorted(rejects)

    def loss_cache_fingerprint(self, split: str = "train") -> dict[str, Any]:
        """What a token-loss cache of `split` must match: data, tokenizer, max_length, train_on."""
        if split not in self.data_fingerprints:
            raise ValueError(f"no {split!r} split after setup (splits: {', '.join(self.data_fingerprints)})")
        return {
            "data": self.data_fingerprints[split],
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "max_length": self.max_length,
            "train_on": self.train_on,
        }

    def _join_cached_losses(self) -> None:
        """Open each cache, check it fits the training data (fingerprint, ids, lengths), hand it to the collator."""
        assert self.collator is not None
        if self.cached_losses:
            expected = self.loss_cache_fingerprint("train")
            table = self.train_dataset.select_columns(["sample_id", "input_ids"]).with_format("arrow")[:]
            sample_ids = table.column("sample_id").to_pylist()
            num_tokens = pa_list_lengths(table.column("input_ids"))
            for name, path in self.cached_losses.items():
                cache = TokenLossCache(path)
                cache.verify(expected, split="train")
                cache.check_covers(sample_ids, num_tokens)
                self.loss_caches[name] = cache
        self.train_collator = dataclasses.replace(self.collator, cached=dict(self.loss_caches))

    def _join_data_weights(self) -> None:
        """Per-token weights from the training rows (`lit_tokensel.data.weights`), joined by the train collator."""
        train = self._train_source
        if train is None or self.train_collator is None:
            return
        weights = collect_token_weights(
            train.source, train.format, self.system_prompt, self.tokenizer, self.train_dataset
        )
        if weights:
            self.train_collator = dataclasses.replace(self.train_collator, token_weights=weights)

    def _rejects_path(self, source: Source) -> str:
        if self.rejects_file is not None:
            return self.rejects_file
        if source.path is not None and not source.path.startswith(BUILTIN_PREFIX):
            return f"{source.path}.rejects.jsonl"
        root = self.trainer.default_root_dir if self.trainer is not None else os.getcwd()
        return str(Path(root) / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', source.display)}.rejects.jsonl")

    @staticmethod
    def _write_rejects(rejects: dict[str, list[dict[str, Any]]]) -> None:
        for path, records in rejects.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def _log_stats(self, template: str) -> None:
        lines = [f"SFT data (max_length={self.max_length}, train_on={self.train_on}):"]
        for name, stats in self.stats.items():
            lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in stats.as_dict().items()))
        rank_zero_info("\n".join(lines))
        skipped = {name: s.rejected for name, s in self.stats.items() if s.rejected}
        if skipped:
            rank_zero_warn(f"skipped invalid rows {skipped}; see {', '.join(self.rejects_paths)}")
        dropped = {name: s.dropped_no_response for name, s in self.stats.items() if s.dropped_no_response}
        if dropped:
            rank_zero_warn(
                f"dropped samples with no response token left after truncation to max_length={self.max_length}: "
                f"{dropped}"
            )
        trailing = {name: s.trailing_turn for name, s in self.stats.items() if s.trailing_turn}
        if trailing:
            rank_zero_warn(
                f"rows ending in turns after their last assistant turn (unanswered, not trained on): "
                f"{trailing}"
            )
        log.debug("chat template in use: %s", template)

    # ----------------------------------------------------------------------------------------- loaders

    # ----------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Where training is in the epoch, saved in every checkpoint written during `fit`, so a resume skips
        exactly the batches already trained on: also checkpoints written during validation (e.g.
        `val_check_interval: 0.5` with a monitored `ModelCheckpoint`), at an epoch's end, or after `fit`."""
        trainer = getattr(self, "trainer", None)
        sampler = self._train_sampler
        # Multi-process: Lightning wraps the sampler in a DistributedSamplerWrapper that re-permutes
        # its output, so skipping inside it would not skip the right samples; epoch boundaries stay exact.
        if (
            trainer is None
            or sampler is None
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.world_size > 1
        ):
            return {}
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # batches of this epoch
        # The sampler's epoch, not `trainer.current_epoch`: the batch counter belongs to the epoch being
        # iterated, and `current_epoch` already counts an epoch as done once it ended (or max_steps cut it).
        return {"epoch": sampler.epoch, "consumed_samples": processed * self.batch_size * trainer.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume_state = (int(state_dict["epoch"]), int(state_dict["consumed_samples"]))
            self._apply_resume()

    def _resumable(self, sampler: Any) -> ResumableSampler:
        """Wrap the training sampler so a checkpoint's position in the epoch can be restored."""
        self._train_sampler = ResumableSampler(sampler)
        self._apply_resume()
        return self._train_sampler

    def _apply_resume(self) -> None:
        if self._resume_state is not None and self._train_sampler is not None:
            self._train_sampler.resume_at(*self._resume_state)
            self._resume_state = None

    def _require_setup(self) -> None:
        if self.train_dataset is None or self.collator is None:
            raise RuntimeError("SFTDataModule.setup() must run before asking for a dataloader")

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the order depends only on `seed` and the epoch (also after a resume).

        With `epoch_chunks`, epoch `e` yields only chunk `e % epoch_chunks` (a `ChunkSampler`).
        """
        self._require_setup()
        if self.epoch_chunks is not None:
            sampler = ChunkSampler(len(self.train_dataset), self.epoch_chunks, self.seed)
        else:
            sampler = EpochShuffleSampler(len(self.train_dataset), self.seed)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=self._resumable(sampler),
            collate_fn=self.train_collator or self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self) -> DataLoader | list:
        self._require_setup()
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in row order, or `[]` when there is no validation data."""
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader | list:
        """The validation data, in row order."""
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader | list:
        """The validation data, in row order."""
        return self._eval_loader()
