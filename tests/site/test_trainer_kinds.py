"""``[trainer] kind``: "gradient" (the default, GradientTrainer on stock onnxruntime) next to "ort".

Config -> build_trainer_setup -> trainer on a synthetic transformer with LoRA: a ``gradient_dir`` is used
as given; a ``bundle_dir`` alone is lowered once into ``<state_dir>/gradient_model`` and reused after;
``[trainer] options`` reach the trainer and options the gradient backend lacks are refused by name. The
aggregator's first global from either folder is the same vector as from the bundle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest_models import batches
from lowering_cases import case_data, make_cache

from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.initial_global import initial_from_trainer
from fedpeft_edge.protocol.config import TrainerSettings
from fedpeft_edge.runtime.errors import InvalidValueError
from fedpeft_edge.runtime.names import TRAINER_KINDS
from fedpeft_edge.site import trainer_setup
from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.trainer_setup import GRADIENT_CACHE, build_trainer_setup
from fedpeft_edge.training.gradient_trainer import GradientTrainer
from fedpeft_edge.training.ort_trainer import OrtTrainer


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("trainer_kinds"))


def _config(tmp_path: Path, trainer: str) -> str:
    return f'[agent]\nstate_dir = "{tmp_path}/state"\nthreads = 1\n[trainer]\n{trainer}\n'


def test_gradient_is_the_default_kind() -> None:
    assert TrainerSettings().kind == "gradient" and TRAINER_KINDS[0] == "gradient"
    assert load_agent_config(text="").trainer.kind == "gradient"


def test_bundle_dir_alone_is_lowered_once_into_the_state_dir(cache, tmp_path, monkeypatch) -> None:
    bundle = cache[0]("lora")
    cfg = load_agent_config(text=_config(tmp_path, f'bundle_dir = "{bundle.directory}"\n'
                                                   'options = { lr = 0.02, optimizer = "c_sgd" }'))
    setup = build_trainer_setup(cfg)
    trainer = setup.trainer
    assert isinstance(trainer, GradientTrainer) and trainer.optimizer_name == "c_sgd"
    assert trainer.lr == pytest.approx(0.02)
    assert setup.spec_hash == bundle.spec_hash and list(setup.train_batches_fn()) == []
    folder = tmp_path / "state" / GRADIENT_CACHE
    assert trainer.bundle.directory == folder and (folder / "gradient.json").is_file()

    # Same values and steps as ORT Training on the bundle.
    ref = OrtTrainer(bundle, lr=0.02, optimizer="c_sgd")
    np.testing.assert_array_equal(trainer.get_flat(), ref.get_flat())
    for batch in batches(case_data("lora", n=32)):
        loss, _ = trainer.train_step(batch)
        assert loss == pytest.approx(ref.train_step(batch)[0], rel=1e-5)
    np.testing.assert_allclose(trainer.get_flat(), ref.get_flat(), atol=1e-5)

    # A second start reuses the folder: no lowering.
    def no_lowering(*args, **kwargs):
        raise AssertionError("lowered again")

    monkeypatch.setattr("fedpeft_edge.peft.lowering.lower_to_gradient_model", no_lowering)
    text = _config(tmp_path, f'bundle_dir = "{bundle.directory}"')
    again = build_trainer_setup(load_agent_config(text=text))
    assert isinstance(again.trainer, GradientTrainer) and again.trainer.bundle.directory == folder


def test_a_stale_cache_of_another_bundle_is_replaced(cache, tmp_path) -> None:
    lora, bitfit = cache[0]("lora"), cache[0]("bitfit")
    folder = tmp_path / "state" / GRADIENT_CACHE
    build_trainer_setup(load_agent_config(text=_config(tmp_path, f'bundle_dir = "{bitfit.directory}"')))
    setup = build_trainer_setup(load_agent_config(text=_config(tmp_path, f'bundle_dir = "{lora.directory}"')))
    assert setup.spec_hash == lora.spec_hash != bitfit.spec_hash
    assert setup.trainer.bundle.spec_hash == lora.spec_hash and setup.trainer.bundle.directory == folder


def test_gradient_dir_is_used_as_given_and_checked_against_the_bundle(cache, tmp_path) -> None:
    lowered, bitfit = cache[1]("lora"), cache[0]("bitfit")
    text = _config(tmp_path, f'gradient_dir = "{lowered.directory}"')
    setup = build_trainer_setup(load_agent_config(text=text))
    assert isinstance(setup.trainer, GradientTrainer) and setup.trainer.bundle.directory == lowered.directory
    assert setup.spec_hash == lowered.spec_hash and not (tmp_path / "state" / GRADIENT_CACHE).exists()
    both = f'gradient_dir = "{lowered.directory}"\nbundle_dir = "{bitfit.directory}"'
    with pytest.raises(InvalidValueError, match="was not lowered from"):
        build_trainer_setup(load_agent_config(text=_config(tmp_path, both)))


@pytest.mark.parametrize(("options", "message"), [
    ('{ optimizer = "ort_adamw" }', "needs kind = 'ort'"),
    ('{ optimizer = "lbfgs" }', "not supported by kind = 'gradient'"),
    ("{ momentum_typo = 0.5 }", "['momentum_typo'] not supported by kind = 'gradient'"),
    ("{ threads = 4 }", "set agent.threads"),
    ("{ lr = -1.0 }", "lr must be a positive"),
])
def test_options_the_gradient_backend_lacks_are_refused(cache, tmp_path, options, message) -> None:
    text = _config(tmp_path, f'gradient_dir = "{cache[1]("lora").directory}"\noptions = {options}')
    with pytest.raises(InvalidValueError) as info:
        build_trainer_setup(load_agent_config(text=text))
    assert message in str(info.value)


def test_missing_folders_and_unknown_kinds(tmp_path) -> None:
    with pytest.raises(InvalidValueError, match=r"needs trainer\.gradient_dir"):
        build_trainer_setup(load_agent_config(text=_config(tmp_path, "")))
    with pytest.raises(InvalidValueError, match="not a gradient model"):
        build_trainer_setup(load_agent_config(text=_config(tmp_path, f'gradient_dir = "{tmp_path}"')))
    with pytest.raises(InvalidValueError, match="must be one of"):
        build_trainer_setup(load_agent_config(text=_config(tmp_path, 'kind = "tensorflow"')))


def test_ort_kind_is_unchanged(cache, tmp_path) -> None:
    bundle = cache[0]("lora")
    text = _config(tmp_path, f'kind = "ort"\nbundle_dir = "{bundle.directory}"\n'
                             'options = { optimizer = "ort_adamw" }')
    setup = build_trainer_setup(load_agent_config(text=text))
    assert isinstance(setup.trainer, OrtTrainer) and setup.trainer.optimizer_name == "ort_adamw"
    assert setup.spec_hash == bundle.spec_hash and not (tmp_path / "state").exists()


def test_aggregator_first_global_for_the_gradient_kind(cache, tmp_path) -> None:
    bundle, lowered = cache[0]("lora"), cache[1]("lora")
    expected = bundle.initial_vector()
    for trainer in (f'gradient_dir = "{lowered.directory}"', f'bundle_dir = "{bundle.directory}"',
                    f'kind = "ort"\nbundle_dir = "{bundle.directory}"'):
        cfg = load_aggregator_config(text=f"[trainer]\n{trainer}\n")
        vector, spec_hash = initial_from_trainer(cfg)
        np.testing.assert_array_equal(vector, expected)
        assert vector.dtype == np.float32 and spec_hash == bundle.spec_hash
    with pytest.raises(InvalidValueError, match="cannot read the gradient model"):
        initial_from_trainer(load_aggregator_config(text=f'[trainer]\ngradient_dir = "{tmp_path}"\n'))


def test_lowering_without_ort_training_says_what_to_do(cache, tmp_path, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise ImportError("No module named 'onnxruntime.training'")

    monkeypatch.setattr("fedpeft_edge.peft.lowering.lower_to_gradient_model", no_training)
    with pytest.raises(InvalidValueError, match=r"set trainer\.gradient_dir"):
        trainer_setup.cached_gradient_model(cache[0]("lora"), tmp_path / "gm")
