"""Per-token loss and full-vocabulary predictive entropy without materializing `[B, T, V]` logits.

Only response positions are projected onto the vocabulary, `chunk_size` rows at a time, so the peak
extra memory is a few `[chunk_size, V]` float32 tensors whatever the batch or sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_tokensel.selection.token_loss import shift_labels


def response_nll_and_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token NLL `-log p(x_{j+1} | x_<=j)` and entropy `-sum_v p_v log p_v`, with the response mask.

    `hidden` is the decoder's last hidden state `[B, T, H]`, `labels` `[B, T]`. Returns three `[B, T-1]`
    tensors (float32, 0 off the response) in the shared shifted frame. Meant for no-grad scoring.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    targets, valid = shift_labels(labels)  # [B, T-1] each
    rows = hidden[:, :-1, :][valid]  # [N, H]
    row_targets = targets[valid]  # [N]
    nll = torch.zeros(rows.shape[0], dtype=torch.float32, device=hidden.device)  # [N]
    entropy = torch.zeros_like(nll)  # [N]
    for start in range(0, rows.shape[0], chunk_size):
        stop = start + chunk_size
        logits = F.linear(rows[start:stop], lm_head_weight, lm_head_bias).float()  # [n, V]
        logp = torch.log_softmax(logits, dim=-1)  # [n, V]
        nll[start:stop] = -logp.gather(1, row_targets[start:stop, None]).squeeze(1)
        entropy[start:stop] = -(logp.exp() * logp).sum(dim=-1)
        del logits, logp
    frame = torch.zeros(valid.shape, dtype=torch.float32, device=hidden.device)  # [B, T-1]
    return frame.masked_scatter(valid, nll), frame.masked_scatter(valid, entropy), valid
