"""Segment one image with stock SAM plus our fine-tuned part ("partial weights": best.pth, or a run's last.pth).

    python load_model_ex.py --checkpoint sam_vit_b_01ec64.pth --weights runs/<run>/best.pth \
        --image photo.jpg --output mask.png

The model type, input size, token mixing and how the run read its images (--channels, --plane,
--intensity_range) come from the weights file (save_weight.model_spec); a flag that disagrees with
it is an error. --package repo (default) runs this repository's segment_anything, --package
installed the one installed in this Python, e.g. Meta's (vit_b/l/h at 1024 px only); the first
line printed names it. --checkpoint none: the seeded random model a '--checkpoint none' run starts from.
"""

import argparse
import importlib
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
pre = argparse.ArgumentParser(add_help=False)
pre.add_argument("--package", choices=["repo", "installed"], default="repo",
                 help="which segment_anything runs: repo = this repository's; installed = this Python's, e.g. Meta's")
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # Python put this folder first
if pre.parse_known_args()[0].package == "repo":
    sys.path.insert(0, str(HERE))
try:
    import segment_anything
except ImportError:
    raise SystemExit("error: --package installed: this Python has no segment_anything installed "
                     "(pip install segment-anything); --package repo runs this repository's") from None
folder = Path(segment_anything.__file__).parent
origin = "this repository's" if folder.resolve() == HERE / "segment_anything" else "installed"
print(f"segment_anything: {origin} ({folder})")
utils = "segment_anything.utils"
if not (folder / "utils" / "save_weight.py").is_file():  # Meta's: our utils folder as a bare package (no training code)
    utils = "_sam_utils"
    for name, path in ((utils, HERE / "segment_anything/utils"), (f"{utils}.data", HERE / "segment_anything/utils/data")):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__path__ = [str(path)]
save_weight, image_spec, image_io, random_weights = (importlib.import_module(f"{utils}.{name}") for name in
                                                     ("save_weight", "image_spec", "data.image_io", "random_weights"))

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[pre])
parser.add_argument("--checkpoint", required=True, help="official SAM weights, e.g. sam_vit_b_01ec64.pth; or 'none'")
parser.add_argument("--weights", required=True, help="partial weights saved by training (best.pth), or a run's last.pth")
parser.add_argument("--model_type", choices=sorted(set(segment_anything.sam_model_registry) - {"default"}),
                    help="default: the model type stored in --weights")
parser.add_argument("--image_size", type=int, help="encoder input side in pixels; default: the size stored in --weights")
parser.add_argument("--image", required=True)
image_spec.add_arguments(parser, from_weights=True)  # --channels, --intensity_range, --plane
parser.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="default: the image minus a 10%% margin")
parser.add_argument("--output", default="mask.png")
parser.add_argument("--logits", help="also save the mask logits (H, W float32, before the threshold) to this .npy file")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

random_start = args.checkpoint.lower() == "none"
try:
    spec = save_weight.model_spec(args.weights, segment_anything.sam_model_registry, args.model_type, args.image_size)
    if not random_start and not Path(args.checkpoint).is_file():
        raise ValueError(f"--checkpoint {args.checkpoint} not found")
    image_spec.with_recorded(args, spec.image_flags)  # the image as training read it
    read_as = image_spec.from_arguments(args)
except (ValueError, FileNotFoundError) as err:
    raise SystemExit(f"error: {err}")
try:
    image = image_io.load_image(args.image, read_as)
except ValueError as err:
    raise SystemExit(f"error: --image {err}")
h, w = image.shape[:2]
box = args.box or [0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h]
if not (box[0] <= box[2] and box[1] <= box[3] and box[0] < w and box[1] < h and box[2] > 0 and box[3] > 0):
    raise SystemExit(f"error: --box {' '.join(f'{v:g}' for v in box)}: a box must have x0 <= x1 and y0 <= y1 and overlap the {w}x{h} image")
for flag, path in (("--output", args.output), ("--logits", args.logits)):
    if path and not Path(path).absolute().parent.is_dir():
        raise SystemExit(f"error: {flag} {path}: its folder does not exist")
if not cv2.haveImageWriter(args.output):
    raise SystemExit(f"error: --output {args.output}: OpenCV cannot write an image with that name's extension (use .png)")
print("\n".join(spec.notes), end="\n" if spec.notes else "")
if random_start:
    seed = random_weights.DEFAULT_SEED if spec.seed is None else spec.seed
    torch.manual_seed(seed)  # as run.py seeds before it builds
    print(f"note: --checkpoint none: a random model (seed {seed}) under the tuned part; its masks show only that the files load")
sam = segment_anything.sam_model_registry[spec.model_type](checkpoint=None if random_start else args.checkpoint, **spec.build)
save_weight.load_partial_weight(sam, args.weights, expected_model_type=spec.model_type)  # then our tuned part
predictor = segment_anything.SamPredictor(sam.to(args.device))

predictor.set_image(image)  # RGB, as SAM expects
logits, iou, _ = predictor.predict(box=np.array(box), multimask_output=False, return_logits=True)
if args.logits:
    np.save(args.logits, logits[0].astype(np.float32))
if not cv2.imwrite(args.output, (logits[0] > predictor.model.mask_threshold).astype(np.uint8) * 255):
    raise SystemExit(f"error: --output {args.output}: cannot write it")
mixing = " with FFT token mixing" if "attention" in spec.build else ""
print(f"{spec.model_type} at {spec.image_size} px{mixing}: predicted IoU {iou[0]:.3f}; mask written to {args.output}")
