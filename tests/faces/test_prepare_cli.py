"""`fedpeft-edge prepare` hands a site everything it trains with: the bundle and the gradient model that
stock onnxruntime runs (a site's ``[trainer] gradient_dir``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpeft_edge.faces.cli import main
from fedpeft_edge.peft.artifacts import ArtifactBundle
from fedpeft_edge.peft.lowering import GradientModel
from fedpeft_edge.training.gradient_trainer import GradientTrainer


@pytest.mark.slow  # exports MiniLM and builds artifacts on a cold model cache
def test_prepare_writes_the_bundle_and_the_gradient_model(tmp_path: Path, capsys) -> None:
    bundle_dir, gradient_dir = tmp_path / "bundle", tmp_path / "gradient"
    assert main(["prepare", "--task", "text", "--method", "head_only", "--out", str(bundle_dir),
                 "--gradient-out", str(gradient_dir)]) == 0
    out = capsys.readouterr().out
    assert f"gradient:  {gradient_dir}" in out
    bundle, model = ArtifactBundle.load(bundle_dir), GradientModel.load(gradient_dir)
    model.verify()  # the copy is complete: every file's sha256 matches the manifest
    assert model.spec_hash == bundle.spec_hash and model.param_order == bundle.param_order
    trainer = GradientTrainer(gradient_dir)
    np.testing.assert_array_equal(trainer.get_flat(), bundle.initial_vector())
    # a second prepare never overwrites a folder a site may already use
    assert main(["prepare", "--task", "text", "--method", "head_only", "--gradient-out",
                 str(gradient_dir)]) == 2
