"""Export the prompt encoder + mask decoder (with fine-tuned weights) to ONNX, with the inputs
and outputs of Meta's scripts/export_onnx_model.py (see segment_anything/utils/onnx.py).

    python -m segment_anything.tools.export_onnx --model_type vit_b --checkpoint sam_vit_b_01ec64.pth \
        --weights runs/<run>/best.pth --output decoder.onnx [--return_single_mask] [--opset 17]
"""

import argparse
import contextlib
import importlib.util
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from ..utils.onnx import INPUT_NAMES, OUTPUT_NAMES, SamOnnxModel, dummy_inputs
from ._cli import cli
from ._model import add_model_args, load_model

DYNAMIC_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
MIN_OPSET = 14  # the decoder's attention (scaled_dot_product_attention) exports from opset 14 on


def export(sam: torch.nn.Module, output: Path, return_single_mask: bool = False, opset: int = 17) -> Path:
    """Write the ONNX decoder of ``sam`` to ``output``.

    The TorchScript-based exporter (dynamo=False) is used on purpose: the output size comes from
    the values of ``orig_im_size``, which it records as a Resize with run-time sizes, while the
    dynamo exporter would have to specialise on the example's size. It warns that it is
    deprecated in torch >= 2.9; the warning is silenced here."""
    check_opset(opset)
    wrapper = SamOnnxModel(sam.cpu().float().eval(), return_single_mask=return_single_mask)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), _opset_named(opset):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            dummy_inputs(sam),
            str(output),
            dynamo=False,
            export_params=True,
            opset_version=opset,
            do_constant_folding=True,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=DYNAMIC_AXES,
        )
    return output


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"--opset {opset}: the decoder's attention exports from opset {MIN_OPSET} on")


@contextlib.contextmanager
def _opset_named(opset: int):
    """torch's exporter refusing an opset newer than it knows: one line naming --opset."""
    try:
        yield
    except RuntimeError as err:
        if "opset_version" not in str(err):
            raise
        raise ValueError(f"--opset {opset}: torch {torch.__version__}'s ONNX exporter does not write it ({err})") from None


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--return_single_mask", "--return-single-mask", action="store_true",
                        help="one mask per call (the best one, as SamPredictor picks it) instead of all four")
    parser.add_argument("--opset", type=int, default=17, help=f"ONNX opset version ({MIN_OPSET} or later)")
    args = parser.parse_args(argv)
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:  # torch's exporter needs both; say so before the model is loaded
        raise ValueError(f"ONNX export needs {' and '.join(missing)}: install the onnx extra, pip install -e \".[onnx]\"")
    check_opset(args.opset)
    sam = load_model(args, args.weights)
    path = export(sam, Path(args.output), args.return_single_mask, args.opset)
    import onnx

    onnx.checker.check_model(str(path))
    print(f"wrote {path} (inputs {', '.join(INPUT_NAMES)}; outputs {', '.join(OUTPUT_NAMES)})")


def run() -> None:
    """Console entry (sam-export-onnx): main() through cli(), so bad input and Ctrl-C end in one line."""
    cli(main)


if __name__ == "__main__":
    run()
