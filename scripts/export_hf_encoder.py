"""Export a Hugging Face encoder to ONNX for `fedpeft-edge prepare --onnx` (central machine, needs torch).

    python3 scripts/export_hf_encoder.py MODEL_DIR OUT.onnx [--seq 16] [--opset 17]

MODEL_DIR is a local Hugging Face model folder (config.json + weights + tokenizer.json). The export keeps
every weight as its own named initializer (no constant folding, the legacy exporter), so PEFT can find
them; batch and sequence axes stay dynamic. docs/own-model.md explains each choice.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def export(model_dir: Path, out: Path, *, seq: int = 16, opset: int = 17) -> Path:
    import torch
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(model_dir)).eval()

    class ByName(torch.nn.Module):
        """Keyword arguments: positional ones shift between transformers releases."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    model = ByName().eval()
    ids = torch.full((2, seq), 101, dtype=torch.long)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            model, (ids, mask, types), str(out),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state", "pooler_output"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                          "last_hidden_state": axes, "pooler_output": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=False,  # keep each weight a named initializer
            training=torch.onnx.TrainingMode.PRESERVE,
            dynamo=False,
        )
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, out.with_name("tokenizer.json"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--opset", type=int, default=17)
    args = p.parse_args()
    print(export(args.model_dir, args.out, seq=args.seq, opset=args.opset))


if __name__ == "__main__":
    main()
