"""LoRALinear against peft's LoRA layer (the reference), merging, and the adapter count formula."""

import pytest
import torch
from torch import nn

from segment_anything import sam_model_registry
from segment_anything.modeling.lora import LoRALinear, add_lora, lora_layers, merge_into, parse_targets


def test_lora_linear_matches_peft_and_merges_exactly():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(12, 36)  # a fused qkv: 3 x 12 outputs
    holder = nn.Module()
    holder.qkv = nn.Linear(12, 36)
    holder.qkv.load_state_dict(base.state_dict())
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=6, target_modules=["qkv"]), holder).qkv
    ours = LoRALinear(base, rank=3, alpha=6)
    # peft initialises A like ours (kaiming-uniform, a=sqrt(5)) and B at zero; give B values so the
    # update shows, and use the same A and B in both.
    with torch.no_grad():
        ours.lora_B.normal_()
        ref.lora_A["default"].weight.copy_(ours.lora_A)
        ref.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, 7, 12)
    torch.testing.assert_close(ours(x), ref(x))
    assert not torch.allclose(ours(x), base(x), atol=1e-3)
    merged = nn.Linear(12, 36)
    merged.load_state_dict({"weight": ours.merged_weight(), "bias": base.bias})
    torch.testing.assert_close(merged(x), ours(x), rtol=1e-5, atol=1e-5)


def test_a_new_adapter_changes_nothing_and_only_adapters_train():
    base = nn.Linear(4, 6)
    layer = LoRALinear(base, rank=2, alpha=4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.weight is base.weight and layer.scaling == 2.0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]


@pytest.mark.parametrize("rank", [1, 4])
def test_vit_b_adapter_count_is_r_times_in_plus_out_per_layer(rank):
    sam = sam_model_registry["vit_b"](image_size=64)
    stock_keys = set(sam.state_dict())
    sam.requires_grad_(False)
    names = add_lora(sam, rank, 8.0, ["qkv", "proj"])
    assert len(names) == 24 and names[0] == "image_encoder.blocks.0.attn.qkv"
    trainable = sum(p.numel() for p in sam.parameters() if p.requires_grad)
    # vit_b: 12 blocks; qkv 768 -> 2304, proj 768 -> 768.
    assert trainable == 12 * rank * ((768 + 2304) + (768 + 768))
    keys = set(sam.state_dict())
    assert stock_keys <= keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys - stock_keys)
    merged = merge_into({k: v for k, v in sam.state_dict().items() if "lora" in k}, sam)
    assert set(merged) == {f"{n}.weight" for n in names}


def test_decoder_target_wraps_the_two_way_transformer_attention():
    sam = sam_model_registry["vit_t"](image_size=64)
    names = add_lora(sam, 2, 2.0, parse_targets("decoder"))
    # 2 blocks x 3 attentions + the final token-to-image attention, 4 projections each
    assert len(names) == 7 * 4 and all(n.startswith("mask_decoder.transformer.") for n in names)
    assert set(lora_layers(sam)) == set(names)
    with pytest.raises(ValueError, match="unknown"):
        parse_targets("qkv,mlp")
