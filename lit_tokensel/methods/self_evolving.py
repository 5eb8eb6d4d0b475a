"""TokenCleaning, self-evolving variant (arXiv 2502.01968): the reference is the model of the previous round.

One fit, one epoch per round: the DataModule's `epoch_chunks` sampler feeds epoch t only chunk t.
Round 0 trains on chunk 0 with every response token. Before the first step of round t >= 1 the current model
theta_t (the model after round t-1), frozen for the round, scores chunk t in one no-grad eval-mode
pass: score = `L_theta0 - L_theta_t`, with `L_theta0` from the base model's cached scoring pass.
The chunk's top `ratio` of response tokens (one threshold over the chunk) is kept, and training
continues from theta_t. The reference is the in-memory model at the round's start, never a
checkpoint looked up on disk (the released script looks for the previous round at a wrong path).

Resume: the round's scores are saved in checkpoints. A run resumed mid-round reuses them, so its
selection is exactly the round-start model's; a run resumed at a round boundary scores the new
chunk with the checkpointed model, which is theta_t: both exact. The data order is exact too: the
DataModule's checkpoint state makes the resumed round skip the batches it already trained on.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from lit_tokensel.choices import check_choices
from lit_tokensel.data.chunks import train_chunks
from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule
from lit_tokensel.reference import CachedReference, model_token_losses
from lit_tokensel.selection.segments import as_samples
from lit_tokensel.selection.selectors import check_ratio, global_threshold, select_top

CHECKPOINT_KEY = "self_evolving_round"


class SelfEvolvingTokenCleaningSFT(TokenSelectionModule):
    """Round t keeps the top `ratio` of chunk t's response tokens by `L_base - L_{theta_t}`.

    Needs `data.epoch_chunks` equal to `chunks`, the base model's losses in `data.cached_losses`, and
    `trainer.max_epochs = chunks` (one round per chunk; later epochs repeat the chunks, rescored).

    Args:
        base_cache: Name under `data.cached_losses` of the base model's (theta_0) losses.
        chunks: Number of rounds / data chunks (5 in the paper).
        ratio: Fraction of the chunk's response tokens kept from round 1 on (0.6 in the paper).
        scope: `chunk` (the paper: one threshold over the round's chunk) or `sequence` (top `ratio`
            of each sample). `global` does not exist here: the reference changes every round.
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    def __init__(
        self,
        base_cache: str = "base",
        chunks: int = 5,
        ratio: float = 0.6,
        scope: Literal["chunk", "sequence"] = "chunk",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks={chunks!r} must be an integer >= 1 (the paper uses 5)")
        if scope == "global":  # the type refuses it too; this says where a global ranking lives
            raise ValueError(
                f"scope={scope!r}: use 'chunk' (the paper) or 'sequence'. A global ranking needs one fixed "
                "reference for the whole dataset: that is TokenCleaningSFT (fixed-model cleaning)."
            )
        check_choices(SelfEvolvingTokenCleaningSFT.__init__, locals())
        self.base = CachedReference(base_cache)
        self.chunks, self.ratio, self.scope = chunks, check_ratio(ratio), scope
        self.round: dict[str, Any] | None = None  # epoch, chunk, sample_ids [n], scores [n, L], threshold
        self._row_of: tuple[torch.Tensor, torch.Tensor] | None = None  # sample_id -> row of round["scores"]

    def prepare_selection(self, datamodule: Any) -> None:
        """Check the DataModule feeds one chunk per epoch with our chunk count and has the base losses."""
        have = getattr(datamodule, "epoch_chunks", None)
        if have != self.chunks:
            raise ValueError(
                f"{type(self).__name__}(chunks={self.chunks}) trains round t on data chunk t, but the "
                f"DataModule has epoch_chunks={have}. Set `data.epoch_chunks: {self.chunks}` (and "
                f"`trainer.max_epochs: {self.chunks}`, one epoch per round)."
            )
        caches = getattr(datamodule, "loss_caches", {})
        if self.base.name not in caches:
            raise ValueError(
                f"{type(self).__name__} needs the base model's cached losses named {self.base.name!r} in "
                f"`data.cached_losses` (have {sorted(caches)}); write them with `lit-tokensel score`."
            )
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if max_epochs is not None and max_epochs != self.chunks:
            rank_zero_warn(
                f"trainer.max_epochs={max_epochs} but chunks={self.chunks}: one epoch is one round"
            )

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """Score the round's chunk before its first step (not in `on_train_epoch_start`, which Lightning
        skips when it resumes inside an epoch or right after a checkpoint taken at an epoch's last batch)."""
        epoch = self.current_epoch
        if epoch > 0 and (self.round is None or self.round["epoch"] != epoch):
            self.round = self.score_round(epoch)

    @torch.no_grad()
    def score_round(self, epoch: int) -> dict[str, Any]:
        """`L_base - L_model` on the round's chunk, with the current model frozen (eval mode, no grad)."""
        dm = self.trainer.datamodule
        chunk = epoch % self.chunks
        positions = train_chunks(dm)[chunk].tolist()
        loader = DataLoader(
            Subset(dm.train_dataset, positions), batch_size=dm.eval_batch_size, collate_fn=dm.train_collator
        )
        ids, rows, responses = [], [], []
        for batch in tqdm(
            loader,
            desc=f"Round {epoch}: scoring chunk {chunk}",
            unit="batch",
            disable=not self.trainer.is_global_zero,
        ):
            batch = as_samples({k: v.to(self.device) for k, v in batch.items()})  # packed rows: per sample
            score = self.base.token_losses(self, batch) - model_token_losses(self.model, batch)  # [B, T-1]
            valid = batch["labels"][:, 1:] != -100  # [B, T-1]
            ids.append(batch["sample_id"].cpu())
            rows.extend(score.float().cpu().unbind(0))
            responses.append(score[valid].float().cpu())
        responses = torch.cat(responses)  # [N] the chunk's response tokens
        threshold = global_threshold(responses, self.ratio) if self.scope == "chunk" else None
        rank_zero_info(
            f"{type(self).__name__} round {epoch}: scored chunk {chunk} ({len(positions)} samples, "
            f"{responses.numel()} response tokens) with the model at the round's start"
            + (f"; threshold {threshold:.4f} keeps the top {self.ratio:.0%}" if threshold is not None else "")
        )
        return {
            "epoch": epoch,
            "chunk": chunk,
            "chunks": self.chunks,
            "sample_ids": torch.cat(ids),
            "scores": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True),
            "threshold": threshold,
        }

    def round_scores(self, sample_ids: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The round's scores of these samples `[B, width]` (joined by sample_id) and which are in its chunk `[B]`."""
        stored, scores = self.round["sample_ids"], self.round["scores"]  # [n], [n, L]
        if self._row_of is None or self._row_of[0] is not stored:
            row_of = torch.full((int(stored.max()) + 1,), -1, dtype=torch.long)
            row_of[stored] = torch.arange(len(stored))
            self._row_of = (stored, row_of)
        row_of = self._row_of[1]
        ids = sample_ids.cpu()
        rows = torch.where(ids < len(row_of), row_of[ids.clamp(max=len(row_of) - 1)], -1)  # [B]
        in_chunk = rows >= 0  # [B]
        out = torch.zeros(len(ids), width)  # [B, width]
        w = min(width, scores.shape[1])
        out[in_chunk, :w] = scores[rows[in_chunk], :w]
        return out.to(sample_ids.device), in_chunk.to(sample_ids.device)

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        if self.round is None:  # round 0: every response token of chunk 0
            return Selection(keep=valid, diagnostics={"round": 0.0})
        score, in_chunk = self.round_scores(batch["sample_id"], valid.shape[1])  # [B, T-1], [B]
        if self.training and not in_chunk.all():
            raise RuntimeError(
                f"round {self.round['epoch']} scored chunk {self.round['chunk']}, but the batch has samples of "
                f"other chunks: the train sampler is not the DataModule's epoch_chunks sampler"
            )
        valid = valid & in_chunk[:, None]  # outside training (inspect), other chunks keep nothing
        scope = "global" if self.scope == "chunk" else self.scope
        keep = select_top(score, valid, self.ratio, scope, self.round["threshold"])
        diagnostics = {"round": float(self.round["epoch"])}
        if self.round["threshold"] is not None:
            diagnostics["chunk_threshold"] = self.round["threshold"]
        return Selection(keep=keep, scores={"influence": score}, diagnostics=diagnostics)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.round is not None:
            checkpoint[CHECKPOINT_KEY] = dict(self.round)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and saved["chunks"] != self.chunks:
            raise ValueError(
                f"the checkpoint was trained with chunks={saved['chunks']}, this run has {self.chunks}"
            )
        self.round = saved
        if saved is not None:
            rank_zero_info(
                f"{type(self).__name__}: round {saved['epoch']} scores restored from the checkpoint"
            )
