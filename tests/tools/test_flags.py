"""One flag vocabulary: a data set is --<set>_dir / --<set>_json / --<set>_images with the same data
options everywhere, a folder written is --output_dir, the old names still work (hidden), and every
flag a hint names is one the tool has."""

import re

import cv2
import numpy as np
import pytest

from segment_anything.tools import evaluate, predict, prepare
from segment_anything.tools._model import build_base
from segment_anything.training.config import TrainConfig
from segment_anything.utils.save_weight import save_partial_weight

DATA_OPTIONS = ("--data_format", "--instance_mode", "--min_area", "--mask_threshold", "--labels", "--categories",
                "--foreground_values", "--intensity_range", "--channels", "--plane", "--skip_bad")


def options(parser):
    return {s for action in parser._actions for s in action.option_strings}


def shown(parser):
    return set(re.findall(r"--\w+", parser.format_help()))


def test_prepare_and_evaluate_name_a_data_set_alike_and_take_runs_data_options():
    for parser in (prepare.parser(), evaluate.build_parser()):
        assert {"--data_dir", "--data_json", "--data_images", *DATA_OPTIONS} <= shown(parser)
    assert {"--reference_dir", "--reference_json", "--reference_images", "--reference_format"} <= shown(evaluate.build_parser())
    train = options(TrainConfig.parser())
    assert set(DATA_OPTIONS) <= train  # the same names in run.py
    assert "--output_dir" in shown(predict.build_parser()) and "--output_dir" in train


def test_old_names_still_work_and_are_hidden():
    args = prepare.parser().parse_args(["--json", "a.json", "--images", "imgs", "--output_dir", "o"])
    assert (args.data_json, args.data_images) == ("a.json", "imgs")
    assert not {"--json", "--images"} & shown(prepare.parser())
    args = evaluate.build_parser().parse_args(["--checkpoint", "none", "--weights", "w", "--data_dir", "d",
                                               "--output_dir", "o", "--reference_data", "r"])
    assert args.reference_dir == "r" and "--reference_data" not in shown(evaluate.build_parser())
    args = predict.build_parser().parse_args(["--checkpoint", "none", "--image", "x.png", "--output", "out"])
    assert args.output_dir == "out" and "--output " not in predict.build_parser().format_help()
    # --skip_bad alone or with a value, as in run.py
    assert prepare.parser().parse_args(["--data_dir", "d", "--output_dir", "o", "--skip_bad"]).skip_bad is True
    assert prepare.parser().parse_args(["--data_dir", "d", "--output_dir", "o", "--skip_bad", "false"]).skip_bad is False


def test_every_flag_a_data_hint_names_is_one_the_tool_has(tmp_path):
    """Label maps without --data_format: the hint names --skip_bad, --foreground_values and
    --data_format; each must be a flag of the tool that printed it."""
    root = tmp_path / "maps"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(2):
        cv2.imwrite(str(root / "images" / f"{i}.png"), np.full((32, 32, 3), 90, np.uint8))
        label = np.zeros((32, 32), np.uint8)
        label[2:10, 2:10], label[12:20, 12:20] = 1, 2
        cv2.imwrite(str(root / "labels" / f"{i}.png"), label)
    weights = save_partial_weight(build_base("vit_t", "none", 64), tmp_path / "best.pth",
                                  {"model_type": "vit_t", "image_size": 64}, keys=["mask_decoder"])
    with pytest.raises(ValueError) as err:
        evaluate.main(["--checkpoint", "none", "--weights", str(weights), "--data_dir", str(root),
                       "--output_dir", str(tmp_path / "e")])
    named = set(re.findall(r"--\w+", str(err.value)))
    assert "--skip_bad" in named and named <= options(evaluate.build_parser()), named
    with pytest.raises(SystemExit) as err:
        prepare.main(["--data_dir", str(root), "--output_dir", str(tmp_path / "p")])
    named = set(re.findall(r"--\w+", str(err.value.code)))
    assert "--skip_bad" in named and named <= options(prepare.parser()), named


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--n", "2", "--objects", "-1"], "--objects must be at least 1, got -1"),
])
def test_synthetic_data_names_the_flag_out_of_range(tmp_path, capsys, argv, message):
    from segment_anything.tools import synthetic_data

    with pytest.raises(SystemExit):
        synthetic_data.main([str(tmp_path / "set"), *argv])
    assert message in capsys.readouterr().err and not (tmp_path / "set").exists()


def test_tools_name_image_size_when_it_is_not_a_multiple_of_16(tmp_path):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="^--image_size must be a positive multiple of 16, got 100$"):
        predict.main(["--model_type", "vit_t", "--checkpoint", "none", "--image_size", "100", "--image", str(image),
                      "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("argv, message", [
    (["--min_area", "-5"], "--min_area must be >= 0, got -5"),
    (["--mask_threshold", "300"], r"--mask_threshold must be in \[0, 254\], got 300"),
])
def test_prepare_refuses_the_data_values_run_py_refuses(tmp_path, argv, message):
    from segment_anything.tools.synthetic_data import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "data", n=2, size_range=(40, 60))
    with pytest.raises(SystemExit, match="^error: " + message):
        prepare.main(["--data_dir", str(root), "--output_dir", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool, argv, message", [
    ("predict", ["--points_per_side", "0"], "--points_per_side must be >= 1, got 0"),
    ("predict", ["--min_region_area", "-1"], "--min_region_area must be >= 0, got -1"),
    ("evaluate", ["--amg_points_per_side", "0", "--weights", "w.pth", "--data_dir", "d"], "--amg_points_per_side must be >= 1, got 0"),
    ("evaluate", ["--min_region_area", "-1", "--weights", "w.pth", "--data_dir", "d"], "--min_region_area must be >= 0, got -1"),
    ("evaluate", ["--compare_count", "-1", "--weights", "w.pth", "--data_dir", "d"], "--compare_count must be >= 0, got -1"),
    ("evaluate", ["--noc", "-1", "--weights", "w.pth", "--data_dir", "d"], "--noc must be >= 0, got -1"),
])
def test_mask_generation_values_out_of_range_are_one_line(tmp_path, tool, argv, message):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    main = {"predict": predict.main, "evaluate": evaluate.main}[tool]
    common = ["--model_type", "vit_t", "--checkpoint", "none", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=f"^{message}$"):
        main(common + (["--image", str(image)] if tool == "predict" else []) + argv)
    assert not (tmp_path / "out").exists()
