"""The one registry of every name a user can choose: PEFT methods, codecs, strategies and policies.

Plain tuples, no numpy: ``fedpeft-edge --help`` lists them without importing the numeric code. The modules
that implement each name check at import time that their implementations match this registry.
"""

from __future__ import annotations

from typing import Final

# peft/spec.py: what part of the base model a site trains.
PEFT_METHODS: Final = ("lora", "ffa_lora", "adapter", "prompt", "bitfit", "select", "head_only", "full")
# protocol/codec.py: how an update is encoded on the wire.
CODEC_MODES: Final = ("fp32", "int8", "topk_fp32", "topk_int8")
DENSE_CODEC_MODES: Final = ("fp32", "int8")
SPARSE_CODEC_MODES: Final = ("topk_fp32", "topk_int8")
GLOBAL_MODES: Final = DENSE_CODEC_MODES  # the downlink global is always dense
# central/strategy.py: how the aggregator turns the round's mean update into the next global.
SERVER_OPTIMIZERS: Final = ("fedavg", "fedavgm", "fedadam", "fedyogi")
LATE_POLICIES: Final = ("drop", "stale_weighted")  # drop late updates, or count them down-weighted
NORM_MODES: Final = ("clip", "reject")
WEIGHTINGS: Final = ("samples", "uniform")
# central/policy.py: how a round's updates are combined (fednova: normalised by each site's local steps).
AGGREGATIONS: Final = ("fedavg", "fednova")
# Byzantine-robust rules that replace the weighted mean at close (central/robust_rules.py)
ROBUST_RULES: Final = ("none", "median", "trimmed_mean", "multi_krum")
# central/policy.py: when the server steps: synchronous rounds (quorum / deadline), or FedBuff's buffer of K
# updates from whichever globals the sites trained from, each discounted by its staleness.
ROUND_MODES: Final = ("sync", "fedbuff")
# How updates of sites below the bundle's LoRA rank are combined (central/core_ranks.py); "off" refuses them
RANK_RULES: Final = ("slotwise", "hetlora", "flexlora")  # the ones that combine mixed ranks
RANK_AGGREGATIONS: Final = (*RANK_RULES, "off")
# site/agent.py: what a site does when a newer global arrives while it trains.
NEWER_GLOBAL_POLICIES: Final = ("finish", "abandon")
# data/partition.py: how a benchmark dataset is split into sites' shares (demos, experiments).
PARTITIONS: Final = ("iid", "dirichlet", "group")
# site/trainer_setup.py: where a site's trainer comes from.
TRAINER_KINDS: Final = ("gradient", "ort", "factory")

__all__ = [
    "AGGREGATIONS",
    "CODEC_MODES",
    "DENSE_CODEC_MODES",
    "GLOBAL_MODES",
    "LATE_POLICIES",
    "NEWER_GLOBAL_POLICIES",
    "NORM_MODES",
    "PARTITIONS",
    "PEFT_METHODS",
    "RANK_AGGREGATIONS",
    "RANK_RULES",
    "ROBUST_RULES",
    "ROUND_MODES",
    "SERVER_OPTIMIZERS",
    "SPARSE_CODEC_MODES",
    "TRAINER_KINDS",
    "WEIGHTINGS",
]
