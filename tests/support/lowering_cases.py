"""PEFT cases on the synthetic backbones for the lowering and gradient-trainer tests: bundles (ORT Training)
and their lowered gradient models, generated once per test module and cached by case name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from conftest_models import conv_model, image_data, mlp_data, mlp_model, save, text_data, transformer_model

from fedpeft_edge.peft.artifacts import ArtifactBundle, generate_artifacts
from fedpeft_edge.peft.lowering import GradientModel, lower_to_gradient_model
from fedpeft_edge.peft.spec import PeftSpec

QV = [r"attention\.self\.(query|value)"]

CASES: dict[str, tuple[str, PeftSpec]] = {
    "lora": ("tf", PeftSpec("lora", targets=QV, rank=4, head_classes=3)),
    "ffa_lora": ("tf", PeftSpec("ffa_lora", targets=QV, rank=4, head_classes=3)),
    "adapter": ("tf", PeftSpec("adapter", targets=[r"output\.dense"], adapter_dim=4, head_classes=3)),
    "prompt": ("tf", PeftSpec("prompt", num_virtual_tokens=3, head_classes=3)),
    "bitfit": ("tf", PeftSpec("bitfit", head_classes=3)),
    "select": ("tf", PeftSpec("select", select_patterns=["LayerNorm"], head_classes=3)),
    "head_only": ("tf", PeftSpec("head_only", head_classes=3)),
    "full": ("tf", PeftSpec("full", head_classes=3)),
    "conv_lora": ("conv", PeftSpec("lora", target_ops=["Conv"], rank=2, head_classes=3)),
    "conv_adapter": ("conv", PeftSpec("adapter", target_ops=["Conv"], adapter_dim=4,
                                      adapter_activation="relu", head_classes=3)),
    # a trained 3x3 stride-2 stem: the weight gradient of a strided, padded convolution
    "conv_select": ("conv", PeftSpec("select", select_patterns=["stem", "pw"], head_classes=3)),
    "gemm_lora": ("gemm", PeftSpec("lora", target_ops=["Gemm", "MatMul"], rank=2, head_classes=3)),
}


def case_data(case: str, n: int = 48, seed: int = 1) -> dict[str, np.ndarray]:
    model = CASES[case][0]
    if model == "gemm":
        return mlp_data(n=n, seed=seed)
    return (text_data if model == "tf" else image_data)(n=n, seed=seed)


def make_cache(root: Path) -> tuple[Callable[[str], ArtifactBundle], Callable[[str], GradientModel]]:
    """(bundle(case), lowered(case)) with everything generated on first use under ``root``."""
    builders = {"tf": transformer_model, "conv": conv_model, "gemm": lambda: mlp_model(gemm=True)}
    paths: dict[str, Path] = {}
    bundles: dict[str, ArtifactBundle] = {}
    lowered: dict[str, GradientModel] = {}

    def bundle(case: str) -> ArtifactBundle:
        if case not in bundles:
            model, spec = CASES[case]
            if model not in paths:
                paths[model] = save(builders[model](), root / f"{model}.onnx")
            bundles[case] = generate_artifacts(paths[model], spec, root / "bundles" / case)
        return bundles[case]

    def lower(case: str) -> GradientModel:
        if case not in lowered:
            lowered[case] = lower_to_gradient_model(bundle(case), root / "lowered" / case)
        return lowered[case]

    return bundle, lower
