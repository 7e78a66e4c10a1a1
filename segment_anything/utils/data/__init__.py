"""Segmentation data: formats -> Records -> checks -> Dataset.

    records.py      the Record interface every format produces
    formats/        folder, objects, instance_map, labelme, coco
    image_io.py     strict image / mask decoding
    checks.py       DataError, per-sample problems, --skip_bad summary
    prepare.py      prepare_data(sources): every file checked before training
    dataset.py      MaskDataset, collate
    samplers.py     resumable distributed sampling, the epoch sent with each index
    synthetic.py    small deterministic datasets for the demo and the tests
"""

from .checks import BadSample, DataError, Problem
from .dataset import MaskDataset, collate
from .formats import DataOptions
from .image_io import load_image, load_mask
from .prepare import RunData, load_records, prepare_data, split_records
from .records import Record, mask_to_box
from .synthetic import make_synthetic_dataset

__all__ = ["BadSample", "DataError", "DataOptions", "MaskDataset", "Problem", "Record", "RunData", "collate",
           "load_image", "load_mask", "load_records", "make_synthetic_dataset", "mask_to_box", "prepare_data",
           "split_records"]

