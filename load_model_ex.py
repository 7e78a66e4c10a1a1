"""Segment one image with stock SAM plus our fine-tuned mask decoder ("partial weights").

    python load_model_ex.py --model_type vit_b --checkpoint sam_vit_b_01ec64.pth \
        --weights runs/<run>/best.pth --image photo.jpg --output mask.png

Works with this repository's segment_anything and with Meta's (pip install segment-anything).
Python puts this script's folder first on sys.path, so inside the repository ours is imported;
`python -P load_model_ex.py ...` (Python 3.11+) leaves it out and uses the installed package.
"""

import argparse
import importlib.util
from pathlib import Path

import cv2
import numpy as np
from segment_anything import SamPredictor, sam_model_registry

try:
    from segment_anything.utils.save_weight import load_partial_weight
except ImportError:  # Meta's stock package has no save_weight: load ours from its file (torch-only)
    _file = Path(__file__).resolve().parent / "segment_anything" / "utils" / "save_weight.py"
    _spec = importlib.util.spec_from_file_location("save_weight", _file)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    load_partial_weight = _module.load_partial_weight

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model_type", default="vit_b", choices=sorted(set(sam_model_registry) - {"default"}))
parser.add_argument("--checkpoint", required=True, help="official SAM weights, e.g. sam_vit_b_01ec64.pth")
parser.add_argument("--weights", required=True, help="partial weights saved by training (best.pth)")
parser.add_argument("--image", required=True)
parser.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                    help="prompt box in pixels (default: the image minus a 10%% margin)")
parser.add_argument("--output", default="mask.png")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint)  # the official weights
meta = load_partial_weight(sam, args.weights, expected_model_type=args.model_type)  # then our tuned part
if meta.get("image_size", sam.image_encoder.img_size) != sam.image_encoder.img_size:
    print(f"warning: trained at image_size {meta['image_size']}, running at {sam.image_encoder.img_size}")
predictor = SamPredictor(sam.to(args.device))

bgr = cv2.imread(args.image)
if bgr is None:
    raise SystemExit(f"cannot read image {args.image}")
predictor.set_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))  # SAM expects RGB; OpenCV reads BGR
h, w = bgr.shape[:2]
box = np.array(args.box or [0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h])
masks, iou, _ = predictor.predict(box=box, multimask_output=False)

if not cv2.imwrite(args.output, masks[0].astype(np.uint8) * 255):
    raise SystemExit(f"cannot write {args.output}")
print(f"predicted IoU {iou[0]:.3f}; mask written to {args.output}")
