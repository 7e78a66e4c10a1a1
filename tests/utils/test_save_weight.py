"""Tests for segment_anything.utils.save_weight: partial weights saved, checked and loaded back."""

import argparse
import io
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.random_weights import randomize_
from segment_anything.utils.save_weight import (
    FORMAT, load_partial_weight, save_partial_weight, strip_prefixes, trainable_state_dict, unwrap_model,
)


def tiny_sam(embed_dim: int = 16, seed: int = 0) -> Sam:
    """A vit_b-structured SAM small enough to build in milliseconds: 64 px input, 4x4 embedding grid."""
    dim = 32
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=64, embed_dim=embed_dim, depth=1, num_heads=2, out_chans=dim,
                                      use_rel_pos=True, window_size=2, global_attn_indexes=()),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                     mask_in_chans=4),
        mask_decoder=MaskDecoder(transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2)),
    )
    return randomize_(sam, seed)


def freeze_all_but_decoder(sam: Sam) -> Sam:
    for name, p in sam.named_parameters():
        p.requires_grad_(name.startswith("mask_decoder."))
    return sam


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_saves_only_trainable_decoder(tmp_path):
    trained = freeze_all_but_decoder(tiny_sam(seed=0))
    path = save_partial_weight(trained, tmp_path / "run" / "best.pth", metadata={"model_type": "vit_b", "epoch": 3})

    raw = torch.load(path, weights_only=True)
    decoder_keys = {f"mask_decoder.{k}" for k in trained.mask_decoder.state_dict()}
    assert raw["format"] == FORMAT and set(raw["model"]) == decoder_keys
    assert "mask_decoder.transformer.layers.0.norm1.weight" in raw["model"]

    fresh = tiny_sam(seed=1)
    before = snapshot(fresh)
    meta = load_partial_weight(fresh, path, expected_model_type="vit_b")
    assert meta == {"format": FORMAT, "model_type": "vit_b", "epoch": 3}
    for key, value in fresh.state_dict().items():
        expected = trained.state_dict()[key] if key in decoder_keys else before[key]
        assert torch.equal(value, expected), key
    assert not torch.equal(before["image_encoder.pos_embed"], trained.state_dict()["image_encoder.pos_embed"])


def test_trainable_state_dict_is_a_detached_cpu_copy():
    sam = freeze_all_but_decoder(tiny_sam())
    weights = trainable_state_dict(sam)
    key = "mask_decoder.iou_token.weight"
    assert not weights[key].requires_grad and weights[key].device.type == "cpu"
    weights[key].add_(1.0)
    assert not torch.equal(weights[key], sam.state_dict()[key])


def test_wrapped_models_save_and_load_without_prefixes(tmp_path):
    sam = freeze_all_but_decoder(tiny_sam(seed=0))
    wrapped = torch.compile(nn.DataParallel(sam))  # compile is lazy: nothing is compiled unless called
    assert unwrap_model(wrapped) is sam
    assert set(trainable_state_dict(wrapped)) == set(trainable_state_dict(sam))

    save_partial_weight(wrapped, tmp_path / "w.pth")
    fresh = tiny_sam(seed=1)
    load_partial_weight(nn.DataParallel(fresh), tmp_path / "w.pth")
    assert torch.equal(fresh.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_flat_state_dict_with_wrapper_prefix_loads(tmp_path, prefix):
    source = tiny_sam(seed=0)
    # What a user gets from torch.save(ddp_model.state_dict()) restricted to the decoder.
    flat = {prefix + k: v for k, v in source.state_dict().items() if k.startswith("mask_decoder.")}
    torch.save(flat, tmp_path / "ddp.pth")
    fresh = tiny_sam(seed=1)
    assert load_partial_weight(fresh, tmp_path / "ddp.pth") == {}
    assert torch.equal(fresh.mask_decoder.output_upscaling[0].weight, source.mask_decoder.output_upscaling[0].weight)


def test_strip_prefixes_only_strips_real_prefixes():
    keys = {
        "module.mask_decoder.iou_token.weight": "mask_decoder.iou_token.weight",
        "_orig_mod.module.image_encoder.pos_embed": "image_encoder.pos_embed",
        # key[7:] would turn this into "coder.output_upscaling.0.weight"
        "mask_decoder.output_upscaling.0.weight": "mask_decoder.output_upscaling.0.weight",
        "modules.0.weight": "modules.0.weight",
    }
    assert list(strip_prefixes(dict.fromkeys(keys, 0))) == list(keys.values())
    with pytest.raises(ValueError, match="mask_decoder.iou_token.weight"):
        strip_prefixes({"module.mask_decoder.iou_token.weight": 0, "mask_decoder.iou_token.weight": 1})


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    save_partial_weight(tiny_sam(embed_dim=16), tmp_path / "small.pth", keys=["image_encoder.patch_embed"],
                        metadata={"model_type": "vit_t"})
    target = tiny_sam(embed_dim=24)
    before = snapshot(target)
    with pytest.raises(ValueError) as err:
        load_partial_weight(target, tmp_path / "small.pth")
    message = str(err.value)
    assert str(tmp_path / "small.pth") in message and "another model type" in message and "'vit_t'" in message
    assert "image_encoder.patch_embed.proj.weight: file (16, 3, 16, 16) vs model (24, 3, 16, 16)" in message
    # Nothing is half-loaded when the file is rejected.
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_vit_t_encoder_keys_are_unknown_to_a_vit_b_structure(tmp_path):
    vit_t = sam_model_registry["vit_t"](image_size=256)  # the slowest build in this file (~1 s)
    save_partial_weight(vit_t, tmp_path / "vit_t.pth", keys=["image_encoder.patch_embed"])
    with pytest.raises(ValueError) as err:
        load_partial_weight(tiny_sam(), tmp_path / "vit_t.pth")
    message = str(err.value)
    assert "another model type" in message and "unknown keys (not in this model) (12)" in message
    assert "image_encoder.patch_embed.seq.0.c.weight" in message and "... and 2 more" in message


def test_unknown_key_is_reported_or_skipped_when_not_strict(tmp_path):
    good = torch.randn(1, 32)
    torch.save({"mask_decoder.iou_token.weight": good, "mask_decoder.extra.bias": torch.zeros(3)},
               tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unknown keys[\s\S]*mask_decoder\.extra\.bias"):
        load_partial_weight(tiny_sam(), tmp_path / "extra.pth")
    sam = tiny_sam()
    with pytest.warns(UserWarning, match="skipped"):
        load_partial_weight(sam, tmp_path / "extra.pth", strict=False)
    assert torch.equal(sam.mask_decoder.iou_token.weight, good)


def test_model_type_mismatch_is_refused(tmp_path):
    sam = freeze_all_but_decoder(tiny_sam())
    save_partial_weight(sam, tmp_path / "h.pth", metadata={"model_type": "vit_h", "image_size": 1024})
    with pytest.raises(ValueError, match="'vit_h'.*'vit_b'"):
        load_partial_weight(tiny_sam(seed=1), tmp_path / "h.pth", expected_model_type="vit_b")
    assert load_partial_weight(tiny_sam(seed=1), tmp_path / "h.pth", expected_model_type="vit_h")["image_size"] == 1024
    assert load_partial_weight(tiny_sam(seed=1), tmp_path / "h.pth")["model_type"] == "vit_h"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_partial_weight(tiny_sam(), tmp_path / "nothing.pth")


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    sam = freeze_all_but_decoder(tiny_sam(seed=0))
    path = save_partial_weight(sam, tmp_path / "best.pth", metadata={"epoch": 1})
    old_bytes = path.read_bytes()

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):  # the in-memory metadata check, not the file
            return real_save(obj, f, *args, **kwargs)
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with torch.no_grad():
        sam.mask_decoder.iou_token.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_partial_weight(sam, path, metadata={"epoch": 2})
    monkeypatch.undo()

    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["best.pth"]  # no temporary file left behind
    assert load_partial_weight(tiny_sam(), path)["epoch"] == 1


def test_file_loads_with_weights_only_and_rejects_unpicklable_metadata(tmp_path):
    sam = freeze_all_but_decoder(tiny_sam())
    metadata = {"model_type": "vit_b", "image_size": 64, "epoch": 7, "metrics": {"iou": 0.8, "dice": [0.9, None]},
                "args": vars(argparse.Namespace(lr=1e-4, data="x/y", amp=False))}
    save_partial_weight(sam, tmp_path / "m.pth", metadata=metadata)
    raw = torch.load(tmp_path / "m.pth", map_location="cpu", weights_only=True)
    assert {k: v for k, v in raw.items() if k not in ("format", "model")} == metadata

    with pytest.raises(TypeError, match="weights_only"):
        save_partial_weight(sam, tmp_path / "bad.pth", metadata={"args": {"data": Path("x/y")}})
    with pytest.raises(ValueError, match="reserved"):
        save_partial_weight(sam, tmp_path / "bad.pth", metadata={"model": 1})
    assert not (tmp_path / "bad.pth").exists()


def test_nothing_trainable_or_unknown_prefix_is_an_error(tmp_path):
    sam = tiny_sam().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        save_partial_weight(sam, tmp_path / "a.pth")
    with pytest.raises(ValueError, match="mask_decoderx"):
        save_partial_weight(sam, tmp_path / "a.pth", keys=["mask_decoderx"])
    # keys selects by whole name components, ignores requires_grad and includes buffers.
    save_partial_weight(sam, tmp_path / "a.pth", keys="prompt_encoder.pe_layer")
    assert list(torch.load(tmp_path / "a.pth", weights_only=True)["model"]) == [
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
