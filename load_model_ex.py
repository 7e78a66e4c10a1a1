"""Segment one image with stock SAM plus our fine-tuned mask decoder ("partial weights").

    python load_model_ex.py --checkpoint sam_vit_b_01ec64.pth --weights runs/<run>/best.pth \
        --image photo.jpg --output mask.png

The model type and input size are read from best.pth (a --model_type or --image_size that
disagrees with the file is an error); a run's last.pth is accepted too (it holds the latest
epoch's parameters, best.pth the best epoch's).
Works with this repository's segment_anything and with Meta's (pip install segment-anything),
which runs only vit_b/l/h at 1024 px. Python puts this script's folder first on sys.path, so
inside the repository ours is imported; `python -P load_model_ex.py ...` (Python 3.11+) leaves it
out and uses the installed package.
"""

import argparse
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import cv2
import numpy as np
from segment_anything import SamPredictor, sam_model_registry


def ours(name: str):
    """Our utils module `name`; next to Meta's stock package (which has none) the repository's
    segment_anything/utils folder is loaded as a package of its own (these modules need only torch)."""
    try:
        return importlib.import_module(f"segment_anything.utils.{name}")
    except ImportError:
        folder = Path(__file__).resolve().parent / "segment_anything" / "utils"
        if "_sam_utils" not in sys.modules:
            spec = importlib.util.spec_from_file_location("_sam_utils", folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
            sys.modules["_sam_utils"] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules["_sam_utils"])
        return importlib.import_module(f"_sam_utils.{name}")


save_weight, weights = ours("save_weight"), ours("weights")
MODEL_TYPES = sorted(set(sam_model_registry) - {"default"})

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--checkpoint", required=True, help="official SAM weights, e.g. sam_vit_b_01ec64.pth")
parser.add_argument("--weights", required=True, help="partial weights saved by training (best.pth), or a run's last.pth")
parser.add_argument("--model_type", choices=MODEL_TYPES, help="default: the model type stored in --weights")
parser.add_argument("--image_size", type=int, help="encoder input side in pixels; default: the size stored in --weights")
parser.add_argument("--image", required=True)
parser.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                    help="prompt box in pixels (default: the image minus a 10%% margin)")
parser.add_argument("--output", default="mask.png")
parser.add_argument("--logits", help="also save the mask logits (H, W float32, before the threshold) to this .npy file")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()


def pick(flag: str, given, stored, fallback=None):
    """A flag's value: the file's, unless the flag was given; a flag that disagrees with the file is an error."""
    if given is not None and stored is not None and given != stored:
        raise SystemExit(f"error: --{flag} {given}, but {args.weights} was trained with {flag} {stored}; "
                         f"leave --{flag} out to use the file's")
    value = given if given is not None else stored if stored is not None else fallback
    if value is None:
        raise SystemExit(f"error: {args.weights} does not say which {flag} it was trained for; pass --{flag}")
    return value


try:
    info = weights.inspect_weights(args.weights)
except FileNotFoundError as err:
    raise SystemExit(f"error: --weights {err}")
if info.kind not in ("partial", "resume", "full"):
    raise SystemExit(f"error: --weights {args.weights} is {info.describe()}; expected a best.pth written by run.py")
model_type = pick("model_type", args.model_type, info.model_type)
image_size = pick("image_size", args.image_size, info.image_size, fallback=1024)
weights_file = Path(args.weights)
if info.kind == "resume":
    print(f"note: {args.weights} is a run's resume file (last.pth, after epoch {info.metadata.get('epoch')}); "
          "using the parameters it holds (best.pth holds the best epoch's)")
    # load_partial_weight reads the parameters of a last.pth as it reads a best.pth (data only)

if model_type not in sam_model_registry:
    raise SystemExit(f"error: {args.weights} is for {model_type}, which this segment_anything does not have")
builder = sam_model_registry[model_type]
# FFT token mixing (--attention fft) is recorded in best.pth (resume files: in the run's args).
mixing = info.metadata.get("attention") or {}
if not mixing and (info.metadata.get("args") or {}).get("attention") == "fft":
    mixing = {"type": "fft", "blocks": (info.metadata["args"].get("fft_blocks") or "global").split(",")}
encoder = {"attention": "fft", "fft_blocks": ",".join(map(str, mixing["blocks"]))} if mixing.get("type") == "fft" else {}
if encoder and "attention" not in inspect.signature(builder).parameters:
    raise SystemExit(f"error: {args.weights} was trained with FFT token mixing in encoder blocks {mixing['blocks']}; "
                     "this segment_anything (Meta's) has only standard attention: use this repository's package")
if "image_size" in inspect.signature(builder).parameters:
    sam = builder(checkpoint=args.checkpoint, image_size=image_size, **encoder)  # the official weights, adapted to the size
elif image_size == 1024:
    sam = builder(checkpoint=args.checkpoint)
else:
    raise SystemExit(f"error: {args.weights} was trained at image_size {image_size}; this segment_anything "
                     "(Meta's) runs only at 1024: use this repository's package")
save_weight.load_partial_weight(sam, weights_file, expected_model_type=model_type)  # then our tuned part
predictor = SamPredictor(sam.to(args.device))

bgr = cv2.imread(args.image)
if bgr is None:
    raise SystemExit(f"cannot read image {args.image}")
predictor.set_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))  # SAM expects RGB; OpenCV reads BGR
h, w = bgr.shape[:2]
box = np.array(args.box or [0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h])
logits, iou, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)
mask = logits[0] > predictor.model.mask_threshold  # what predict() returns without return_logits
if args.logits:
    np.save(args.logits, logits[0].astype(np.float32))

if not cv2.imwrite(args.output, mask.astype(np.uint8) * 255):
    raise SystemExit(f"cannot write {args.output}")
print(f"{model_type} at {image_size} px{' with FFT token mixing' if encoder else ''}: predicted IoU {iou[0]:.3f}; mask written to {args.output}")
