"""The parts of LM topic steering, on known answers: which codes a topic gets, the base-model loss
of continuations after prompts of different lengths, the SAE baseline's feature choice and clamp,
and the dead-code count of a cache."""

import numpy as np
import pytest
import torch

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.analysis.cache import CodeCache
from tl_codebook.analysis.concepts import ConceptScores
from tl_codebook.analysis.search import CodeMatch
from tl_codebook.text.experiment import dead_fraction, topic_mask
from tl_codebook.text.sae_baseline import choose_features, clamp_hook, sae_site
from tl_codebook.text.steering import (
    TopicCodes,
    check_prompt_fits,
    choose_topic_codes,
    continuation_losses,
)


def match(hook, group, code, precision, recall):
    f1 = 2 * precision * recall / (precision + recall)
    return CodeMatch(hook, group, code, precision, recall, f1=f1, count=10, true_positives=5)


class FakeCache:
    """search() as CodeCache.search filters: by the recall and precision floors."""

    def __init__(self, found):
        self.found = found
        self.asked = None

    def search(self, mask, min_recall, min_precision, top):
        self.asked = (min_recall, min_precision, top)
        return [m for m in self.found if m.recall >= min_recall and m.precision >= min_precision]


def test_topic_codes_take_each_slots_best_f1_codes_then_the_best_slots():
    found = [
        match("a", 0, 1, 0.90, 0.10),  # F1 0.18
        match("a", 0, 2, 0.60, 0.40),  # F1 0.48: the best of slot (a, 0)
        match("a", 1, 3, 0.55, 0.20),  # F1 0.29: slot (a, 1), third best slot
        match("b", 0, 4, 0.80, 0.30),  # F1 0.44: slot (b, 0)
        match("b", 0, 5, 0.99, 0.01),  # below the recall floor
        match("b", 1, 6, 0.30, 0.90),  # below the precision floor
    ]
    cache = FakeCache(found)
    mask = np.ones((1, 1), bool)
    chosen = choose_topic_codes(cache, "sports", mask, slots=2, min_recall=0.05, min_precision=0.5)
    assert cache.asked == (0.05, 0.5, None)
    assert [(m.hook, m.group, m.code) for m in chosen.matches] == [("a", 0, 2), ("b", 0, 4)]
    assert chosen.spec == {"a": {0: [2]}, "b": {0: [4]}}
    two = choose_topic_codes(cache, "sports", mask, 1, 0.05, codes_per_slot=2, min_precision=0.5)
    assert two.spec == {"a": {0: [2, 1]}}
    with pytest.raises(ValueError, match="No code fires on at least 50% of topic 'tech'"):
        choose_topic_codes(FakeCache(found[:2]), "tech", mask, 2, 0.5, min_precision=0.5)


def test_topic_codes_spec_groups_codes_by_site_and_head():
    codes = TopicCodes(
        "x", [match("a", 0, 1, 1.0, 1.0), match("a", 0, 7, 1.0, 1.0), match("a", 2, 3, 1.0, 1.0)]
    )
    assert codes.spec == {"a": {0: [1, 7], 2: [3]}}
    assert codes.to_dict()["codes"][1]["code"] == 7


def test_prompt_that_leaves_no_room_is_refused_with_its_numbers():
    check_prompt_fits(10, 22, 32, "ok")
    with pytest.raises(
        ValueError, match=r"'long' is 30 tokens; with 5 new tokens .* context of 32"
    ):
        check_prompt_fits(30, 5, 32, "long")


def test_continuation_losses_match_a_forward_per_row(tiny_cfg):
    model = HookedCodebookTransformer(tiny_cfg)
    prompts = [torch.tensor([1, 2]), torch.tensor([3, 4, 5, 6])]
    new = torch.tensor([[7, 8, 9], [1, 1, 2]])
    losses = continuation_losses(model, prompts, new)
    for i, prompt in enumerate(prompts):
        row = torch.cat([prompt, new[i]]).unsqueeze(0)
        log_probs = model(row)[0].log_softmax(-1)
        start = prompt.shape[0]
        expected = -torch.stack([log_probs[start - 1 + j, new[i, j]] for j in range(3)]).mean()
        assert losses[i] == pytest.approx(float(expected), abs=1e-5)


def test_continuation_losses_read_the_base_model_not_the_codebooks(tiny_cfg):
    model = HookedCodebookTransformer(tiny_cfg)
    prompts, new = [torch.tensor([1, 2, 3])], torch.tensor([[4, 5]])
    before = continuation_losses(model, prompts, new)
    model.add_codebook(
        Codebook(CodebookConfig(d_in=16, num_codes=4, k=1, hook_name="blocks.0.hook_resid_post"))
    )
    assert torch.equal(continuation_losses(model, prompts, new), before)


def test_sae_features_are_the_most_precise_above_the_recall_floor():
    # 1 group, 4 features, 2 topics; topic 0 has 10 tokens, topic 1 has 10
    joint = torch.tensor([[[5, 0], [2, 0], [9, 9], [1, 0]]])
    scores = ConceptScores.from_counts(joint, joint.sum(-1), torch.tensor([10, 10]))
    values = torch.arange(8.0).reshape(4, 2)
    chosen = choose_features(scores, values, topic=0, n=2, min_recall=0.15)
    # features 0 (P 1.0, R .5), 1 (P 1.0, R .2): both precise; 0 first on recall; 3 (R .1) too rare
    assert [c["feature"] for c in chosen] == [0, 1]
    assert chosen[0]["value"] == 0.0 and chosen[1]["value"] == 2.0
    assert choose_features(scores, values, topic=1, n=2, min_recall=0.95) == []


class LinearSAE:
    """encode = relu(x @ E), decode = a @ D: clamping has a hand-computable effect."""

    d_sae = 2

    def __init__(self):
        self.E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        self.D = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])

    def encode(self, x):
        return torch.relu(x @ self.E)

    def decode(self, a):
        return a @ self.D


def test_clamp_hook_adds_only_the_change_of_the_clamped_feature():
    sae = LinearSAE()
    hook = clamp_hook(sae, [{"feature": 0, "value": 4.0}])
    x = torch.tensor([[[1.0, 5.0, -2.0]]])  # feature 0 is 1.0 here: +3 of its direction
    out = hook(x.clone(), None)
    assert torch.allclose(out, x + 3.0 * sae.D[0])
    z = x.reshape(1, 1, 3, 1)  # a [b, pos, heads, d_head] activation is flattened and back
    assert hook(z.clone(), None).shape == z.shape


def test_sae_site_is_where_most_steering_codes_sit():
    codes = {
        "a": {"steering_codes": [{"hook": "h1"}, {"hook": "h2"}]},
        "b": {"steering_codes": [{"hook": "h2"}]},
    }
    assert sae_site(codes, fallback="h0") == "h2"
    assert sae_site({"a": {"steering_codes": []}}, fallback="h0") == "h0"


def test_dead_fraction_and_topic_mask_on_a_built_cache(tmp_path, tiny_cfg):
    model = HookedCodebookTransformer(tiny_cfg)
    cb = Codebook(CodebookConfig(d_in=16, num_codes=8, k=1, hook_name="blocks.0.hook_resid_post"))
    model.add_codebook(cb)
    tokens = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    cache = CodeCache.build(model, tokens, tmp_path / "cache", progress=False)
    used = np.unique(np.asarray(cache.codes("blocks.0.hook_resid_post"))[:, 1:]).size
    assert dead_fraction(cache) == pytest.approx(1 - used / 8)
    mask = topic_mask(cache, ["x", "y", "x"], "x")
    assert mask[:, 0].sum() == 0 and mask[[0, 2], 1:].all() and not mask[1].any()
