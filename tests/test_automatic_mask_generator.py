"""SamAutomaticMaskGenerator against the oracle's (mobile_sam) on identical random weights, on a real photo."""

import numpy as np
import pytest
import torch

from conftest import require_shared_data
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
from segment_anything.utils import amg
from segment_anything.utils.data import load_image
from segment_anything.utils.random_weights import randomize_

SIZE = 256  # encoder input: keeps the per-mask upsampling (and the test) cheap


class MemoEncoder(torch.nn.Module):
    """The encoder, run once per distinct input: both generators embed the same five crops."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.img_size, self.memo = encoder, encoder.img_size, {}

    def forward(self, x):
        key = (tuple(x.shape), x.float().sum().item(), x.flatten()[::97].float().sum().item())
        if key not in self.memo:
            self.memo[key] = self.encoder(x)
        return self.memo[key]


@pytest.fixture(scope="module")
def twins(mobile_sam):
    """Our vit_t at 256 px, and the oracle's Sam (its prompt encoder, decoder, predictor and
    generator) around the same encoder module with the same weights. The encoder is shared on
    purpose: the oracle's TinyViT only runs at 1024, where one generate() takes minutes on CPU;
    encoder parity is tested in tests/modeling."""
    ours = randomize_(sam_model_registry["vit_t"](image_size=SIZE), seed=0).eval()
    m = mobile_sam.modeling
    grid = SIZE // 16
    theirs = m.Sam(
        image_encoder=ours.image_encoder,
        prompt_encoder=m.PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(SIZE, SIZE), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.image_encoder = theirs.image_encoder = MemoEncoder(ours.image_encoder)
    return ours, theirs.eval()


@pytest.fixture(scope="module")
def photo():
    nails = require_shared_data("nails")
    return load_image(nails / "images" / "3493127D-7B19-4E50-94AE-2401BD2A91C8.jpg")  # 259 x 194


# Random weights give low predicted IoUs, logits near 0 and many masks with the same box, so
# each setting below is chosen to keep enough masks to compare. "filters": the IoU and
# stability thresholds (small offset: otherwise every stability score is 0) and the clean-up
# do the work, NMS suppresses nothing. "nms": no score filters; box NMS inside crops, NMS
# across crops and the NMS after the clean-up do the work.
SETTINGS = {
    "filters": dict(points_per_side=4, pred_iou_thresh=-1.3, stability_score_thresh=0.01, stability_score_offset=0.05,
                    crop_n_layers=1, box_nms_thresh=1.0, crop_nms_thresh=1.0, min_mask_region_area=20,
                    output_mode="binary_mask"),
    "nms": dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_n_layers=1,
                min_mask_region_area=5, output_mode="coco_rle"),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_records_match_the_oracle(twins, photo, mobile_sam, setting):
    ours, theirs = twins
    kwargs = SETTINGS[setting]
    got = SamAutomaticMaskGenerator(ours, **kwargs).generate(photo)
    ref = mobile_sam.SamAutomaticMaskGenerator(theirs, **kwargs).generate(photo)
    assert len(ref) >= 6, "settings keep too few masks to compare anything"
    assert len(got) == len(ref)
    if setting == "nms":
        assert any(r["crop_box"] != [0, 0, photo.shape[1], photo.shape[0]] for r in ref), "no mask from a crop"
    for g, r in zip(got, ref):
        assert set(g) == set(r)
        assert g["bbox"] == r["bbox"] and g["area"] == r["area"]
        assert g["point_coords"][0] == pytest.approx(r["point_coords"][0])
        assert g["crop_box"] == r["crop_box"]
        assert g["predicted_iou"] == pytest.approx(r["predicted_iou"], abs=1e-4)
        assert g["stability_score"] == pytest.approx(r["stability_score"], abs=1e-3)
        if kwargs["output_mode"] == "binary_mask":
            assert g["segmentation"].shape == photo.shape[:2] and g["segmentation"].dtype == bool
            assert np.array_equal(g["segmentation"], r["segmentation"])
        else:
            assert g["segmentation"] == r["segmentation"]


def test_helpers_against_the_oracle(mobile_sam):
    ref = mobile_sam.utils.amg
    for n in (1, 4, 7):
        assert np.array_equal(amg.build_point_grid(n), ref.build_point_grid(n))
    for size, layers, ratio in [((259, 194), 2, 512 / 1500), ((600, 800), 1, 0.2), ((33, 1000), 3, 0.5)]:
        assert amg.generate_crop_boxes(size, layers, ratio) == ref.generate_crop_boxes(size, layers, ratio)
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((6, 9, 11)) < 0.1)
    masks[2] = False
    masks[3, 4, 5] = True
    masks[3, ~(torch.arange(9) == 4)] = False
    assert torch.equal(amg.batched_mask_to_box(masks), ref.batched_mask_to_box(masks))
    for m in masks:
        rle = amg.mask_to_rle_pytorch(m[None])[0]
        assert rle == ref.mask_to_rle_pytorch(m[None])[0]
        assert np.array_equal(amg.rle_to_mask(rle), m.numpy())
        assert amg.area_from_rle(rle) == int(m.sum())
    logits = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(amg.calculate_stability_score(logits, 0.0, 0.5), ref.calculate_stability_score(logits, 0.0, 0.5))


def test_bad_arguments_are_clear_errors(twins):
    ours, _ = twins
    with pytest.raises(ValueError, match="exactly one"):
        SamAutomaticMaskGenerator(ours, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        SamAutomaticMaskGenerator(ours, output_mode="png")
    with pytest.raises(ValueError, match="uint8"):
        SamAutomaticMaskGenerator(ours).generate(np.zeros((10, 10), np.uint8))
