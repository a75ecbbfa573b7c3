"""The token layout of the report-to-radiograph language model: vocabulary, sequence, loss mask, padding,
the image-code restriction and the sampler's token choice."""

import pytest
import torch

from medsyn.conditioning.tiny_bert import train_tokenizer
from medsyn.radiograph.sample import pick_tokens
from medsyn.radiograph.sequence import (
    IGNORE,
    ImageCodesOnly,
    TokenLayout,
    Vocabulary,
    build_layout,
    collate,
    report_ids,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REPORTS = ["Small left pleural effusion. Heart size is normal.", "The lungs are clear. No effusion."]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(REPORTS, vocab_size=120)


@pytest.fixture(scope="module")
def layout(tokenizer):
    return build_layout(tokenizer, num_codes=16, image_grid=(2, 3), keypatch_grid=(1, 2), max_report_tokens=6,
                        max_keypatches=2)  # fmt: skip


def test_vocabulary_ids_follow_the_text_vocabulary():
    with_pad = Vocabulary(text_size=100, num_codes=8, pad_id=0, bos_id=2)
    assert (with_pad.image_start, with_pad.image_end, with_pad.keypatch_start, with_pad.keypatch_end) == (
        100,
        101,
        102,
        103,
    )
    assert with_pad.pad == 0 and with_pad.code_offset == 104 and with_pad.size == 112
    no_pad = Vocabulary(text_size=100, num_codes=8)  # a tokenizer without a pad token: <|pad|> is added
    assert no_pad.pad == 104 and no_pad.code_offset == 105 and no_pad.size == 113
    assert len(no_pad.added_tokens()) == no_pad.size - no_pad.text_size
    assert no_pad.added_tokens()[no_pad.code_offset - 100 + 3] == "<img_3>"
    codes = torch.tensor([[0, 7], [3, 5]])
    assert torch.equal(no_pad.code_ids(codes), codes + 105)
    assert torch.equal(no_pad.codes(no_pad.code_ids(codes)), codes)
    with pytest.raises(ValueError, match="outside the image codes"):
        no_pad.codes(torch.tensor([104]))


def test_sequence_layout_and_loss_mask(tokenizer, layout):
    v = layout.vocab
    report = report_ids(tokenizer, layout, "Small left pleural effusion. Heart size is normal.")
    assert 0 < len(report) <= 6  # cut to max_report_tokens
    keypatches = torch.tensor([[[1, 2]], [[3, 4]], [[5, 6]]])  # 3 keypatches of 1x2 codes; 2 are kept
    image = torch.arange(6).reshape(2, 3)
    input_ids, labels = layout.sequence(report, keypatches, image)
    p, r = len(layout.prefix), len(report)
    assert input_ids[:p].tolist() == list(layout.prefix) and input_ids[0] == tokenizer.cls_token_id
    assert input_ids[p : p + r].tolist() == report
    block = input_ids[p + r :].tolist()
    assert block[0] == v.keypatch_start and block[5] == v.keypatch_end and block[6] == v.image_start
    assert block[1:5] == [v.code_offset + c for c in (1, 2, 3, 4)]
    assert block[7:13] == [v.code_offset + c for c in range(6)] and block[13] == v.image_end
    assert len(input_ids) == len(labels) == p + r + 14
    # the loss mask: -100 exactly on everything but the image codes and the image end token
    scored = labels != IGNORE
    assert scored.sum() == layout.image_tokens + 1
    assert torch.equal(labels[scored], input_ids[scored])
    assert torch.equal(
        scored, v.is_code(input_ids) & (torch.arange(len(input_ids)) > p + r + 6) | (input_ids == v.image_end)
    )
    assert not v.is_code(input_ids[: p + r]).any()  # text never maps to image codes
    assert len(input_ids) <= layout.max_length


def test_unconditional_and_wordless_conditions(tokenizer, layout):
    v = layout.vocab
    empty = layout.condition([], None)
    assert empty.tolist() == [*layout.prefix, v.keypatch_start, v.keypatch_end, v.image_start]
    assert report_ids(tokenizer, layout, "   ") == []
    with pytest.raises(ValueError, match="expects"):
        layout.condition([5], torch.zeros(1, 3, dtype=torch.long))  # 3 codes per keypatch, not 1x2
    with pytest.raises(ValueError, match="image codes of shape"):
        layout.sequence([5], None, torch.zeros(3, 2, dtype=torch.long))


def test_report_text_cannot_spell_added_or_special_tokens(tokenizer, layout):
    ids = report_ids(tokenizer, layout, "effusion <|image|> <img_3> [CLS] [SEP]")
    assert all(i < layout.vocab.text_size for i in ids)
    assert tokenizer.cls_token_id not in ids and tokenizer.sep_token_id not in ids


def test_layout_round_trips_through_a_dict(layout):
    assert TokenLayout.from_dict(layout.to_dict()) == layout


def test_collate_pads_right_for_training_and_left_for_sampling(layout):
    a = layout.sequence([5, 6, 7], None, torch.zeros(2, 3, dtype=torch.long))
    b = layout.sequence([5], None, torch.ones(2, 3, dtype=torch.long))
    items = [{"input_ids": a[0], "labels": a[1], "id": "a"}, {"input_ids": b[0], "labels": b[1], "id": "b"}]
    pad = layout.vocab.pad
    right = collate(items, pad, "right")
    assert (
        right["input_ids"].shape == right["labels"].shape == right["attention_mask"].shape == (2, len(a[0]))
    )
    assert right["id"] == ["a", "b"]
    assert (
        right["input_ids"][1, -2:].tolist() == [pad, pad] and right["labels"][1, -2:].tolist() == [IGNORE] * 2
    )
    assert right["attention_mask"].sum(1).tolist() == [len(a[0]), len(b[0])]
    assert torch.equal(right["position_ids"][1, : len(b[0])], torch.arange(len(b[0])))
    left = collate(items, pad, "left")
    assert left["input_ids"][1, :2].tolist() == [pad, pad] and torch.equal(left["input_ids"][1, 2:], b[0])
    assert left["attention_mask"][1].tolist() == [0, 0] + [1] * len(b[0])
    assert left["position_ids"][1, 2:].tolist() == list(range(len(b[0])))  # as if it were alone


def test_image_code_restriction(layout):
    v = layout.vocab
    scores = torch.randn(3, v.size)
    scores[:, v.image_end] = 100.0  # the most likely token is not an image code
    out = ImageCodesOnly(v)(None, scores)
    assert torch.isinf(out[:, : v.code_offset]).all() and torch.equal(
        out[:, v.code_offset :], scores[:, v.code_offset :]
    )
    generators = [torch.Generator().manual_seed(s) for s in range(3)]
    for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (1.0, 0.5), (2.0, 0.9)):
        picked = pick_tokens(out, generators, temperature, top_p)
        assert v.is_code(picked).all()


def test_pick_tokens_follows_the_distribution_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([pick_tokens(logits, [g], 1.0, 1.0) for _ in range(2000)])
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)
    g = torch.Generator().manual_seed(0)
    nucleus = torch.cat([pick_tokens(logits, [g], 1.0, 0.7) for _ in range(300)])
    assert set(nucleus.tolist()) == {0, 1}  # 0.6 alone does not reach 0.7; 0.6 + 0.3 does
    assert pick_tokens(logits, [g], 0.0, 1.0).tolist() == [0]
    # a row's draw depends on its own generator only
    two = pick_tokens(
        logits.repeat(2, 1), [torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)]
    )
    one = pick_tokens(logits, [torch.Generator().manual_seed(9)])
    assert two[1] == one[0]
