"""The aggregator core's mixed-rank LoRA methods: updates of sites below the bundle's rank.

A rank-``r`` site (``[agent] lora_rank``, peft/rank_slots.py) sends the ``size(r)`` coordinates of its first
``r`` rank slots and says ``lora_rank = r`` among its metrics (as FedNova's ``steps``: the message itself
fixes how it is counted, so a redelivery counts the same). The core

* checks the rank (an integer from 1 to R, and a policy that can take it),
* scatters the update into the rank-``R`` running sum (zero beyond its slots) and books its weight per
  rank beside the sum, in the same atomic state file,
* at close multiplies the weighted mean by ``Σw / (weight of the sites covering the coordinate)``: every
  slot is then averaged over the sites that trained it (``rank_aggregation = "slotwise"``; the rank-aware
  weighting of RBLA, arXiv:2408.08699; exactly FedAvg while every site has the full rank), or
* in a round that mixes ranks, replaces the LoRA factors by a combination of the sites' own adapters (the
  global cut to a site's rank plus its update; central/hetero_rank.py does the arithmetic):
  ``"hetlora"`` is HetLoRA's aggregation as published (Cho et al. 2024): the zero-padded mean over all
  sites, each site's weight times the norm of its ``A_k·B_k`` per LoRA pair, so the slots few sites train
  shrink; ``"flexlora"`` (Bai et al. 2024) re-factorises the weighted mean of the products ``A_k·B_k`` by
  SVD at rank R, so a rank-r site is later sent the best rank-r approximation. A round whose sites all
  have the full rank stays plain FedAvg under every rule.

:class:`RankMethods` is a part of :class:`~fedpeft_edge.central.core.AggregatorCore` kept in its own file.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from fedpeft_edge.central.accumulator import RoundAccumulator
from fedpeft_edge.central.hetero_rank import LoraPair, RankedUpdate, flexlora_aggregate, hetlora_aggregate
from fedpeft_edge.central.robust import BufferedUpdate, RoundPlan
from fedpeft_edge.central.robust_rules import MAX_ROBUST_ELEMENTS
from fedpeft_edge.central.store import StateError
from fedpeft_edge.peft.rank_slots import RANK_METRIC, RankSlots
from fedpeft_edge.protocol.codec import EncodedUpdate, ParsedUpdate, decode_dense, parse
from fedpeft_edge.protocol.reasons import WireFormatError
from fedpeft_edge.protocol.wire import UpdateMessage
from fedpeft_edge.runtime.errors import FedPeftError, InvalidValueError

if TYPE_CHECKING:
    from fedpeft_edge.central.core import AggregatorCore

log = logging.getLogger(__name__)

CUT_WEIGHTS: Final = "rank_cut_weight"  # round stats: {rank: Σ weight} of the updates below rank R


class RankRefused(Exception):
    """An update's rank cannot be counted here: ``reason`` (a rejection reason) and ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class RankMethods:
    """Mixed-rank part of :class:`AggregatorCore` (a mixin: every attribute is the core's)."""

    def _init_ranks(self: AggregatorCore, rank_slots: RankSlots | None) -> None:
        if rank_slots is not None and rank_slots.n_params != self.config.n_params:
            raise InvalidValueError(f"rank slot map covers {rank_slots.n_params} parameters, the fleet's "
                                    f"vector {self.config.n_params}")
        self._rank_slots = rank_slots
        self._rank_index: dict[int, np.ndarray] = {}

    def _check_buffered_ranks(self: AggregatorCore) -> None:
        """A resumed round buffer: every update below rank R holds exactly its rank's values (StateError)."""
        for e in self._state.buffer:
            try:
                parse(e.update, n_params=self._params_of_rank(self.rank_of_entry(e)))
            except (WireFormatError, RankRefused) as exc:
                raise StateError(f"buffered update of {e.client_id} does not fit its rank: {exc}") from exc

    def update_rank(self: AggregatorCore, msg: UpdateMessage) -> int | None:
        """The rank of ``msg`` when below R (None: the full rank); raises :class:`RankRefused`."""
        rank = self._claimed_rank(msg.metrics.get(RANK_METRIC))
        if rank is None:
            return None
        cfg, slots = self.config, self._rank_slots
        assert slots is not None
        clashes = [what for what, on in (("rank_aggregation = 'off'", cfg.rank_aggregation == "off"),
                                         ("a robust_rule", cfg.robust_rule != "none"),
                                         ("differential privacy", cfg.privacy.enabled)) if on]
        if clashes:
            raise RankRefused("rank_not_allowed", f"rank {rank} below the bundle's {slots.max_rank}: this "
                                                  f"federation runs {', '.join(clashes)}")
        return rank

    def _params_of_rank(self: AggregatorCore, rank: int | None) -> int:
        if rank is None:
            return self.config.n_params
        return int(self._indices(rank).size)

    def _indices(self: AggregatorCore, rank: int) -> np.ndarray:
        idx = self._rank_index.get(rank)
        if idx is None:
            assert self._rank_slots is not None
            idx = self._rank_index[rank] = self._rank_slots.indices(rank)
        return idx

    def _dense_update(self: AggregatorCore, enc: EncodedUpdate | ParsedUpdate, rank: int, factor: float
                      ) -> np.ndarray:
        """A rank-``rank`` update times ``factor`` as a rank-R vector (zero beyond its slots)."""
        idx = self._indices(rank)
        full = np.zeros(self.config.n_params, dtype=np.float32)
        full[idx] = decode_dense(enc, int(idx.size)) * np.float32(factor)
        return full

    def _add_update(self: AggregatorCore, acc: RoundAccumulator, enc: EncodedUpdate | ParsedUpdate,
                    rank: int | None, weight: float, factor: float, steps: float) -> None:
        """``acc.accumulate`` for an update of any rank (the fused kernel for the full rank)."""
        if rank is None:
            acc.accumulate(enc, weight, factor, steps)
        else:
            acc.accumulate_dense(self._dense_update(enc, rank, factor), weight, steps)

    def rank_of_entry(self: AggregatorCore, e: BufferedUpdate) -> int | None:
        """A buffered update's rank below R (its metric was checked when it was offered; checked again
        when a round is resumed from disk)."""
        return self._claimed_rank(e.metrics.get(RANK_METRIC))

    def _claimed_rank(self: AggregatorCore, claim: object) -> int | None:
        """The ``lora_rank`` metric as a rank below R (None: absent, or the full rank); RankRefused when
        this aggregator has no layout or the claim is not an integer from 1 to R."""
        if claim is None:
            return None
        slots = self._rank_slots
        if slots is None:
            raise RankRefused("rank_not_allowed", f"{RANK_METRIC} {claim!r}: no LoRA layout here to place "
                              "a lower-rank update (an aggregator needs [trainer] gradient_dir or "
                              "bundle_dir; a line gateway takes full-rank updates only)")
        if not (isinstance(claim, int | float) and not isinstance(claim, bool) and math.isfinite(claim)
                and float(claim).is_integer() and 1 <= claim <= slots.max_rank):
            raise RankRefused("bad_rank", f"{RANK_METRIC} {claim!r} is not a rank from 1 to {slots.max_rank}")
        return None if int(claim) == slots.max_rank else int(claim)

    def _book_rank(self: AggregatorCore, rank: int | None, weight: float) -> None:
        if rank is not None:
            cut = self._state.stats.setdefault(CUT_WEIGHTS, {})
            cut[str(rank)] = cut.get(str(rank), 0.0) + float(weight)

    def _rank_aware(self: AggregatorCore, mean: np.ndarray, cut: dict[int, float], total_weight: float
                    ) -> np.ndarray:
        """``mean`` with every coordinate averaged over the sites that trained it (see module doc)."""
        if self._rank_slots is None or not cut:
            return mean
        factor = self._rank_slots.slotwise_factor(cut, total_weight)
        return mean if factor is None else mean * factor

    def _cut_weights(self: AggregatorCore) -> dict[int, float]:
        return {int(r): float(w) for r, w in self._state.stats.get(CUT_WEIGHTS, {}).items()}

    def _combine_adapters(self: AggregatorCore, plan: RoundPlan | None, mean: np.ndarray
                          ) -> tuple[np.ndarray, dict[str, Any]]:
        """``mean`` with its LoRA factors replaced by HetLoRA's or FlexLoRA's combination of the sites' own
        adapters (see module doc), and the round's figures; the slot-wise ``mean`` where they cannot run."""
        slots, st, cfg = self._rank_slots, self._state, self.config
        rule = cfg.rank_aggregation
        if slots is None:
            return mean, {}
        skipped = None
        if cfg.aggregation != "fedavg":
            skipped = "FedNova normalises updates, not adapters: slot-wise mean"
        elif not cfg.buffers_updates:
            skipped = "no round buffer (every close-time bound is off): slot-wise mean"
        elif plan is None:  # core._plan: the buffer does not hold every counted update (a gateway's partial)
            skipped = "not every update of the round is buffered: slot-wise mean"
        if skipped is not None:
            return mean, {"rank_aggregation_skipped": skipped}
        assert plan is not None
        rows = [(e, w, s * e.update_factor) for e, w, s, inc in
                zip(st.buffer, plan.weights, plan.scales, plan.included, strict=True) if inc and w > 0]
        if not rows or len(rows) * cfg.n_params > MAX_ROBUST_ELEMENTS:
            return mean, {"rank_aggregation_skipped": "no update included, or too many to decode at once"}
        g = st.global_vec
        pairs = [LoraPair(a=a.name, b=b.name, kind="conv" if len(a.shape) == 4 else "matmul")
                 for a, b, _, _ in slots.pairs]
        updates = []
        for e, w, factor in rows:
            rank = self.rank_of_entry(e)
            if rank is None:
                own = g + decode_dense(e.update, cfg.n_params) * np.float32(factor)
            else:  # what the site trained: the global cut to its rank, plus its update
                cut_global = np.where(slots.keep(rank), g, np.float32(0.0))
                own = cut_global + self._dense_update(e.update, rank, factor)
            tensors = {s.name: own[s.offset : s.offset + s.size].reshape(s.shape)
                       for a, b, _, _ in slots.pairs for s in (a, b)}
            # zero-padded to rank R: every site's branch has the bundle's scale, so no rescaling
            updates.append(RankedUpdate(tensors=tensors, rank=slots.max_rank, scale=1.0, weight=float(w)))
        try:
            if rule == "flexlora":
                agg = flexlora_aggregate(updates, pairs, slots.max_rank, scale=1.0)
            else:  # HetLoRA as published: zero-padded mean over all sites, weights times ‖A_k·B_k‖ per pair
                agg = hetlora_aggregate(updates, pairs, slots.max_rank, scale=1.0, norm_weighted=True,
                                        slotwise=False)
        except (FedPeftError, np.linalg.LinAlgError, ValueError) as exc:
            # an SVD that does not converge must not wedge the round: the slot-wise mean closes it
            log.warning("round %d: %s could not combine the adapters (%s); slot-wise mean used", st.round,
                        rule, exc)
            return mean, {"rank_aggregation_skipped": f"{rule} failed: {str(exc)[:120]}: slot-wise mean"}
        out = np.array(mean, dtype=np.float32, copy=True)
        for a, b, _, _ in slots.pairs:
            for s in (a, b):
                out[s.offset : s.offset + s.size] = agg[s.name].reshape(-1) - g[s.offset : s.offset + s.size]
        return out, {"rank_aggregation": rule}


__all__ = ["CUT_WEIGHTS", "RankMethods", "RankRefused"]
