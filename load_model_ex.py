"""Segment one image with stock SAM plus our fine-tuned mask decoder ("partial weights").

    python load_model_ex.py --checkpoint sam_vit_b_01ec64.pth --weights runs/<run>/best.pth \
        --image photo.jpg --output mask.png

The model type, input size and image intensity range are read from best.pth (a --model_type or
--image_size that disagrees with the file is an error); a run's last.pth is accepted too (it holds
the latest epoch's parameters, best.pth the best epoch's). The image is read as training reads it
(utils/data/image_io: --channels, --plane, and deeper data scaled to 8 bits by --intensity_range;
each defaults to the run's).
--package chooses which segment_anything runs, whatever sys.path holds: `repo` (default) this
repository's, `installed` the one installed in this Python, e.g. Meta's (pip install
segment-anything), which runs only vit_b/l/h at 1024 px. The first line printed names it.
"""

import argparse
import importlib
import inspect
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RUN_SEED = 21  # run.py's default --seed: a --checkpoint none run starts from the model it seeds


def import_package(which: str):
    """segment_anything from this folder (repo) or from site-packages (installed). Python puts the
    script's folder first on sys.path, so without this choice the repository's would always win."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    if which == "repo":
        sys.path.insert(0, str(HERE))
    try:
        package = importlib.import_module("segment_anything")
    except ImportError:
        raise SystemExit("error: --package installed: this Python has no segment_anything installed "
                         "(pip install segment-anything); --package repo runs this repository's") from None
    folder = Path(package.__file__).parent
    origin = "this repository's" if folder.resolve() == HERE / "segment_anything" else "installed"
    print(f"segment_anything: {origin} ({folder})")
    return package


pre = argparse.ArgumentParser(add_help=False)
pre.add_argument("--package", choices=["repo", "installed"], default="repo")
segment_anything = import_package(pre.parse_known_args()[0].package)
SamPredictor, sam_model_registry = segment_anything.SamPredictor, segment_anything.sam_model_registry


def ours(name: str):
    """Our utils module `name` ("weights", "data.image_io"); next to Meta's stock package (which has
    none) it is loaded from the repository's files under the package name _sam_utils. The packages
    are bare: their __init__ files would import the training code, these modules need only
    torch, numpy, OpenCV and Pillow."""
    try:
        return importlib.import_module(f"segment_anything.utils.{name}")
    except ImportError:
        folder = HERE / "segment_anything" / "utils"
        for package, path in (("_sam_utils", folder), ("_sam_utils.data", folder / "data")):
            if package not in sys.modules:
                sys.modules[package] = types.ModuleType(package)
                sys.modules[package].__path__ = [str(path)]
        return importlib.import_module(f"_sam_utils.{name}")


save_weight, weights, image_io, image_spec = (ours(name) for name in ("save_weight", "weights", "data.image_io",
                                                                       "image_spec"))
MODEL_TYPES = sorted(set(sam_model_registry) - {"default"})

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--package", choices=["repo", "installed"], default="repo",
                    help="which segment_anything runs: repo = this repository's (every model type, input size, FFT "
                         "mixing); installed = the one installed in this Python, e.g. Meta's (vit_b/l/h at 1024 px)")
parser.add_argument("--checkpoint", required=True,
                    help="official SAM weights, e.g. sam_vit_b_01ec64.pth; 'none' = the seeded random model a "
                         "'--checkpoint none' run starts from (tests, demos)")
parser.add_argument("--weights", required=True, help="partial weights saved by training (best.pth), or a run's last.pth")
parser.add_argument("--model_type", choices=MODEL_TYPES, help="default: the model type stored in --weights")
parser.add_argument("--image_size", type=int, help="encoder input side in pixels; default: the size stored in --weights")
parser.add_argument("--image", required=True)
image_spec.add_arguments(parser, from_weights=True)  # --channels, --intensity_range, --plane
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
random_start = args.checkpoint.lower() == "none"
if not random_start and not Path(args.checkpoint).is_file():
    raise SystemExit(f"error: --checkpoint {args.checkpoint} not found")
image_spec.with_recorded(args, save_weight.recorded_image_flags(info.metadata))
try:  # the image as training read it: the same channels, plane and intensity range to 8 bits
    spec = image_spec.from_arguments(args)
except ValueError as err:
    raise SystemExit(f"error: {err}")
try:
    image = image_io.load_image(args.image, spec)
except ValueError as err:
    raise SystemExit(f"error: --image {err}")
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
checkpoint = None if random_start else args.checkpoint
if random_start:
    seed = (info.metadata.get("args") or {}).get("seed", RUN_SEED)
    torch.manual_seed(seed)  # as run.py seeds before it builds
    print(f"note: --checkpoint none: a random model (seed {seed}) under the tuned part; its masks show only "
          "that the files load")
if "image_size" in inspect.signature(builder).parameters:
    sam = builder(checkpoint=checkpoint, image_size=image_size, **encoder)  # the official weights, adapted to the size
elif image_size == 1024:
    sam = builder(checkpoint=checkpoint)
else:
    raise SystemExit(f"error: {args.weights} was trained at image_size {image_size}; this segment_anything "
                     "(Meta's) runs only at 1024: use this repository's package")
save_weight.load_partial_weight(sam, weights_file, expected_model_type=model_type)  # then our tuned part
predictor = SamPredictor(sam.to(args.device))

predictor.set_image(image)  # RGB, as SAM expects
h, w = image.shape[:2]
box = np.array(args.box or [0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h])
logits, iou, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)
mask = logits[0] > predictor.model.mask_threshold  # what predict() returns without return_logits
if args.logits:
    np.save(args.logits, logits[0].astype(np.float32))

if not cv2.imwrite(args.output, mask.astype(np.uint8) * 255):
    raise SystemExit(f"cannot write {args.output}")
print(f"{model_type} at {image_size} px{' with FFT token mixing' if encoder else ''}: predicted IoU {iou[0]:.3f}; mask written to {args.output}")
