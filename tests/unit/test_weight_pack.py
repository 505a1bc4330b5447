"""Packed weights: one aligned flat buffer and its layout; views come back equal (no Ray)."""

import torch

from online_dpo.weight_sync import ALIGN, pack, unpack


def test_pack_round_trips_dtypes_and_shapes_and_drops_a_tied_head():
    state = {"embed.weight": torch.randn(5, 3), "norm.weight": torch.randn(3), "step": torch.tensor([7]),
             "lm_head.weight": torch.randn(5, 3)}
    buffer, layout = pack(state, tied=True)
    assert [name for name, *_ in layout] == ["embed.weight", "norm.weight", "step"]
    assert all(offset % ALIGN == 0 for *_, offset in layout) and buffer.dtype == torch.uint8
    back = unpack(bytearray(buffer.numpy().tobytes()), layout)
    assert all(torch.equal(back[k], state[k]) for k in back)
    assert back["step"].dtype == torch.int64


def test_pack_casts_floats_only():
    buffer, layout = pack({"w": torch.randn(4, 4), "ids": torch.arange(3)}, dtype=torch.bfloat16)
    back = unpack(buffer, layout)
    assert back["w"].dtype == torch.bfloat16 and back["ids"].dtype == torch.int64
    assert buffer.numel() == 2 * ALIGN   # 32 bytes of bf16 and 24 of int64, each padded to the alignment
