"""Bring your own model: any ONNX classifier backbone (an encoder or a CNN) as a prepared model.

``fedpeft-edge prepare --onnx model.onnx`` runs this on the central side. The graph is checked and put into
the shape the PEFT layer expects, or refused with an error that names the node:

- inputs: text models take ``input_ids`` and ``attention_mask`` (int64; ``--input-map`` renames yours);
  a ``token_type_ids`` input becomes zeros of the ids' shape; image models take one float
  ``[batch, channels, H, W]`` input, renamed ``pixel_values``. Any other input is an error naming it.
- the features: the chosen output (``--features-output``, else the only one) becomes ``features
  [batch, D]``: a rank-3 encoder output is mean-pooled over the tokens the mask keeps, a rank-4 feature map
  is average-pooled. The PEFT layer then adds the new head on top.
- training-hostile nodes: control flow (Loop, If, Scan) is refused; a BatchNormalization right after a
  convolution with constant weights is folded into it (ORT Training would run it on batch statistics,
  wrong for a frozen backbone fine-tuned on small site batches), any other BatchNormalization is refused.
- ``Transpose(W) -> MatMul`` pairs are stored as ``MatMul(x, W^T)`` so LoRA sees each weight.

The result is cached like the built-in exports, keyed by the source's sha256 and these settings.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft_edge.data.prepared_model import PreparedModel, load_prepared_entry
from fedpeft_edge.models.export_text import _fold_weight_transposes
from fedpeft_edge.models.prepare import _build_entry, _cache_key, _cached_sha256, default_cache_dir
from fedpeft_edge.runtime.errors import FedPeftError, ensure

BYO_CODE_VERSION = 1
TEXT_INPUTS = ("input_ids", "attention_mask")
IMAGE_INPUT = "pixel_values"
FEATURES = "features"
# Ops ORT Training cannot differentiate through (or that make a graph data-dependent): refused by name.
UNSUPPORTED_OPS = frozenset(
    {
        "Loop",
        "If",
        "Scan",
        "SequenceConstruct",
        "SequenceAt",
        "SplitToSequence",
        "ConcatFromSequence",
        "NonMaxSuppression",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
    }
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnsupportedGraphError(FedPeftError):
    """The model cannot be prepared for federated PEFT; the message names the node or input."""


def _node_label(node: Any) -> str:
    return f"node {node.name or '(unnamed)'!r} ({node.op_type})"


def _graph_inputs(graph: Any) -> list[Any]:
    inits = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def _rename_value(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            if v.name == old:
                v.name = new


def _fold_batchnorms(graph: Any) -> int:
    """Fold ``Conv(W[, b]) -> BatchNormalization`` into the convolution; refuse any other BatchNorm."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded = []
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        conv = producer.get(bn.input[0])
        params = bn.input[1:5]
        if (
            conv is None
            or conv.op_type != "Conv"
            or conv.input[1] not in inits
            or consumers.get(conv.output[0], 0) != 1
            or not all(p in inits for p in params)
            or (len(bn.output) > 1 and any(bn.output[1:]))
        ):
            raise UnsupportedGraphError(
                f"{_node_label(bn)} does not follow a convolution with constant weights, so it cannot be "
                "folded; ORT Training would run it on batch statistics. Export the model with batch norm "
                "folded (or in eval mode with constant folding)"
            )
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + eps)
        w_init = inits[conv.input[1]]
        w = numpy_helper.to_array(w_init).astype(np.float64)
        w_init.CopyFrom(
            numpy_helper.from_array((w * scale[:, None, None, None]).astype(np.float32), w_init.name)
        )
        if len(conv.input) > 2 and conv.input[2]:
            b_init = inits[conv.input[2]]
            b = numpy_helper.to_array(b_init).astype(np.float64)
            b_init.CopyFrom(
                numpy_helper.from_array(((b - mean) * scale + beta).astype(np.float32), b_init.name)
            )
        else:
            bias_name = f"{conv.name or conv.output[0]}.bias"
            graph.initializer.append(
                numpy_helper.from_array((beta - mean * scale).astype(np.float32), bias_name)
            )
            if len(conv.input) == 2:
                conv.input.append(bias_name)
            else:
                conv.input[2] = bias_name
        conv.output[0] = bn.output[0]  # the convolution now writes what the batch norm wrote
        folded.append(bn)
    for bn in folded:
        graph.node.remove(bn)
    return len(folded)


def _shape_of(model: Any, name: str) -> list[int | None] | None:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    for v in list(inferred.graph.output) + list(inferred.graph.value_info):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    return None


def _pool_features(model: Any, source: str, kind: str) -> str:
    """Nodes that turn ``source`` into ``features [batch, D]``; returns the name holding the features."""
    from onnx import TensorProto, helper

    graph = model.graph
    shape = _shape_of(model, source)
    ensure(
        shape is not None,
        f"the rank of output {source!r} cannot be inferred: give a model with shapes",
        raising=UnsupportedGraphError,
    )
    rank = len(shape)  # type: ignore[arg-type]
    nodes = []
    if rank == 2:
        return source
    if rank == 3 and kind == "text":
        # Mean over the tokens the attention mask keeps (padding must not dilute the sentence vector).
        nodes = [
            helper.make_node(
                "Cast", ["attention_mask"], ["byo_mask_f"], to=TensorProto.FLOAT, name="byo_mask_cast"
            ),
            helper.make_node(
                "Unsqueeze", ["byo_mask_f", "byo_axis_last"], ["byo_mask_3d"], name="byo_mask_3d"
            ),
            helper.make_node("Mul", [source, "byo_mask_3d"], ["byo_masked"], name="byo_masked"),
            helper.make_node(
                "ReduceSum", ["byo_masked", "byo_axis_tokens"], ["byo_sum"], keepdims=0, name="byo_sum"
            ),
            helper.make_node(
                "ReduceSum", ["byo_mask_3d", "byo_axis_tokens"], ["byo_count"], keepdims=0, name="byo_count"
            ),
            helper.make_node("Max", ["byo_count", "byo_one"], ["byo_count_safe"], name="byo_count_safe"),
            helper.make_node("Div", ["byo_sum", "byo_count_safe"], [FEATURES + "_pooled"], name="byo_mean"),
        ]
        graph.initializer.extend(
            [
                helper.make_tensor("byo_axis_last", TensorProto.INT64, [1], [-1]),
                helper.make_tensor("byo_axis_tokens", TensorProto.INT64, [1], [1]),
                helper.make_tensor("byo_one", TensorProto.FLOAT, [], [1e-9]),
            ]
        )
    elif rank == 4:
        nodes = [
            helper.make_node("GlobalAveragePool", [source], ["byo_gap"], name="byo_gap"),
            helper.make_node("Flatten", ["byo_gap"], [FEATURES + "_pooled"], axis=1, name="byo_flatten"),
        ]
    else:
        raise UnsupportedGraphError(
            f"output {source!r} has rank {rank}; expected [batch, D], a text encoder's "
            "[batch, tokens, D] or a CNN's [batch, C, H, W]"
        )
    graph.node.extend(nodes)
    return FEATURES + "_pooled"


def _prune_unreachable(graph: Any) -> int:
    """Drop the nodes and initializers the outputs do not depend on (e.g. a BERT pooler beside the
    token states): PEFT must not put trainable weights where no gradient reaches. Returns nodes dropped."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraph inputs count too (none survive the op check, but be safe)
                needed.update(i for g in attr.graphs for n in g.node for i in n.input)
    dropped = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return dropped


def _parse_input_map(pairs: Mapping[str, str] | None) -> dict[str, str]:
    """``{"ids": "input_ids"}``: the model's input name -> ours."""
    return dict(pairs or {})


def refuse_unsupported(graph: Any) -> None:
    """Control flow, random ops and custom domains cannot be trained on a site: refused by node name."""
    for node in graph.node:
        if node.op_type in UNSUPPORTED_OPS:
            raise UnsupportedGraphError(
                f"{_node_label(node)} is not supported: control flow and random ops "
                "cannot be trained on the sites; export a graph without it"
            )
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            raise UnsupportedGraphError(
                f"{_node_label(node)} is from the custom domain {node.domain!r}, "
                "which the sites' onnxruntime does not have"
            )


def normalise_graph(
    model: Any, *, kind: str | None, features_output: str | None, input_map: Mapping[str, str] | None
) -> tuple[Any, str, list[str], dict[str, Any]]:
    """The model rewritten into the prepared shape; returns (model, kind, input names, facts)."""
    from onnx import TensorProto, helper

    graph = model.graph
    refuse_unsupported(graph)
    for theirs, ours in _parse_input_map(input_map).items():
        ensure(
            any(i.name == theirs for i in graph.input),
            f"--input-map names {theirs!r}, which is not an "
            f"input of the model (inputs: {[i.name for i in _graph_inputs(graph)]})",
            raising=UnsupportedGraphError,
        )
        _rename_value(graph, theirs, ours)
    inputs = _graph_inputs(graph)
    int_inputs = [i for i in inputs if i.type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32)]
    guessed = "text" if int_inputs else "image"
    kind = kind or guessed
    ensure(
        kind in ("text", "image"), f"kind must be text or image, got {kind!r}", raising=UnsupportedGraphError
    )
    facts: dict[str, Any] = {}
    if kind == "text":
        names = {i.name for i in inputs}
        missing = [n for n in TEXT_INPUTS if n not in names]
        ensure(
            not missing,
            f"a text model needs inputs {list(TEXT_INPUTS)}; missing {missing} (inputs: "
            f"{sorted(names)}; rename with --input-map theirs=input_ids,...)",
            raising=UnsupportedGraphError,
        )
        for extra in [i for i in inputs if i.name not in TEXT_INPUTS]:
            if extra.name != "token_type_ids":
                raise UnsupportedGraphError(
                    f"input {extra.name!r} is not one a site can feed (it feeds "
                    f"{list(TEXT_INPUTS)}, and zeros for token_type_ids)"
                )
            # Single-segment classification: token types are all zero, shaped like the ids.
            graph.input.remove(extra)
            graph.node.insert(
                0, helper.make_node("Shape", ["input_ids"], ["byo_ids_shape"], name="byo_ids_shape")
            )
            graph.node.insert(
                1,
                helper.make_node(
                    "ConstantOfShape",
                    ["byo_ids_shape"],
                    [extra.name],
                    name="byo_token_types",
                    value=helper.make_tensor("zero", extra.type.tensor_type.elem_type, [1], [0]),
                ),
            )
            facts["token_type_ids"] = "zeros"
        for i in graph.input:
            if i.name in TEXT_INPUTS and i.type.tensor_type.elem_type != TensorProto.INT64:
                raise UnsupportedGraphError(f"input {i.name!r} must be int64 (sites feed int64 token ids)")
        input_names = list(TEXT_INPUTS)
    else:
        ensure(
            len(inputs) == 1,
            f"an image model has one input; this one has {[i.name for i in inputs]}",
            raising=UnsupportedGraphError,
        )
        (image,) = inputs
        dims = [d.dim_value if d.HasField("dim_value") else None for d in image.type.tensor_type.shape.dim]
        ensure(
            len(dims) == 4 and image.type.tensor_type.elem_type == TensorProto.FLOAT,
            f"input {image.name!r} must be float [batch, channels, H, W]",
            raising=UnsupportedGraphError,
        )
        facts.update(channels=dims[1], height=dims[2], width=dims[3])
        if image.name != IMAGE_INPUT:
            _rename_value(graph, image.name, IMAGE_INPUT)
        input_names = [IMAGE_INPUT]
    facts["folded_batchnorms"] = _fold_batchnorms(graph)
    outputs = [o.name for o in graph.output]
    chosen = features_output or (outputs[0] if len(outputs) == 1 else None)
    ensure(
        chosen is not None,
        f"the model has outputs {outputs}: choose one with --features-output",
        raising=UnsupportedGraphError,
    )
    ensure(
        chosen in outputs,
        f"--features-output {chosen!r} is not an output of the model ({outputs})",
        raising=UnsupportedGraphError,
    )
    if chosen == FEATURES:  # keep the name free for our own output
        _rename_value(graph, FEATURES, "byo_source_features")
        chosen = "byo_source_features"
    pooled = _pool_features(model, chosen, kind)
    graph.node.append(helper.make_node("Identity", [pooled], [FEATURES], name="byo_features"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", None]))
    facts["pruned_nodes"] = _prune_unreachable(graph)
    return model, kind, input_names, facts


def _dummy_feeds(kind: str, facts: Mapping[str, Any], image_size: int) -> dict[str, np.ndarray]:
    if kind == "text":
        ids = np.ones((2, 8), dtype=np.int64)  # id 1 is inside every vocabulary
        mask = np.ones((2, 8), dtype=np.int64)
        mask[1, 5:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    channels = int(facts.get("channels") or 3)
    return {IMAGE_INPUT: np.zeros((2, channels, image_size, image_size), dtype=np.float32)}


def prepare_onnx_model(
    source: str | Path,
    *,
    kind: str | None = None,
    features_output: str | None = None,
    input_map: Mapping[str, str] | None = None,
    tokenizer: str | Path | None = None,
    max_len: int = 64,
    image_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cache_dir: Path | None = None,
) -> PreparedModel:
    """A plant's own ONNX backbone as a :class:`PreparedModel` (cached), ready for any PEFT method."""
    import onnx

    from fedpeft_edge.runtime.ort_import import ort

    source = Path(source)
    ensure(source.is_file(), f"model file not found: {source}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tokenizer_path = Path(tokenizer) if tokenizer is not None else None
    key = _cache_key(
        {
            "source_sha256": _cached_sha256(source, cache_dir),
            "kind": kind,
            "features_output": features_output,
            "input_map": sorted(_parse_input_map(input_map).items()),
            "image_size": image_size,
            "tokenizer_sha256": _cached_sha256(tokenizer_path, cache_dir) if tokenizer_path else None,
            "mean": list(mean),
            "std": list(std),
            "code_version": BYO_CODE_VERSION,
        }
    )
    entry_name = f"byo-{source.stem[:32]}-{key}"

    def build(tmp: Path) -> dict[str, Any]:
        try:
            model = onnx.load(str(source))
        except Exception as exc:  # onnx raises several unrelated types for a bad file
            raise UnsupportedGraphError(f"{source} is not a valid ONNX model: {exc}") from exc
        refuse_unsupported(model.graph)  # first: it names the node, the checker may not
        try:
            onnx.checker.check_model(model)
        except Exception as exc:  # onnx raises several unrelated types for a bad file
            raise UnsupportedGraphError(f"{source} is not a valid ONNX model: {exc}") from exc
        model, kind_, input_names, facts = normalise_graph(
            model, kind=kind, features_output=features_output, input_map=input_map
        )
        onnx_path = tmp / "model.onnx"
        onnx.save(model, str(onnx_path))
        facts["folded_weight_transposes"] = _fold_weight_transposes(onnx_path)
        size = image_size or facts.get("height")
        if kind_ == "image":
            ensure(
                isinstance(size, int) and size >= 8 and facts.get("height") in (None, facts.get("width")),
                "the image size is not fixed in the model: give --image-size",
                raising=UnsupportedGraphError,
            )
        if kind_ == "text" and (tokenizer_path is None or not tokenizer_path.is_file()):
            raise UnsupportedGraphError(
                "a text model needs its tokenizer.json (--tokenizer): sites tokenise with it"
            )
        options = ort().SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort().InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            (features,) = session.run([FEATURES], _dummy_feeds(kind_, facts, int(size or 32)))
        except Exception as exc:  # ORT's message names the failing node
            raise UnsupportedGraphError(f"onnxruntime cannot run the prepared graph: {exc}") from exc
        ensure(
            features.ndim == 2 and np.all(np.isfinite(features)),
            f"features came out with shape {features.shape}; expected [batch, D] and finite",
            raising=UnsupportedGraphError,
        )
        # The head is sized from the declared output shape: write the measured width into it.
        declared = onnx.load(str(onnx_path))
        dims = declared.graph.output[0].type.tensor_type.shape.dim
        dims[1].ClearField("dim_param")
        dims[1].dim_value = int(features.shape[1])
        onnx.save(declared, str(onnx_path))
        meta: dict[str, Any] = {
            "model_name": source.name,
            "source_sha256": _cached_sha256(source, cache_dir),
            "byo": facts,
            "code_version": BYO_CODE_VERSION,
        }
        path_keys: list[str] = []
        if kind_ == "text":
            ensure(
                tokenizer_path is not None and tokenizer_path.is_file(),
                "a text model needs its tokenizer.json (--tokenizer): sites tokenise with it",
                raising=UnsupportedGraphError,
            )
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")  # type: ignore[arg-type]
            meta.update(tokenizer_json="tokenizer.json", pooling="masked_mean", max_len=max_len)
            path_keys = ["tokenizer_json"]
        else:
            meta.update(
                image_size=int(size),
                mean=list(mean),
                std=list(std),  # type: ignore[arg-type]
                channels=int(facts.get("channels") or 3),
            )
        return {
            "onnx_file": "model.onnx",
            "kind": kind_,
            "input_names": input_names,
            "feature_dim": int(features.shape[1]),
            "path_meta_keys": path_keys,
            "meta": meta,
        }

    prepared = load_prepared_entry(cache_dir / entry_name)
    if prepared is None:
        prepared = _build_entry(cache_dir, entry_name, build)
    if prepared.kind == "text":
        return PreparedModel(
            prepared.onnx_path,
            prepared.kind,
            prepared.input_names,
            prepared.feature_dim,
            {**prepared.meta, "max_len": max_len},
        )
    return prepared


def default_targets(prepared: PreparedModel, pattern: str | None = None) -> dict[str, Any]:
    """LoRA/adapter targets for a prepared BYO model: the weight-carrying op types its graph really has
    (MatMul or Gemm for encoders, 1x1 Conv for CNNs), over initializer names matching ``pattern``."""
    import onnx

    graph = onnx.load(str(prepared.onnx_path), load_external_data=False).graph
    inits = {i.name: list(i.dims) for i in graph.initializer}
    present = set()
    for node in graph.node:
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight not in inits:
            continue
        if node.op_type in ("MatMul", "Gemm") and len(inits[weight]) == 2:
            present.add(node.op_type)
        elif node.op_type == "Conv" and inits[weight][2:] == [1, 1]:
            present.add("Conv")
    wanted = ("MatMul", "Gemm") if prepared.kind == "text" else ("Conv",)
    ops = tuple(op for op in wanted if op in present)
    ensure(
        ops,
        f"the model has no {' or '.join(wanted)} node with a weight initializer for LoRA or adapters; "
        "use bitfit, select or head_only",
        raising=UnsupportedGraphError,
    )
    return {"targets": (pattern or ".*",), "target_ops": ops}


def describe_prepared(prepared: PreparedModel) -> str:
    return json.dumps(
        {
            "kind": prepared.kind,
            "inputs": list(prepared.input_names),
            "feature_dim": prepared.feature_dim,
            "byo": prepared.meta.get("byo"),
        }
    )


__all__ = [
    "UNSUPPORTED_OPS",
    "UnsupportedGraphError",
    "default_targets",
    "describe_prepared",
    "normalise_graph",
    "prepare_onnx_model",
    "refuse_unsupported",
]
