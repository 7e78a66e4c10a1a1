"""NCut pictures: how the image encoder's block outputs group an image's tokens, per input size,
and what fine-tuning changed.

    python -m segment_anything.tools.ncut --image photo.jpg --model_type vit_b \
        --checkpoint sam_vit_b_01ec64.pth [--weights runs/<run>/best.pth] \
        --image_sizes 1024,256 --layers 2,5,8,11 --output ncut.png

One PNG grid: a row per block (``--layers``, numbered as in utils/block_features.py), a column
for the image and then one per input size (two with ``--weights``: base, fine-tuned). Each token
is coloured by its leading Normalized-Cut eigenvectors (ncut-pytorch): the three after the
trivial first one, mapped to R, G and B. The eigenvectors of a row are computed once for the
tokens of all its columns together, so within a row the same colour means the same place in
one spectral embedding: columns can be compared, rows cannot.
"""

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from ..build_sam import ENCODERS, MODEL_TYPES, PATCH_SIZE
from ..utils import draw
from ..utils.block_features import block_outputs, encoder_blocks
from ..utils.data import load_image
from ..utils.data.prepare import DEFAULT_SEED
from ..utils.image_spec import add_arguments as add_image_arguments
from ..utils.save_weight import load_partial_weight
from ..utils.transforms import ResizeLongestSide
from ._cli import cli
from ._model import build_base, check_base, image_spec_as_trained

PINS = "ncut-pytorch==3.2.0 fpsample==0.3.3"
INSTALL = f"pip install --no-deps {PINS}  (or: pip install --no-deps -r requirements-ncut.txt)"
N_COLOURS = 3  # eigenvectors drawn as R, G, B
MIN_CELL = 32  # --cell: a smaller picture shows nothing


def import_ncut():
    """ncut-pytorch's Ncut class, or an ImportError that says how to install it."""
    try:
        from ncut_pytorch import Ncut
    except ImportError as err:
        raise ImportError(f"the NCut tool needs the ncut-pytorch package ({err}); install it with: {INSTALL}") from None
    return Ncut


def int_list(text: str, flag: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag}: expected at least one value, got {text!r}")
    return values


def num_blocks(model_type: str) -> int:
    """Blocks of the model type's encoder, counted on a meta-device build (no memory, no weights)."""
    with torch.device("meta"):
        return len(encoder_blocks(ENCODERS[model_type](256)))


def check_args(args: argparse.Namespace) -> Tuple[np.ndarray, List[int], List[int]]:
    """Everything that can be wrong with the input, before any model is built:
    returns (image (H, W, 3) uint8, block indices, input sizes)."""
    layers, sizes = int_list(args.layers, "--layers"), int_list(args.image_sizes, "--image_sizes")
    if args.n_eig < N_COLOURS + 1:
        raise ValueError(f"--n_eig must be at least {N_COLOURS + 1} (the colours use the leading {N_COLOURS}), got {args.n_eig}")
    if args.cell < MIN_CELL:
        raise ValueError(f"--cell must be at least {MIN_CELL} pixels, got {args.cell}")
    depth = num_blocks(args.model_type)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"--layers {args.layers}: {bad} out of range, {args.model_type}'s encoder has blocks 0..{depth - 1}")
    bad = [s for s in sizes if s < 2 * PATCH_SIZE or s % PATCH_SIZE]
    if bad:
        raise ValueError(f"--image_sizes {args.image_sizes}: {bad} not a multiple of {PATCH_SIZE} of at least {2 * PATCH_SIZE}")
    for size in sizes:  # the official file at every size asked for; a best.pth or last.pth on top
        check_base(args.checkpoint, args.model_type, size)
    spec = image_spec_as_trained(args, args.weights)  # also: a missing, unreadable or unsafe --weights file
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image} not found")
    image = load_image(args.image, spec)
    import_ncut()
    return image, layers, sizes


def encoder_input(sam: torch.nn.Module, image: np.ndarray, device: str) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """The (1, 3, S, S) encoder input for an RGB image, as SamPredictor makes it, and the
    (h, w) of the image inside it (the rest is padding)."""
    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(image)
    tensor = torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous()
    return sam.preprocess(tensor[None].float()), resized.shape[:2]


def crop_to_image(grid: torch.Tensor, inside: Tuple[int, int], size: int) -> torch.Tensor:
    """(H, W, C) tokens of an S x S input -> the tokens that see the image, not the padding:
    padding tokens would form a cluster of their own and take one of the few colours."""
    rows = math.ceil(inside[0] * grid.shape[0] / size)
    cols = math.ceil(inside[1] * grid.shape[1] / size)
    return grid[:rows, :cols]


def collect(args: argparse.Namespace, image: np.ndarray, layers: List[int], sizes: List[int]
            ) -> Tuple[List[str], List[Dict[int, torch.Tensor]]]:
    """(column titles, per column {block: (h, w, C) tokens}), base then fine-tuned per size.
    One model per size: the fine-tuned weights are loaded into it after the base pass."""
    titles, columns = [], []
    for size in sizes:
        sam = build_base(args.model_type, args.checkpoint, size, args.seed).to(args.device).eval()
        x, inside = encoder_input(sam, image, args.device)
        variants = [("base", None)] + ([("fine-tuned", args.weights)] if args.weights else [])
        for name, weights in variants:
            if weights is not None:
                load_partial_weight(sam, weights, expected_model_type=args.model_type)
                sam.to(args.device).eval()
            outputs = block_outputs(sam.image_encoder, x, layers)
            columns.append({i: crop_to_image(outputs[i][0], inside, size) for i in layers})
            titles.append(f"{size} {name}" if args.weights else f"{size} px")
    return titles, columns


def spectral_colours(grids: Sequence[torch.Tensor], n_eig: int, device: str) -> List[np.ndarray]:
    """Joint NCut of the tokens of all grids ((h_k, w_k, C) each) -> per grid (h_k, w_k, 3) uint8.

    Eigenvector 0 of the normalised affinity carries only each token's degree, so colours come
    from eigenvectors 1..3; each is scaled by its 1st/99th percentile over all grids together
    (eigenvector signs are arbitrary, so only differences within a row mean something).
    """
    Ncut = import_ncut()
    tokens = torch.cat([g.reshape(-1, g.shape[-1]) for g in grids]).float()
    eigvec = Ncut(n_eig=max(n_eig, N_COLOURS + 1), device=device).fit_transform(tokens).cpu()
    rgb = eigvec[:, 1 : N_COLOURS + 1]
    low, high = torch.quantile(rgb, 0.01, dim=0), torch.quantile(rgb, 0.99, dim=0)
    rgb = ((rgb - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    pictures, start = [], 0
    for g in grids:
        n = g.shape[0] * g.shape[1]
        pictures.append((rgb[start : start + n].reshape(g.shape[0], g.shape[1], N_COLOURS) * 255).byte().numpy())
        start += n
    return pictures


def cell_box(image_hw: Tuple[int, int], cell: int) -> Tuple[int, int]:
    """(height, width) of one grid cell: the image's aspect ratio, longest side ``cell``."""
    h, w = image_hw
    return (max(1, round(cell * h / w)), cell) if w >= h else (cell, max(1, round(cell * w / h)))


def blow_up(picture: np.ndarray, box: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour scale to fit the (height, width) box: each token stays a visible block."""
    scale = min(box[0] / picture.shape[0], box[1] / picture.shape[1])
    size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
    return cv2.resize(picture, size, interpolation=cv2.INTER_NEAREST)


def grid_shape(n_layers: int, n_sizes: int, with_weights: bool, image_hw: Tuple[int, int], cell: int) -> Tuple[int, int]:
    """(height, width) in pixels of the PNG: draw.grid's 22-pixel header, cells of cell_box's
    size with 2-pixel gaps, one image column plus one column per size (two with --weights)."""
    n_cols = 1 + n_sizes * (2 if with_weights else 1)
    ch, cw = cell_box(image_hw, cell)
    return 22 + n_layers * (ch + 2), n_cols * (cw + 2)


def make_picture(args: argparse.Namespace, image: np.ndarray, layers: List[int], sizes: List[int]) -> np.ndarray:
    titles, columns = collect(args, image, layers, sizes)
    box = cell_box(image.shape[:2], args.cell)
    shown = blow_up(image, box)
    rows = []
    for i in layers:
        colours = spectral_colours([column[i] for column in columns], args.n_eig, args.device)
        rows.append([shown] + [blow_up(c, box) for c in colours])
    return draw.grid(rows, ["image"] + titles, [f"block {i}" for i in layers], cell=box[1], cell_height=box[0])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", required=True, help="the image file")
    add_image_arguments(p, plane_all=False, from_weights=True)
    p.add_argument("--model_type", "--model-type", default="vit_t", choices=MODEL_TYPES)
    p.add_argument("--checkpoint", default="none",
                   help="official SAM weights; 'none' (default) = the seeded random model a '--checkpoint none' run starts from")
    p.add_argument("--weights", default=None, help="fine-tuned partial weights (best.pth): adds a fine-tuned column per size")
    p.add_argument("--image_sizes", default="1024,256", help="encoder input sizes, comma-separated multiples of 16")
    p.add_argument("--layers", default="2,5,8,11", help="block indices, comma-separated (vit_t: its 12 blocks across stages)")
    p.add_argument("--n_eig", type=int, default=10, help="NCut eigenvectors computed, at least 4 (the colours use the leading three)")
    p.add_argument("--cell", type=int, default=256, help="longest side of one picture in the grid, pixels (at least 32)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the random model with --checkpoint none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="ncut.png", help="the PNG to write")
    return p


def main(argv: Optional[List[str]] = None) -> Path:
    args = parser().parse_args(argv)
    image, layers, sizes = check_args(args)
    picture = make_picture(args, image, layers, sizes)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw.save_rgb(out, picture)
    print(f"wrote {out} ({picture.shape[1]}x{picture.shape[0]}: blocks {layers}, sizes {sizes})")
    return out


def run() -> None:
    """Console entry: input errors and a missing ncut-pytorch end with one line, not a traceback."""
    try:
        cli(main)
    except ImportError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    run()
