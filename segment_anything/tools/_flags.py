"""Flag names the tools share with run.py, so one word means one thing everywhere.

A data set is --<set>_dir (a folder), or --<set>_json + --<set>_images (COCO): run.py reads
train and val, prepare and evaluate read data, evaluate's forgetting check reads reference. The
data options (--data_format, --skip_bad, --foreground_values, ...) have run.py's names, defaults
and choices; a folder a tool writes is --output_dir. Names that changed stay as hidden aliases.
"""

import argparse

from ..training.config import str2bool
from ..utils.data.formats import DATA_FORMATS, INSTANCE_MODES


def alias(parser: argparse.ArgumentParser, old: str, dest: str) -> None:
    """An old flag name that still works (same destination), left out of --help."""
    parser.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_data_set(parser: argparse.ArgumentParser, name: str, what: str) -> None:
    """--<name>_dir, --<name>_json, --<name>_images."""
    parser.add_argument(f"--{name}_dir", help=f"{what}: a data folder (see --data_format), or a COCO instances JSON")
    parser.add_argument(f"--{name}_json", help=f"{what}, COCO: the instances JSON")
    parser.add_argument(f"--{name}_images", help=f"{what}, COCO: the folder of its images")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """run.py's data options (the image flags come from utils/image_spec.add_arguments)."""
    parser.add_argument("--data_format", default="auto", choices=list(DATA_FORMATS),
                        help="auto (folder, objects or labelme from the folder; coco from a JSON), or one of these")
    parser.add_argument("--instance_mode", default="per_object", choices=list(INSTANCE_MODES),
                        help="per_object: every object its own prompt and target; per_image: one box around all foreground")
    parser.add_argument("--min_area", type=int, default=0, help="objects with fewer pixels are dropped")
    parser.add_argument("--mask_threshold", type=int, default=127, help="JPEG masks: pixel > threshold is foreground")
    parser.add_argument("--labels", help="labelme: comma-separated labels to keep (default: all)")
    parser.add_argument("--categories", help="coco: comma-separated category names to keep (default: all)")
    parser.add_argument("--foreground_values", help="mask values that are the object, e.g. 1,2; class names for labelme/coco")
    parser.add_argument("--skip_bad", type=str2bool, nargs="?", const=True, default=False, metavar="BOOL",
                        help="leave bad samples out (listed) instead of stopping")
