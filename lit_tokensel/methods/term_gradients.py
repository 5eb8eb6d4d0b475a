"""Exact gradient accumulation of the loss terms normalised over their own tokens (`LossTerm`).

Mixed into `TokenSelectionModule` (`lit_tokensel.methods.base`, whose docstring states the objective):
without accumulation such a term is folded into the micro-batch's backward with its count all-reduced at
once; with accumulation its gradient sum is collected apart, one flat buffer the size of the trainable
parameters per term, and added to `.grad` at the optimizer step once the window's counts are known.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_tokensel.methods.contract import LossTerm, _TermSums, check_accumulation_support


class TermGradientAccumulation:
    """The own-count terms' part of the training step and of `on_before_optimizer_step`.

    Needs the LightningModule's `trainer`, `device_mesh` and `parameters()`, and the step's
    `_term_window` (per-term sums and counts of the window); owns `_term_grads` (per-term gradient buffers).
    """

    _term_grads: dict[str, torch.Tensor]
    _term_window: dict[str, dict[str, Any]]

    def _own_terms_now_or_later(
        self, main: _TermSums, own: dict[str, tuple[LossTerm, _TermSums]]
    ) -> torch.Tensor:
        """The separately normalised terms: folded into this backward when the window is this micro-batch
        (counts all-reduced now), else their gradient sums collected apart for the step. Returns the loss to add."""
        if self._trainer is not None and self.trainer.training and self.trainer.accumulate_grad_batches > 1:
            active = {
                n: ts
                for n, ts in own.items()
                if ts[0].coefficient and ts[1].loss_sum.requires_grad and bool(ts[1].count > 0)
            }
            if active:
                check_accumulation_support(
                    self.trainer.strategy,
                    self.device_mesh,
                    self.trainer.precision_plugin,
                    type(self).__name__,
                )
                params, views = self._term_buffer_views(list(active))
                for name, (_, sums) in active.items():
                    # Local gradient (autograd.grad does not fire DDP's hooks; summed over ranks at the step);
                    # the graph stays for Lightning's backward of the main loss.
                    grads = torch.autograd.grad(sums.loss_sum, params, retain_graph=True, allow_unused=True)
                    for view, grad in zip(views[name], grads, strict=True):
                        if grad is not None:
                            view.add_(grad)
            return torch.zeros((), device=main.loss_sum.device)
        counts = torch.stack([main.count] + [s.count for _, s in own.values()]).float()  # [1 + K]
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        n_main, *n_terms = counts.tolist()
        extra = torch.zeros((), device=main.loss_sum.device)
        for (term, sums), n_term in zip(own.values(), n_terms, strict=True):
            if n_term > 0 and not (term.needs_main_tokens and n_main == 0):
                # The step divides by N_main: this makes the term's contribution c_k * sum_k / N_k.
                extra = extra + term.coefficient * max(n_main, 1.0) / n_term * sums.loss_sum
        return extra

    def _term_buffer_views(
        self, names: list[str]
    ) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """The trainable parameters, and per term views shaped like them into one flat gradient buffer (zeros)."""
        params = [p for p in self.parameters() if p.requires_grad]
        views = {}
        for name in names:
            if name not in self._term_grads:
                dtypes = {p.dtype for p in params}
                dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
                sizes = [p.numel() for p in params]
                self._term_grads[name] = torch.zeros(sum(sizes), dtype=dtype, device=params[0].device)
            flat = self._term_grads[name]
            views[name] = [
                v.view_as(p)
                for v, p in zip(torch.split(flat, [p.numel() for p in params]), params, strict=True)
            ]
        return params, views

    def _apply_term_gradients(
        self, names: list[str], values: list[float], normalizer: float
    ) -> tuple[float, dict[str, float]]:
        """At the optimizer step: each term's share of the logged loss and its `train/<name>` metric, from the
        window's reduced `(sum, count)` pairs in `values` (in `names` order); adds each collected gradient
        (summed over ranks) as `c_k / N_k` times it, then clears the buffers."""
        loss, metrics = 0.0, {}
        for i, name in enumerate(names):
            term = self._term_window[name]["term"]
            term_sum, term_count = values[2 * i : 2 * i + 2]
            gated = term_count > 0 and not (term.needs_main_tokens and normalizer == 0)
            coefficient = term.coefficient / term_count if gated else 0.0
            loss += coefficient * term_sum
            metrics[f"train/{name}"] = term_sum / max(term_count, 1.0)
            flat = self._term_grads.get(name)
            if flat is not None and coefficient and not term.shares_main_count:
                if self.trainer.world_size > 1:
                    torch.distributed.all_reduce(flat)  # sum over ranks
                self._add_term_gradient(flat, coefficient)
        for flat in self._term_grads.values():
            flat.zero_()
        return loss, metrics

    def _add_term_gradient(self, flat: torch.Tensor, coefficient: float) -> None:
        """`grad += coefficient * buffer` over the trainable parameters (the buffer's layout)."""
        params = [p for p in self.parameters() if p.requires_grad]
        for param, view in zip(params, torch.split(flat, [p.numel() for p in params]), strict=True):
            if param.grad is None:
                param.grad = (coefficient * view).view_as(param).to(param.dtype)
            else:
                param.grad.add_(view.view_as(param), alpha=coefficient)
