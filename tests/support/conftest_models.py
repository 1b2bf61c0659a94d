"""Small synthetic ONNX backbones (built with onnx.helper) and batches for PEFT/trainer tests.

Each backbone outputs ``features`` [batch, dim] like the real prepared models, so the same PEFT code
paths run. Data are learnable: labels depend on the inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(array, order="C"), name)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "synthetic", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp_model(in_dim: int = 12, hidden: int = 16, feat: int = 8, seed: int = 0, gemm: bool = False
              ) -> onnx.ModelProto:
    """x[B,in] -> MatMul+Add -> Relu -> (MatMul|Gemm transB) + bias -> features[B,feat]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.4, (in_dim, hidden)).astype(np.float32)
    b1 = rng.normal(0, 0.1, hidden).astype(np.float32)
    w2 = rng.normal(0, 0.4, (hidden, feat)).astype(np.float32)
    b2 = rng.normal(0, 0.1, feat).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"], name="/fc1/MatMul"),
             helper.make_node("Add", ["fc1.bias", "h0"], ["h1"], name="/fc1/Add"),
             helper.make_node("Relu", ["h1"], ["h2"], name="/act/Relu")]
    inits = [_init("fc1.weight", w1), _init("fc1.bias", b1), _init("fc2.bias", b2)]
    if gemm:
        nodes.append(helper.make_node("Gemm", ["h2", "fc2.weight", "fc2.bias"], ["features"],
                                      name="/fc2/Gemm", transB=1, alpha=0.5))
        inits.append(_init("fc2.weight", np.ascontiguousarray(w2.T)))
    else:
        nodes += [helper.make_node("MatMul", ["h2", "fc2.weight"], ["h3"], name="/fc2/MatMul"),
                  helper.make_node("Add", ["h3", "fc2.bias"], ["features"], name="/fc2/Add")]
        inits.append(_init("fc2.weight", w2))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_dim])],
                  [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", feat])], inits)


def transformer_model(vocab: int = 40, hidden: int = 16, ffn: int = 32, seed: int = 0) -> onnx.ModelProto:
    """One-layer, one-head encoder with masked attention and masked mean pooling (BERT-shaped names)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, s: float = 0.3) -> np.ndarray:
        return rng.normal(0, s, shape).astype(np.float32)

    inits = [
        _init("embeddings.word_embeddings.weight", w(vocab, hidden, s=1.0)),
        _init("embeddings.LayerNorm.weight", np.ones(hidden, np.float32)),
        _init("embeddings.LayerNorm.bias", np.zeros(hidden, np.float32)),
        _init("layer.0.attention.self.query.weight", w(hidden, hidden)),
        _init("layer.0.attention.self.query.bias", w(hidden, s=0.05)),
        _init("layer.0.attention.self.key.weight", w(hidden, hidden)),
        _init("layer.0.attention.self.key.bias", w(hidden, s=0.05)),
        _init("layer.0.attention.self.value.weight", w(hidden, hidden)),
        _init("layer.0.attention.self.value.bias", w(hidden, s=0.05)),
        _init("layer.0.attention.output.dense.weight", w(hidden, hidden)),
        _init("layer.0.attention.output.dense.bias", w(hidden, s=0.05)),
        _init("layer.0.attention.output.LayerNorm.weight", np.ones(hidden, np.float32)),
        _init("layer.0.attention.output.LayerNorm.bias", np.zeros(hidden, np.float32)),
        _init("layer.0.intermediate.dense.weight", w(hidden, ffn)),
        _init("layer.0.intermediate.dense.bias", w(ffn, s=0.05)),
        _init("layer.0.output.dense.weight", w(ffn, hidden)),
        _init("layer.0.output.dense.bias", w(hidden, s=0.05)),
        _init("layer.0.output.LayerNorm.weight", np.ones(hidden, np.float32)),
        _init("layer.0.output.LayerNorm.bias", np.zeros(hidden, np.float32)),
        _init("c_inv_sqrt_d", np.array(1.0 / np.sqrt(hidden), np.float32)),
        _init("c_one", np.array(1.0, np.float32)),
        _init("c_neg", np.array(-1e4, np.float32)),
        _init("c_axes1", np.array([1], np.int64)),
        _init("c_axes_last", np.array([-1], np.int64)),
        _init("c_eps", np.array(1e-9, np.float32)),
    ]
    p = "/encoder/layer.0"

    def linear(x: str, name: str, out: str, tag: str) -> list[onnx.NodeProto]:
        return [helper.make_node("MatMul", [x, f"{name}.weight"], [f"{out}_mm"], name=f"{tag}/MatMul"),
                helper.make_node("Add", [f"{name}.bias", f"{out}_mm"], [out], name=f"{tag}/Add")]

    a = "layer.0.attention"
    nodes = [
        helper.make_node("Gather", ["embeddings.word_embeddings.weight", "input_ids"], ["emb"],
                         name="/embeddings/word_embeddings/Gather"),
        helper.make_node("LayerNormalization", ["emb", "embeddings.LayerNorm.weight",
                                                "embeddings.LayerNorm.bias"], ["h0"],
                         name="/embeddings/LayerNorm/LayerNormalization", axis=-1, epsilon=1e-12),
        *linear("h0", f"{a}.self.query", "q", f"{p}/attention/self/query"),
        *linear("h0", f"{a}.self.key", "k", f"{p}/attention/self/key"),
        *linear("h0", f"{a}.self.value", "v", f"{p}/attention/self/value"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"], name="scores"),
        helper.make_node("Mul", ["s0", "c_inv_sqrt_d"], ["s1"], name="scale"),
        # extended mask: (1 - mask) * -1e4, shape [B, 1, T]
        helper.make_node("Cast", ["attention_mask"], ["mf"], name="mask_cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "c_axes1"], ["mu"], name="mask_unsq"),
        helper.make_node("Sub", ["c_one", "mu"], ["mi"], name="mask_inv"),
        helper.make_node("Mul", ["mi", "c_neg"], ["mb"], name="mask_bias"),
        helper.make_node("Add", ["s1", "mb"], ["s2"], name="scores_masked"),
        helper.make_node("Softmax", ["s2"], ["pr"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["pr", "v"], ["ctx"], name="context"),
        *linear("ctx", f"{a}.output.dense", "ao", f"{p}/attention/output/dense"),
        helper.make_node("Add", ["ao", "h0"], ["r1"], name="res1"),
        helper.make_node("LayerNormalization", ["r1", f"{a}.output.LayerNorm.weight",
                                                f"{a}.output.LayerNorm.bias"], ["h1"],
                         name=f"{p}/attention/output/LayerNorm/LayerNormalization", axis=-1, epsilon=1e-12),
        *linear("h1", "layer.0.intermediate.dense", "i0", f"{p}/intermediate/dense"),
        helper.make_node("Relu", ["i0"], ["i1"], name="ffn_act"),
        *linear("i1", "layer.0.output.dense", "o0", f"{p}/output/dense"),
        helper.make_node("Add", ["o0", "h1"], ["r2"], name="res2"),
        helper.make_node("LayerNormalization", ["r2", "layer.0.output.LayerNorm.weight",
                                                "layer.0.output.LayerNorm.bias"], ["h2"],
                         name=f"{p}/output/LayerNorm/LayerNormalization", axis=-1, epsilon=1e-12),
        # masked mean pooling
        helper.make_node("Unsqueeze", ["mf", "c_axes_last"], ["m3"], name="pool_unsq"),
        helper.make_node("Mul", ["h2", "m3"], ["hm"], name="pool_mul"),
        helper.make_node("ReduceSum", ["hm", "c_axes1"], ["hs"], name="pool_sum", keepdims=0),
        helper.make_node("ReduceSum", ["m3", "c_axes1"], ["ms"], name="pool_cnt", keepdims=0),
        helper.make_node("Max", ["ms", "c_eps"], ["msc"], name="pool_clamp"),
        helper.make_node("Div", ["hs", "msc"], ["features"], name="pool_div"),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", hidden])]
    return _model(nodes, inputs, outputs, inits)


def conv_model(channels: int = 3, size: int = 8, c1: int = 8, c2: int = 12, seed: int = 0
               ) -> onnx.ModelProto:
    """3x3 Conv+Relu -> 1x1 Conv (pointwise) + Relu -> GlobalAveragePool -> Flatten -> features."""
    rng = np.random.default_rng(seed)
    inits = [_init("stem.weight", rng.normal(0, 0.3, (c1, channels, 3, 3)).astype(np.float32)),
             _init("stem.bias", rng.normal(0, 0.05, c1).astype(np.float32)),
             _init("pw.weight", rng.normal(0, 0.3, (c2, c1, 1, 1)).astype(np.float32)),
             _init("pw.bias", rng.normal(0, 0.05, c2).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["pixel_values", "stem.weight", "stem.bias"], ["c0"],
                              name="/stem/Conv", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c0"], ["c1"], name="/stem/Relu"),
             helper.make_node("Conv", ["c1", "pw.weight", "pw.bias"], ["c2"], name="/pw/Conv"),
             helper.make_node("Relu", ["c2"], ["c3"], name="/pw/Relu"),
             helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="/pool"),
             helper.make_node("Flatten", ["g"], ["features"], name="/flatten", axis=1)]
    return _model(nodes,
                  [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                 ["batch", channels, size, size])],
                  [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", c2])], inits)


def save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


# ---- learnable synthetic data ------------------------------------------------------------------
def mlp_data(n: int = 64, in_dim: int = 12, classes: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, in_dim)).astype(np.float32)
    proj = rng.normal(0, 1, (in_dim, classes))
    return {"x": x, "labels": np.argmax(x @ proj, axis=1).astype(np.int64)}


def text_data(n: int = 48, seq: int = 10, vocab: int = 40, classes: int = 3, seed: int = 1
              ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int64)
    ids = rng.integers(classes + 1, vocab, (n, seq))
    lengths = rng.integers(4, seq + 1, n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = labels + 1  # the class shows up as a token
    ids = np.where(mask == 1, ids, 0)
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask, "labels": labels}


def image_data(n: int = 48, size: int = 8, classes: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int64)
    x = rng.normal(0, 0.5, (n, 3, size, size)).astype(np.float32)
    x[np.arange(n), labels % 3, :, :] += 1.0  # class shifts one channel
    return {"pixel_values": x, "labels": labels}


def batches(data: dict[str, np.ndarray], batch_size: int = 16):
    n = len(data["labels"])
    for start in range(0, n - batch_size + 1, batch_size):
        yield {k: v[start:start + batch_size] for k, v in data.items()}
