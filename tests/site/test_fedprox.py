"""FedProx on the site: ``[trainer] prox_mu`` is read and checked, reaches the trainer the agent builds
(gradient, ort, a factory's — one that would ignore it is refused), and anchors each round's local training
to that round's global adapter, also in the first round after a restart from the state dir. With the same
data and seed, mu > 0 keeps the update the agent sends measurably smaller than mu = 0.

In-process agent (a fake transport, as in test_governor_agent.py) on the synthetic transformer with LoRA,
lowered for the gradient backend (micro-batches of 4 on batches of 16: the site's default).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest_models import batches
from fake_transport import FakeTransport
from lowered_agent import global_message, lowered_agent, sent_update
from lowering_cases import case_data, make_cache

from fedpeft_edge.protocol import wire
from fedpeft_edge.protocol.codec import decode_dense, encode_global
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.trainer_setup import build_trainer_setup
from fedpeft_edge.training.gradient_trainer import GradientTrainer
from fedpeft_edge.training.ort_trainer import OrtTrainer

FLEET = "prox"
STEPS = 6  # local steps per round: 6 batches of 16, no shuffle, the same for every run
SGD = '{ lr = 0.05, optimizer = "c_sgd", momentum = 0.0 }'  # stateless: a restart changes nothing else


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("fedprox"))


def _trainer_section(tmp_path: Path, trainer: str) -> str:
    return f'[agent]\nstate_dir = "{tmp_path}/state"\nthreads = 1\n[trainer]\n{trainer}\n'


# --- configuration ------------------------------------------------------------------------------------------
def test_prox_mu_is_a_trainer_key_and_off_by_default() -> None:
    assert load_agent_config(text="").trainer.prox_mu == 0.0
    assert load_agent_config(text="[trainer]\nprox_mu = 0.01\n").trainer.prox_mu == pytest.approx(0.01)
    mu = load_agent_config(text="[trainer]\nprox_mu = 1\n").trainer.prox_mu  # TOML writes 1 for 1.0
    assert mu == 1.0 and isinstance(mu, float)


@pytest.mark.parametrize("value", ["-0.01", "nan", "inf", '"0.01"', "true"])
def test_a_bad_prox_mu_is_refused_when_the_file_is_read(value: str) -> None:
    with pytest.raises(InvalidValueError, match="prox_mu"):
        load_agent_config(text=f"[trainer]\nprox_mu = {value}\n")


def test_the_trainer_the_agent_builds_has_the_mu(cache, tmp_path: Path) -> None:
    lowered, bundle = cache[1]("lora"), cache[0]("lora")
    text = _trainer_section(tmp_path, f'gradient_dir = "{lowered.directory}"\nprox_mu = 0.05')
    trainer = build_trainer_setup(load_agent_config(text=text)).trainer
    assert isinstance(trainer, GradientTrainer) and trainer.prox_mu == pytest.approx(0.05)
    plain = build_trainer_setup(load_agent_config(
        text=_trainer_section(tmp_path, f'gradient_dir = "{lowered.directory}"'))).trainer
    assert plain.prox_mu == 0.0  # type: ignore[attr-defined]
    ort = build_trainer_setup(load_agent_config(text=_trainer_section(
        tmp_path, f'kind = "ort"\nbundle_dir = "{bundle.directory}"\nprox_mu = 0.2'))).trainer
    assert isinstance(ort, OrtTrainer) and ort.prox_mu == pytest.approx(0.2)


def test_mu_in_options_or_on_a_trainer_that_ignores_it_is_refused(cache, tmp_path: Path) -> None:
    lowered, bundle = cache[1]("lora"), cache[0]("lora")
    kinds = (f'gradient_dir = "{lowered.directory}"', f'kind = "ort"\nbundle_dir = "{bundle.directory}"')
    for trainer in kinds:
        text = _trainer_section(tmp_path, f"{trainer}\noptions = {{ prox_mu = 0.1 }}")
        with pytest.raises(InvalidValueError, match=r"set trainer\.prox_mu instead"):
            build_trainer_setup(load_agent_config(text=text))
    # A factory's trainer without FedProx (the numpy test trainer) must not pass silently...
    factory = 'kind = "factory"\nfactory = "fed_numpy_trainer:make"'
    with pytest.raises(InvalidValueError, match="does not apply it"):
        build_trainer_setup(load_agent_config(text=_trainer_section(tmp_path, f"{factory}\nprox_mu = 0.1")))
    # ...and without prox_mu it is used as before.
    assert build_trainer_setup(load_agent_config(text=_trainer_section(tmp_path, factory))).trainer


# --- training: anchored to the round's global ---------------------------------------------------------------


def _train_batches():
    return batches(case_data("lora", n=16 * STEPS), 16)


def _agent(cache, state_dir: Path, mu: float) -> EdgeAgent:
    return lowered_agent(cache, state_dir, fleet=FLEET, agent=f"local_steps = {STEPS}\nevaluate = false",
                         trainer=f"prox_mu = {mu}\noptions = {SGD}", train=_train_batches)


def _global(cache, rnd: int, vec: np.ndarray) -> wire.GlobalMessage:
    return global_message(cache, FLEET, rnd, vec)


def _sent_delta(agent: EdgeAgent, rnd: int) -> np.ndarray:
    return decode_dense(sent_update(agent, rnd).update, agent.n_params)


def _a_global(cache, seed: int) -> np.ndarray:
    """The bundle's starting adapter moved off its initial values (LoRA's B is 0 there)."""
    start = cache[1]("lora").initial_vector()
    rng = np.random.default_rng(seed)
    return (start + 0.05 * rng.standard_normal(start.size)).astype(np.float32)


def test_mu_keeps_the_sent_update_closer_to_the_global(cache, tmp_path: Path) -> None:
    g = _a_global(cache, 0)
    norms = {}
    for mu in (0.0, 0.5, 2.0):  # same data, order and start: only mu differs
        agent = _agent(cache, tmp_path / f"mu{mu}", mu)
        agent._train_round(_global(cache, 0, g))
        delta = _sent_delta(agent, 0)
        np.testing.assert_allclose(agent.trainer.get_flat() - g, delta, atol=1e-6)  # fp32: the exact update
        norms[mu] = float(np.linalg.norm(delta))
    # The pull toward the global is measurable in one short round and grows with mu (0.39, 0.38, 0.33).
    assert norms[0.0] > norms[0.5] > norms[2.0] > 0, norms
    assert norms[2.0] < 0.9 * norms[0.0], norms


def test_after_a_restart_the_anchor_is_the_new_rounds_global(cache, tmp_path: Path) -> None:
    mu, g0, g1 = 2.0, _a_global(cache, 0), _a_global(cache, 1)
    first = _agent(cache, tmp_path / "site", mu)
    first._train_round(_global(cache, 0, g0))
    trained0 = first.trainer.get_flat()
    # A new process on the same state dir: trainer.state (round 0's trained adapter) is loaded first.
    again = _agent(cache, tmp_path / "site", mu)
    assert again.last_sent_round == 0
    np.testing.assert_array_equal(again.trainer.get_flat(), trained0)
    again._train_round(_global(cache, 1, g1))
    got = again.trainer.get_flat()

    def reference(anchor: np.ndarray) -> np.ndarray:
        t = build_trainer_setup(load_agent_config(text=_trainer_section(
            tmp_path / "ref", f'gradient_dir = "{cache[1]("lora").directory}"\nprox_mu = {mu}\n'
                              f"options = {SGD}"))).trainer
        t.set_flat(g1)
        t.set_prox_reference(anchor)  # type: ignore[attr-defined]
        t.train(_train_batches(), max_steps=STEPS)
        return t.get_flat()

    np.testing.assert_allclose(got, reference(g1), atol=1e-6)
    # The test can tell: anchored to the resumed adapter instead, the result is another vector.
    assert np.abs(reference(trained0) - got).max() > 1e-4


# --- the real model -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mu_reduces_drift_on_minilm_lora_under_a_skewed_share(tmp_path: Path) -> None:
    """MiniLM-L6 + LoRA (query/value, r=8) on the gradient backend with the site's defaults (AdamW, lr 3e-3,
    micro-batches of 4): one site's Dirichlet-0.1 share of Reuters R8, one round of 12 steps of 16 from the
    same global. The update sent with mu = 1 is measurably smaller than with mu = 0, and mu = 0.01 sits
    between them."""
    from fedpeft_edge.data.datasets import load_reuters_r8, subsample
    from fedpeft_edge.data.features import encode_for_model
    from fedpeft_edge.data.partition import partition
    from fedpeft_edge.faces.tasks import get_bundle, get_gradient_model, method_spec
    from fedpeft_edge.models.prepare import prepare_text_model

    prepared = prepare_text_model(max_len=32)
    lowered = get_gradient_model(get_bundle(prepared, method_spec("lora", "text", 8)))
    pool = subsample(load_reuters_r8("train"), 800, seed=0)
    share = pool.take(np.asarray(partition("dirichlet", pool.labels, None, 4, 0.1, 0)[0]))
    inputs = encode_for_model(share, prepared.meta, "text")
    steps, n = 12, min(len(share.labels), 12 * 16)
    data = {**{k: v[:n] for k, v in inputs.items()}, "labels": share.labels[:n]}

    def train_batches():
        for _ in range(1 + steps * 16 // n):  # enough passes for 12 steps, the same order every time
            yield from batches(data, 16)

    g = lowered.initial_vector()
    g = (g + 0.01 * np.random.default_rng(0).standard_normal(g.size)).astype(np.float32)
    norms = {}
    for mu in (0.0, 0.01, 1.0):
        cfg = load_agent_config(text=f"""
[fleet]
name = "{FLEET}"
[agent]
client_id = "site-0"
state_dir = "{tmp_path}/mu{mu}"
local_steps = {steps}
evaluate = false
threads = 2
[codec]
mode = "fp32"
[trainer]
gradient_dir = "{lowered.directory}"
prox_mu = {mu}
""")
        setup = build_trainer_setup(cfg)
        assert setup.trainer.prox_mu == mu  # type: ignore[attr-defined]
        agent = EdgeAgent(cfg, setup.trainer, train_batches, None, spec_hash=lowered.spec_hash)
        agent.transport = FakeTransport()  # type: ignore[assignment]
        agent._train_round(wire.GlobalMessage(FLEET, 0, lowered.spec_hash, encode_global(g), {}))
        norms[mu] = float(np.linalg.norm(_sent_delta(agent, 0)))
    print(f"\n[FedProx, MiniLM LoRA] update norm by mu: {norms}")
    assert norms[0.0] >= norms[0.01] > norms[1.0] > 0, norms
    assert norms[1.0] < 0.9 * norms[0.0], norms
