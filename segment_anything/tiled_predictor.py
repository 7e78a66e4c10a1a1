"""TiledPredictor: SamPredictor's prompts on an image much larger than the encoder's input.

SamPredictor resizes the whole image to the encoder's side, so small objects of a large image
lose most of their pixels. TiledPredictor keeps SamPredictor's calls (set_image, predict) but
cuts the image into overlapping tiles (utils/tiles.py), embeds a tile only when a prompt needs it
(a few recent embeddings are kept), decodes each prompt in the tile that contains the prompt with
the most margin from the tile's inner sides, and writes the masks into the original frame. A
prompt that no tile of the grid contains gets a tile-sized window centred on it.

Memory is that of one tile (its resized pixels, the encoder's activations, the kept embeddings)
plus the image and the full-size masks returned; the time of a prompt is one tile's encoder pass
the first time its tile is needed.
"""

from collections import OrderedDict
from typing import Optional, Tuple

import numpy as np

from .modeling import Sam
from .predictor import SamPredictor
from .utils.tiles import Rect, best_tile, check_tiling, extent, tile_grid, window_around

OUTSIDE_LOGIT = -1e4  # return_logits: the value of pixels outside the tile a prompt was decoded in


class TiledPredictor:
    def __init__(self, sam_model: Sam, tile: int = 1024, overlap: int = 128, cached_tiles: int = 4) -> None:
        """tile, overlap: the grid in original-image pixels; cached_tiles: embeddings kept (the
        most recently used) so that further prompts in the same tile do not run the encoder."""
        check_tiling(tile, overlap)
        if cached_tiles < 1:
            raise ValueError(f"cached_tiles must be >= 1, got {cached_tiles}")
        self.model = sam_model
        self.tile, self.overlap, self.cached_tiles = tile, overlap, cached_tiles
        self.predictor = SamPredictor(sam_model)
        self.reset_image()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Take an (H, W, 3) uint8 image in RGB or BGR order; tiles are embedded when first needed."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"set_image expects an (H, W, 3) image, got shape {image.shape}")
        self.reset_image()
        self.image = image if image_format == self.model.image_format else image[..., ::-1]
        self.original_size = tuple(image.shape[:2])
        self.tiles = tile_grid(*self.original_size, self.tile, self.overlap)
        self.is_image_set = True

    def tile_for(self, point_coords: Optional[np.ndarray] = None, box: Optional[np.ndarray] = None) -> Rect:
        """The rectangle a prompt is decoded in (x0, y0, x1, y1, original pixels)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        box = None if box is None else np.asarray(box, dtype=np.float64).reshape(4)
        points = None if point_coords is None else np.asarray(point_coords, dtype=np.float64).reshape(-1, 2)
        span = extent(box, points)
        if span[2] - span[0] > self.tile or span[3] - span[1] > self.tile:
            raise ValueError(f"the prompt spans {span[2] - span[0]:g}x{span[3] - span[1]:g} pixels, more than a "
                             f"{self.tile}-pixel tile; use a larger tile")
        index = best_tile(self.tiles, span, self.original_size)
        return self.tiles[index] if index is not None else window_around(span, self.tile, self.original_size)

    def _embed(self, rect: Rect) -> None:
        """Make the inner SamPredictor hold rect's embedding (from the kept ones, or encoded now)."""
        if rect in self._kept:
            self._kept.move_to_end(rect)
            state = self._kept[rect]
        else:
            x0, y0, x1, y1 = rect
            self.predictor.set_image(np.ascontiguousarray(self.image[y0:y1, x0:x1]), self.model.image_format)
            state = (self.predictor.features, self.predictor.original_size, self.predictor.input_size)
            self._kept[rect] = state
            while len(self._kept) > self.cached_tiles:
                self._kept.popitem(last=False)
        p = self.predictor
        p.features, p.original_size, p.input_size = state
        p.is_image_set = True

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        tile: Optional[Rect] = None,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As SamPredictor.predict, prompts and masks in original-image pixels: masks (C, H, W),
        IoU predictions (C,), low-res logits (C, 256, 256) of the tile (`last_tile`). A
        mask_input must come from a call decoded in the same tile: give `tile` (a rectangle from
        `tile_for` or `last_tile`) to keep a sequence of corrective clicks in one tile."""
        rect = tuple(tile) if tile is not None else self.tile_for(point_coords, box)
        self._embed(rect)
        x0, y0, x1, y1 = rect
        shift = np.array([x0, y0], dtype=np.float64)
        points = None if point_coords is None else np.asarray(point_coords, dtype=np.float64).reshape(-1, 2) - shift
        tile_box = None if box is None else np.asarray(box, dtype=np.float64).reshape(4) - np.tile(shift, 2)
        masks, iou, low_res = self.predictor.predict(points, point_labels, tile_box, mask_input, multimask_output,
                                                     return_logits)
        full = np.full((len(masks), *self.original_size), OUTSIDE_LOGIT if return_logits else False, dtype=masks.dtype)
        full[:, y0:y1, x0:x1] = masks
        self.last_tile = rect
        return full, iou, low_res

    @property
    def device(self):
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.image: Optional[np.ndarray] = None
        self.original_size: Optional[Tuple[int, int]] = None
        self.tiles = []
        self.last_tile: Optional[Rect] = None
        self._kept: "OrderedDict[Rect, tuple]" = OrderedDict()
        self.predictor.reset_image()
