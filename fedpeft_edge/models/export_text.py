"""Export all-MiniLM-L6-v2 to an ONNX feature extractor (named ``[in, out]`` Linear weights, masked mean).

Each ``Linear`` becomes ``MatMul(x, W) -> Add(b)`` where ``W`` is the initializer
``bert.encoder.layer.{i}.attention.self.{query,value}.weight`` stored MatMul-ready as ``[in, out]`` (the
transpose of torch's ``[out, in]``; the exporter's ``Transpose`` node is folded into the named initializer)
and ``b`` is ``...{query,value}.bias``. Output ``features`` = masked mean of the last hidden states,
``[batch, 384]``. torch/transformers are imported inside :func:`_export_text` only.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from fedpeft_edge.models.toolchain import (
    EXPORT_CODE_VERSION,
    OPSET,
    PREPARE_INSTALL_HINT,
    TEXT_PACKAGE,
    _ort_run,
    _package_version,
    _quiet_export,
    _require_torch,
    _sha256_file,
    _torch_threads,
)
from fedpeft_edge.runtime.errors import FedPeftError, MissingDependencyError

# Parity checks between torch and ONNX Runtime at export time.
TEXT_PARITY_ATOL = 1e-5
_PARITY_SENTENCES = (
    "The quarterly earnings beat analyst expectations.",
    "Crude oil prices fell sharply on Monday after OPEC talks.",
    "a",
    "Federated learning keeps raw data on the device while only small adapter updates travel over MQTT "
    "to the aggregator, which averages them and publishes a new global adapter for the next round.",
)


def _export_text(out_dir: Path, weights: Path, tokenizer_json: Path) -> dict[str, Any]:
    torch = _require_torch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
        from transformers import BertModel
    except ImportError as exc:
        raise MissingDependencyError(
            f"exporting the text model needs transformers; install it with `{PREPARE_INSTALL_HINT}`"
        ) from exc
    import numpy as np
    from tokenizers import Tokenizer

    started = time.perf_counter()
    previous_verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report lists the unused pooler weights
    transformers.logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(
            str(weights.parent), attn_implementation="eager", add_pooling_layer=False, local_files_only=True
        ).eval()
    finally:
        transformers.logging.set_verbosity(previous_verbosity)

    class MeanPooledBert(torch.nn.Module):
        """BERT encoder + attention-masked mean over tokens (the sentence-transformers pooling)."""

        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.bert = encoder

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            # token_type_ids are always zero for single-sentence inputs, so they are not a graph input.
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    wrapper = MeanPooledBert(bert).eval()
    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(max_length=32)
    tok.enable_padding(length=32, pad_id=tok.token_to_id("[PAD]") or 0)
    encodings = tok.encode_batch(list(_PARITY_SENTENCES))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)

    onnx_path = out_dir / "model.onnx"
    with torch.no_grad(), _torch_threads(torch), _quiet_export():
        torch.onnx.export(
            wrapper,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(onnx_path),
            input_names=["input_ids", "attention_mask"],
            output_names=["features"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "features": {0: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            dynamo=False,
        )
    folded_transposes = _fold_weight_transposes(onnx_path)
    export_seconds = time.perf_counter() - started

    # Parity at a batch/sequence shape different from the traced one (dynamic axes must really be dynamic).
    max_diff = 0.0
    for rows, seq in ((slice(None), 32), (slice(1, 4), 11)):
        feeds = {"input_ids": ids[rows, :seq].copy(), "attention_mask": mask[rows, :seq].copy()}
        with torch.no_grad():
            expected = wrapper(
                torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
            )
        got = _ort_run(onnx_path, feeds)
        max_diff = max(max_diff, float(np.max(np.abs(got - expected.numpy()))))
    if not max_diff <= TEXT_PARITY_ATOL:
        raise FedPeftError(f"exported text model differs from torch by {max_diff:.3g} (> {TEXT_PARITY_ATOL})")

    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    return {
        "onnx_file": "model.onnx",
        "kind": "text",
        "input_names": ["input_ids", "attention_mask"],
        "feature_dim": int(bert.config.hidden_size),
        "path_meta_keys": ["tokenizer_json"],
        "meta": {
            "model_name": "sentence-transformers/all-MiniLM-L6-v2",
            "tokenizer_json": "tokenizer.json",
            "pad_token_id": int(tok.token_to_id("[PAD]") or 0),
            "max_position_embeddings": int(bert.config.max_position_embeddings),
            "pooling": "masked_mean",
            "linear_weight_layout": "in_out",
            "folded_weight_transposes": folded_transposes,
            "opset": OPSET,
            "source_package": TEXT_PACKAGE,
            "source_version": _package_version(TEXT_PACKAGE),
            "source_weights_sha256": _sha256_file(weights),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "export_seconds": round(export_seconds, 3),
            "parity_max_abs_diff": max_diff,
            "code_version": EXPORT_CODE_VERSION,
        },
    }


def _fold_weight_transposes(onnx_path: Path) -> int:
    """Replace ``Transpose(W) -> MatMul`` by ``MatMul(x, W^T)`` with ``W^T`` stored under ``W``'s name.

    The legacy exporter without constant folding keeps torch's ``[out, in]`` Linear weights and transposes
    them at run time. Storing them ``[in, out]`` keeps the names, lets PEFT surgery see the weight as the
    MatMul's own initializer input and saves a transpose per layer per step. Returns how many were folded.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {out.name for out in graph.output}
    to_remove = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        weight = inits[node.input[0]]
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        users = consumers.get(node.output[0], [])
        if (
            len(weight.dims) != 2
            or perm != [1, 0]
            or len(consumers.get(weight.name, [])) != 1  # W used elsewhere in torch layout: leave it
            or node.output[0] in graph_outputs
            or not users
            or any(user.op_type != "MatMul" or list(user.input).index(node.output[0]) != 1 for user in users)
        ):
            continue
        transposed = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name)
        weight.CopyFrom(transposed)
        for user in users:
            user.input[1] = weight.name
        to_remove.append(node)
    for node in to_remove:
        graph.node.remove(node)
    onnx.save(model, str(onnx_path))
    return len(to_remove)
