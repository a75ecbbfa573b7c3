"""Tests for medsyn.conditioning.text: the tiny offline BERT, the frozen conditioner, condition dropout and caches."""

from __future__ import annotations

import json
import os
import shutil
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported

import pytest
import torch

from medsyn.conditioning import TextConditioner, build_tiny_bert, train_tokenizer
from medsyn.conditioning.features import FeatureCache, text_key
from medsyn.errors import ConfigError, DataError

REPORTS = [
    "FINDINGS: There is a large right pleural effusion. IMPRESSION: Large right pleural effusion.",
    "FINDINGS: Small left pleural effusion with adjacent atelectasis. IMPRESSION: Small left effusion.",
    "FINDINGS: No pleural effusion. No pneumothorax. IMPRESSION: No acute cardiopulmonary abnormality.",
    "FINDINGS: The heart is enlarged. IMPRESSION: Cardiomegaly.",
    "FINDINGS: Heart size is normal. No pericardial effusion. IMPRESSION: Normal heart size.",
    "FINDINGS: Centrilobular emphysema in both upper lobes. IMPRESSION: Moderate emphysema.",
    "FINDINGS: Paraseptal emphysema with a large bulla in the right apex. IMPRESSION: Bullous emphysema.",
    "FINDINGS: No emphysema. The lungs are clear. IMPRESSION: Clear lungs.",
    "FINDINGS: A 12 mm solid nodule in the right upper lobe. IMPRESSION: Pulmonary nodule, follow-up advised.",
    "FINDINGS: Multiple small nodules in both lungs. IMPRESSION: Multiple pulmonary nodules.",
    "FINDINGS: No suspicious pulmonary nodule. IMPRESSION: No nodules.",
    "FINDINGS: Consolidation in the left lower lobe with air bronchograms. IMPRESSION: Pneumonia.",
    "FINDINGS: Patchy ground-glass opacities in the right middle lobe. IMPRESSION: Infection likely.",
    "FINDINGS: No consolidation or ground-glass opacity. IMPRESSION: Normal lung parenchyma.",
    "FINDINGS: Small right pneumothorax at the apex. IMPRESSION: Right pneumothorax.",
    "FINDINGS: The airways are patent. No bronchiectasis. IMPRESSION: Normal airways.",
    "FINDINGS: Cylindrical bronchiectasis in the lower lobes. IMPRESSION: Bronchiectasis.",
    "FINDINGS: Mediastinal lymph nodes are not enlarged. IMPRESSION: No lymphadenopathy.",
    "FINDINGS: Enlarged subcarinal lymph node. IMPRESSION: Mediastinal lymphadenopathy.",
    "FINDINGS: Mild cardiomegaly and bilateral small effusions. IMPRESSION: Findings of heart failure.",
    "FINDINGS: The pulmonary arteries are normal in caliber. IMPRESSION: No pulmonary hypertension.",
    "FINDINGS: Dilated main pulmonary artery. IMPRESSION: Possible pulmonary hypertension.",
    "FINDINGS: Linear scarring in the lingula. IMPRESSION: Post-inflammatory scarring.",
    "FINDINGS: Interlobular septal thickening at both bases. IMPRESSION: Interstitial edema.",
    "FINDINGS: Honeycombing and reticulation in the lower lobes. IMPRESSION: Pulmonary fibrosis.",
    "FINDINGS: No fibrosis. IMPRESSION: Unremarkable chest CT.",
    "FINDINGS: A calcified granuloma in the left upper lobe. IMPRESSION: Old granulomatous disease.",
    "FINDINGS: The trachea and main bronchi are normal. IMPRESSION: Normal study.",
    "FINDINGS: Moderate left pleural effusion without pneumothorax. IMPRESSION: Left effusion.",
    "FINDINGS: Emphysema and a large right effusion. Heart size normal. IMPRESSION: Emphysema, effusion.",
]
HIDDEN = 32


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Offline hub, and any socket connection is recorded (and refused) so a test can fail on it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted in a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield
    assert not attempts, f"the test tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("text") / "tiny-bert", REPORTS, hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def cond(model_dir):
    return TextConditioner(model_dir, max_length=192, ucg_rate=0.1)


def test_tiny_bert_directory_is_a_standard_hf_model(model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == HIDDEN
    vocab = (model_dir / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(vocab) <= config["vocab_size"]


def test_tokenizer_lowercases_and_wraps_in_cls_sep():
    tok = train_tokenizer(REPORTS, vocab_size=300)
    upper, lower = tok("PLEURAL EFFUSION")["input_ids"], tok("pleural effusion")["input_ids"]
    assert upper == lower
    assert upper[0] == tok.cls_token_id == 2 and upper[-1] == tok.sep_token_id == 3
    assert tok.pad_token_id == 0 and tok.unk_token_id not in upper
    with pytest.raises(ValueError, match="non-empty"):
        train_tokenizer(["", "  "])


def test_shapes_dtypes_and_padding_masked(cond):
    texts = ["No effusion.", REPORTS[0], REPORTS[19]]
    out = cond(texts)
    assert set(out) == {"context", "context_mask"}
    ctx, mask = out["context"], out["context_mask"]
    lengths = [len(cond.tokenizer(t)["input_ids"]) for t in texts]
    assert cond.hidden_size == HIDDEN
    assert ctx.shape == (3, max(lengths), HIDDEN) and ctx.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    assert torch.all(ctx[~mask] == 0)  # padding carries no features
    # the pad tokens are masked out of attention: a text's features do not depend on its batch
    alone = cond.encode(texts[0])
    torch.testing.assert_close(alone["context"][0], ctx[0, : lengths[0]], atol=1e-5, rtol=1e-5)


def test_truncation_and_max_length_padding(model_dir):
    short = TextConditioner(model_dir, max_length=8, padding="max_length")
    out = short.encode([" ".join(REPORTS), "effusion"])
    assert out["context"].shape == (2, 8, HIDDEN)
    assert out["context_mask"][0].all() and out["context_mask"][1].sum() == 3
    assert short.null_condition(2)["context"].shape == (2, 8, HIDDEN)  # matches for batched CFG


def test_frozen_eval_and_only_learned_null_trains(model_dir):
    cond = TextConditioner(model_dir, null_kind="learned", null_length=3, ucg_rate=0.5, cache_size=0)
    trainable = [n for n, p in cond.named_parameters() if p.requires_grad]
    assert trainable == ["null_context"]
    cond.train()
    assert not cond.training and not cond.encoder.training
    before = {k: v.clone() for k, v in cond.encoder.state_dict().items()}
    null_before = cond.null_context.detach().clone()
    head = torch.nn.Linear(HIDDEN, 1)
    opt = torch.optim.SGD([*cond.parameters(), *head.parameters()], lr=1.0)
    out = cond(REPORTS[:8], train=True, generator=torch.Generator().manual_seed(0))
    loss = (head(out["context"]).squeeze(-1) * out["context_mask"]).pow(2).sum()
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in cond.encoder.state_dict().items())
    assert not torch.equal(cond.null_context, null_before)
    torch.testing.assert_close(cond.encode(REPORTS[0])["context"], cond.encode(REPORTS[0])["context"])


def test_ucg_rate_one_always_null_zero_never(model_dir):
    cond = TextConditioner(model_dir, null_kind="zero")
    enc = cond.encode(REPORTS[:5])
    always = cond.apply_ucg(enc, rate=1.0)
    null = cond.null_condition(5, length=enc["context"].shape[1])
    assert torch.equal(always["context"], null["context"]) and torch.equal(
        always["context_mask"], null["context_mask"]
    )
    never = cond.apply_ucg(enc, rate=0.0)
    assert torch.equal(never["context"], enc["context"]) and torch.equal(
        never["context_mask"], enc["context_mask"]
    )
    forced = TextConditioner(model_dir, ucg_rate=1.0)(REPORTS[:3], train=True)
    assert forced["context_mask"].sum(1).tolist() == [1, 1, 1] and torch.all(forced["context"] == 0)


def test_ucg_is_per_sample_and_reproducible(cond):
    enc = cond.encode(REPORTS[:30])

    def dropped(generator=None):
        out = cond.apply_ucg(enc, generator, rate=0.5)
        return out["context_mask"].sum(1) != enc["context_mask"].sum(1)

    first = dropped(torch.Generator().manual_seed(1))
    assert 0 < first.sum() < 30  # some samples, not the whole batch
    assert torch.equal(first, dropped(torch.Generator().manual_seed(1)))
    assert not torch.equal(first, dropped(torch.Generator().manual_seed(2)))
    torch.manual_seed(3)
    global_rng = dropped()
    torch.manual_seed(3)
    assert torch.equal(global_rng, dropped())


def test_null_kinds(model_dir, cond):
    zero = cond.null_condition(2)
    assert zero["context"].shape == (2, 1, HIDDEN) and torch.all(zero["context"] == 0)
    assert zero["context_mask"].all()
    padded = cond.null_condition(2, length=6)
    assert padded["context_mask"][0].tolist() == [True] + [False] * 5

    learned = TextConditioner(model_dir, null_kind="learned", null_length=4)
    out = learned.null_condition(3)
    assert out["context"].shape == (3, 4, HIDDEN) and out["context_mask"].all()
    assert out["context"].requires_grad
    assert "null_context" in learned.state_dict()

    empty = TextConditioner(model_dir, null_kind="empty")
    ref = empty.encode("")
    out = empty.null_condition(2)
    torch.testing.assert_close(out["context"][0], ref["context"][0])
    assert out["context_mask"].shape == (2, 2)  # [CLS] [SEP]
    with pytest.raises(ValueError, match="more than 1"):
        empty.null_condition(1, length=1)
    with pytest.raises(ConfigError, match="null"):
        TextConditioner(model_dir, null_kind="random")


def test_learned_null_gets_a_gradient_even_when_nothing_is_dropped(model_dir):
    cond = TextConditioner(model_dir, null_kind="learned")
    out = cond.apply_ucg(cond.encode(REPORTS[:2]), rate=0.0)
    out["context"].sum().backward()  # distributed training needs the parameter in every graph
    assert cond.null_context.grad is not None and torch.all(cond.null_context.grad == 0)


def test_ucg_pads_when_null_is_longer(model_dir):
    cond = TextConditioner(model_dir, null_kind="learned", null_length=10)
    enc = cond.encode(["effusion", "no nodule"])  # 3 and 4 tokens
    out = cond.apply_ucg(enc, rate=1.0)
    assert out["context"].shape == (2, 10, HIDDEN) and out["context_mask"].all()


def test_encode_cached_hits_and_lru_bound(model_dir):
    cond = TextConditioner(model_dir, cache_size=2)
    texts = REPORTS[:2]
    first = cond.encode(texts)
    assert cond.cache_info()[:3] == (0, 2, 2)
    second = cond.encode(texts)
    assert cond.cache_info()[:3] == (2, 2, 2)
    assert torch.equal(first["context"], second["context"])
    assert torch.equal(first["context_mask"], second["context_mask"])
    uncached = TextConditioner(model_dir, cache_size=0).encode(texts)  # the same route without the cache
    assert torch.equal(first["context"], uncached["context"])
    cond.encode(REPORTS[2])  # evicts the least recently used entry
    assert REPORTS[0] not in cond._cache and REPORTS[2] in cond._cache and len(cond._cache) == 2
    cond(REPORTS[2])  # forward goes through the cache
    assert cond.cache_info().hits == 3


def test_feature_cache_rejects_negative_size():
    with pytest.raises(ValueError):
        FeatureCache(-1)
    assert text_key("a") != text_key("a ")


def test_precompute_roundtrip(tmp_path, cond, model_dir):
    path = cond.precompute(REPORTS[:6] + REPORTS[:2], tmp_path / "features.safetensors")
    loaded = cond.load_precomputed(REPORTS[3:5], path)
    ref = cond.encode(REPORTS[3:5])
    assert torch.equal(loaded["context_mask"], ref["context_mask"])
    torch.testing.assert_close(loaded["context"], ref["context"], atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match="no features for"):
        cond.load_precomputed([REPORTS[10]], path)
    with pytest.raises(ConfigError, match="max_length"):
        TextConditioner(model_dir, max_length=64).load_precomputed(REPORTS[:1], path)
    with pytest.raises(DataError, match="does not exist"):
        cond.load_precomputed(REPORTS[:1], tmp_path / "missing.safetensors")


def test_missing_local_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(DataError) as info:
        TextConditioner(missing)
    assert str(missing) in str(info.value) and "offline" in str(info.value)


def test_hub_name_offline_fails_without_network():
    with pytest.raises(DataError, match="offline"):
        TextConditioner("example-org/never-downloaded-bert")


def test_directory_without_tokenizer_is_rejected(tmp_path, model_dir):
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(DataError, match="no tokenizer"):
        TextConditioner(tmp_path)


def test_cxr_bert_like_directory_loads_its_bert_backbone(tmp_path, model_dir):
    """A checkpoint with a custom model_type and head (as CXR-BERT's) loads without remote code."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig.from_pretrained(model_dir))
    out = tmp_path / "cxr-bert-like"
    mlm.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(model_dir / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config.update(
        model_type="cxr-bert",
        architectures=["CXRBertModel"],
        auto_map={
            "AutoConfig": "configuration_cxrbert.CXRBertConfig",
            "AutoModel": "modeling_cxrbert.CXRBertModel",
        },
    )
    (out / "config.json").write_text(json.dumps(config))
    cond = TextConditioner(out)
    assert torch.equal(
        cond.encoder.embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight
    )
    mlm.eval()
    ids = cond.tokenizer(REPORTS[0], return_tensors="pt")
    ref = mlm.bert(**ids).last_hidden_state
    torch.testing.assert_close(cond.encode(REPORTS[0])["context"], ref, atol=1e-5, rtol=1e-5)


def test_state_dict_leaves_out_the_frozen_encoder(model_dir):
    cond = TextConditioner(model_dir, null_kind="learned")
    assert list(cond.state_dict()) == ["null_context"]
    state = {"null_context": torch.ones_like(cond.null_context)}
    cond.load_state_dict(state)  # strict: the encoder keeps its loaded weights
    assert torch.all(cond.null_context == 1)
    full = TextConditioner(model_dir, save_encoder=True)
    assert any(k.startswith("encoder.") for k in full.state_dict())


def test_invalid_settings(model_dir):
    with pytest.raises(ConfigError, match="ucg_rate"):
        TextConditioner(model_dir, ucg_rate=1.5)
    with pytest.raises(ConfigError, match="positions"):
        TextConditioner(model_dir, max_length=1024)
    with pytest.raises(ConfigError, match="padding"):
        TextConditioner(model_dir, padding="shortest")


def test_context_feeds_the_unet_cross_attention(model_dir):
    from medsyn.nn.unet import UNet

    cond = TextConditioner(model_dir, null_kind="learned", null_length=2, ucg_rate=1.0)
    net = UNet(
        spatial_dims=3,
        num_channels=[8, 16],
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=4,
        cross_attention_dim=cond.hidden_size,
        pooled_text=True,
    )
    torch.manual_seed(0)
    with torch.no_grad():  # the UNet zero-initialises its output and attention projections
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    x, t = torch.randn(2, 4, 8, 8, 8), torch.rand(2)
    texts = ["large right pleural effusion", "no effusion. heart size normal"]
    with torch.no_grad():
        y_text = net(x, t, **cond(texts))
        y_null = net(x, t, **cond.null_condition(2))
    assert y_text.shape == x.shape and not torch.allclose(y_text, y_null)
    net(x, t, **cond(texts, train=True)).square().mean().backward()  # every sample dropped: null trains
    assert cond.null_context.grad.abs().sum() > 0
