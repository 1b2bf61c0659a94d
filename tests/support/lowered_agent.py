"""An in-process agent on the synthetic transformer with LoRA and a head (``lowering_cases``' "lora" case),
lowered for the gradient backend, behind a fake transport: what the site tests of FedProx, personalisation
and LoRA rank cuts drive one round at a time (``agent._train_round(global_message(...))``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from fake_transport import FakeTransport

from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import encode_global
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.trainer_setup import build_trainer_setup

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]


def lowered_agent(cache: Any, state_dir: Path, *, fleet: str, agent: str = "", codec: str = 'mode = "fp32"',
                  trainer: str = "", train: Batches, evaluate: Batches | None = None) -> EdgeAgent:
    """Site ``site-0`` of ``fleet`` with extra ``[agent]``, ``[codec]`` and ``[trainer]`` lines (TOML)."""
    lowered = cache[1]("lora")
    cfg = load_agent_config(text=f"""
[fleet]
name = "{fleet}"
[agent]
client_id = "site-0"
state_dir = "{state_dir}"
{agent}
[codec]
{codec}
[trainer]
gradient_dir = "{lowered.directory}"
{trainer}
""")
    setup = build_trainer_setup(cfg)
    site = EdgeAgent(cfg, setup.trainer, train, evaluate, spec_hash=lowered.spec_hash)
    site.transport = FakeTransport()  # type: ignore[assignment]
    return site


def global_message(cache: Any, fleet: str, rnd: int, vec: np.ndarray) -> wire.GlobalMessage:
    """The fp32 global of round ``rnd`` for the lowered "lora" case."""
    return wire.GlobalMessage(fleet, rnd, cache[1]("lora").spec_hash, encode_global(vec), {})


def sent_update(agent: EdgeAgent, rnd: int) -> wire.UpdateMessage:
    """The update the agent made for round ``rnd`` (from its outgoing queue, as the broker would get it)."""
    return wire.decode_update(next(e for e in agent._outgoing if e.round == rnd).data)
