"""utils/amg.py and utils/onnx.py under Meta's public names: each name of Meta's 1.0 modules exists
here with Meta's parameters, and gives what the oracle's (mobile_sam's copy of Meta's helpers) gives."""

import ast
import importlib
import inspect

import numpy as np
import pytest
import torch

from conftest import META_SAM_DIR
from segment_anything import sam_model_registry
from segment_anything.utils import amg, onnx
from segment_anything.utils.amg import (MaskData, area_from_rle, batch_iterator, batched_mask_to_box,
                                        box_xyxy_to_xywh, build_all_layer_point_grids, calculate_stability_score,
                                        coco_encode_rle, is_box_near_crop_edge, mask_to_rle_pytorch,
                                        remove_small_regions, uncrop_boxes_xyxy, uncrop_masks, uncrop_points)
from segment_anything.utils.onnx import SamOnnxModel
from segment_anything.utils.random_weights import randomize_


def meta_signatures(module: str):
    """{name: [parameter names]} of the public functions, classes (their __init__) and public
    methods of Meta's segment_anything/utils/<module>.py, read from its source."""
    path = META_SAM_DIR / "segment_anything" / "utils" / f"{module}.py"
    if not path.is_file():
        pytest.skip(f"Meta's segment-anything 1.0 is not in {META_SAM_DIR}")
    def names(args):
        return [a.arg for a in args.args if a.arg != "self"] + [a.arg for a in (args.vararg, args.kwarg) if a]

    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            out[node.name] = names(node.args)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and (item.name == "__init__" or not item.name.startswith("_")):
                    out[f"{node.name}.{item.name}"] = names(item.args)
    return out


@pytest.mark.parametrize("module", [amg, onnx], ids=["amg", "onnx"])
def test_meta_names_with_meta_parameters(module):
    for name, params in meta_signatures(module.__name__.rsplit(".", 1)[1]).items():
        obj = module
        for part in name.split("."):
            assert hasattr(obj, part), f"{module.__name__} has no {name}"
            obj = getattr(obj, part)
        ours = [p for p in inspect.signature(obj).parameters if p != "self"]
        assert ours == params, f"{name}: ours {ours}, Meta's {params}"


def test_mask_data_filters_and_concatenates_like_the_oracle(mobile_sam):
    ref = mobile_sam.utils.amg
    columns = dict(t=torch.arange(6.0), a=np.arange(12).reshape(6, 2), l=list("abcdef"))
    for keep in (torch.tensor([True, False, True, True, False, True]), torch.tensor([4, 0, 2])):
        ours, theirs = MaskData(**columns), ref.MaskData(**columns)
        ours.filter(keep), theirs.filter(keep)
        ours.cat(MaskData(**columns)), theirs.cat(ref.MaskData(**columns))
        ours.to_numpy(), theirs.to_numpy()
        for key, value in theirs.items():
            assert np.array_equal(np.asarray(ours[key]), np.asarray(value)), key
    del ours["l"]
    assert [k for k, _ in ours.items()] == ["t", "a"]
    with pytest.raises(TypeError, match="column 'x'"):
        MaskData(x=3)


def test_helpers_match_the_oracle(mobile_sam):
    ref = mobile_sam.utils.amg
    gen = torch.Generator().manual_seed(0)
    boxes = torch.randint(0, 100, (40, 4), generator=gen)
    crop, image = [30, 10, 130, 90], [0, 0, 200, 150]
    assert torch.equal(is_box_near_crop_edge(boxes, crop, image), ref.is_box_near_crop_edge(boxes, crop, image))
    assert torch.equal(is_box_near_crop_edge(boxes, crop, image, atol=5), ref.is_box_near_crop_edge(boxes, crop, image, 5))
    for shape in ((7, 4), (3, 7, 4)):
        b = torch.randint(0, 50, shape, generator=gen)
        assert torch.equal(uncrop_boxes_xyxy(b, crop), ref.uncrop_boxes_xyxy(b, crop))
        p = torch.rand(*shape[:-1], 2, generator=gen, dtype=torch.float64)
        assert torch.equal(uncrop_points(p, crop), ref.uncrop_points(p, crop))
    masks = torch.rand(3, 80, 100, generator=gen) > 0.7
    for c in (crop, [0, 0, 100, 80]):
        assert torch.equal(uncrop_masks(masks, c, 150, 200), ref.uncrop_masks(masks, c, 150, 200))
    assert torch.equal(box_xyxy_to_xywh(boxes[0]), ref.box_xyxy_to_xywh(boxes[0]))
    assert list(batch_iterator(3, list(range(7)), "abcdefg")) == list(ref.batch_iterator(3, list(range(7)), "abcdefg"))
    assert [[np.array_equal(a, b)] for a, b in zip(build_all_layer_point_grids(8, 2, 2), ref.build_all_layer_point_grids(8, 2, 2))] == [[True]] * 3
    logits = torch.randn(2, 3, 16, 16, generator=gen)  # any leading dims, as the ONNX decoder uses it
    torch.testing.assert_close(calculate_stability_score(logits, 0.0, 1.0), ref.calculate_stability_score(logits, 0.0, 1.0))
    small = torch.rand(2, 3, 9, 11, generator=gen) > 0.8
    assert torch.equal(batched_mask_to_box(small), ref.batched_mask_to_box(small))
    for rle, theirs in zip(mask_to_rle_pytorch(masks), ref.mask_to_rle_pytorch(masks)):
        assert rle == theirs and area_from_rle(rle) == ref.area_from_rle(theirs)
        pytest.importorskip("pycocotools")
        assert coco_encode_rle(rle) == ref.coco_encode_rle(theirs)
    blob = np.zeros((30, 30), bool)
    blob[2:20, 2:20], blob[25:27, 25:27], blob[5:7, 5:7] = True, True, False
    for mode in ("holes", "islands"):
        got, changed = remove_small_regions(blob, 10, mode)
        want, want_changed = ref.remove_small_regions(blob, 10, mode)
        assert changed == want_changed and np.array_equal(got, want)


@pytest.fixture(scope="module")
def twins(mobile_sam):
    """Our vit_t at 256 px and the oracle's Sam around the same encoder, with the same weights."""
    size, grid = 256, 16
    ours = randomize_(sam_model_registry["vit_t"](image_size=size), seed=3).eval()
    m = mobile_sam.modeling
    theirs = m.Sam(
        image_encoder=ours.image_encoder,
        prompt_encoder=m.PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(size, size),
                                       mask_in_chans=16),
        mask_decoder=m.MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                                   transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)),
    )
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs.eval()


@pytest.mark.parametrize("options", [(False, False, False), (True, False, False), (True, True, False), (False, True, True)])
def test_onnx_model_matches_the_oracle(twins, options):
    """Every constructor option of Meta's SamOnnxModel, on the same inputs."""
    ours, theirs = twins
    inputs = onnx.dummy_inputs(ours, num_points=3)
    got = SamOnnxModel(ours, *options)(*inputs)
    want = importlib.import_module("mobile_sam.utils.onnx").SamOnnxModel(theirs, *options)(*inputs)
    assert len(got) == len(want) == (5 if options[2] else 3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=1e-4, rtol=1e-4)
