"""The benchmark's ceiling: a method that knows which response tokens were corrupted and drops exactly those."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule


class OracleSFT(TokenSelectionModule):
    """Train on every clean response token and on no corrupted one.

    Args:
        labels_file: JSON list, entry `sample_id` = the 0/1 corruption label of each labeled response
            token of that training row, in order (written by the benchmark from the recorded spans).
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    def __init__(self, labels_file: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.labels_file = labels_file
        self.labels: list[list[int]] = json.loads(Path(labels_file).read_text(encoding="utf-8"))

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        clean = torch.zeros_like(valid)  # [B, T-1]
        for row, sample_id in enumerate(batch["sample_id"].tolist()):
            positions = valid[row].nonzero().flatten()  # [n]
            labels = self.labels[sample_id]
            if len(labels) != len(positions):
                raise ValueError(
                    f"{self.labels_file}: sample {sample_id} has {len(labels)} labels but {len(positions)} "
                    f"response tokens; the labels were written for other data or another max_length"
                )
            clean[row, positions] = torch.tensor(labels, device=valid.device) == 0
        return Selection(keep=clean & valid, scores={"clean": clean.float()})
