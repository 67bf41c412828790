"""Save/load: safetensors + JSON round trips, and clear errors for files that do not fit."""

import json

import pytest
import torch

from tl_codebook import Codebook, CodebookConfig, CodebookFileError, HookedCodebookTransformer


def model_with_codebooks(cfg):
    model = HookedCodebookTransformer(cfg)
    torch.manual_seed(3)
    model.add_codebook(
        Codebook(
            CodebookConfig(d_in=16, num_codes=12, k=2, n_groups=4, hook_name="blocks.0.attn.hook_z")
        )
    )
    model.add_codebook(
        Codebook(CodebookConfig(d_in=16, num_codes=12, k=1, hook_name="blocks.1.hook_mlp_out"))
    )
    return model


def test_single_codebook_round_trip(tmp_path):
    cb = Codebook(
        CodebookConfig(d_in=8, num_codes=5, k=2, n_groups=2, similarity="cosine", hook_name="h")
    )
    cb.save(tmp_path / "cb")
    assert sorted(p.name for p in (tmp_path / "cb").iterdir()) == [
        "cfg.json",
        "codebook.safetensors",
    ]
    loaded = Codebook.load(tmp_path / "cb")
    assert loaded.cfg == cb.cfg
    assert torch.equal(loaded.codes, cb.codes)


def test_model_codebooks_round_trip_gives_same_logits(tiny_cfg, tokens, tmp_path):
    model = model_with_codebooks(tiny_cfg)
    expected = model(tokens)
    model.save_codebooks(tmp_path / "cbs")
    assert not (tmp_path / "cbs" / "model.safetensors").exists()  # not fine-tuned: no model weights
    fresh = HookedCodebookTransformer(tiny_cfg)  # same seed -> same base weights
    loaded = fresh.load_codebooks(tmp_path / "cbs")
    assert set(loaded) == {"blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"}
    assert torch.equal(fresh(tokens), expected)


def test_fine_tuned_model_weights_are_saved_and_restored(tiny_cfg, tokens, tmp_path):
    model = model_with_codebooks(tiny_cfg)
    with torch.no_grad():
        model.blocks[0].mlp.W_in.mul_(1.5)
    model.fine_tuned = True
    expected = model(tokens)
    model.save_codebooks(tmp_path / "cbs")
    assert (tmp_path / "cbs" / "model.safetensors").exists()
    fresh = HookedCodebookTransformer(tiny_cfg)
    assert not torch.equal(fresh.blocks[0].mlp.W_in, model.blocks[0].mlp.W_in)
    fresh.load_codebooks(tmp_path / "cbs")
    assert torch.equal(fresh(tokens), expected)
    only_codebooks = HookedCodebookTransformer(tiny_cfg)
    only_codebooks.load_codebooks(tmp_path / "cbs", load_model_weights=False)
    assert not torch.equal(only_codebooks(tokens), expected)


def test_loading_onto_another_model_shape_names_both_shapes(make_tiny_cfg, tmp_path):
    model_with_codebooks(make_tiny_cfg()).save_codebooks(tmp_path / "cbs")
    other = HookedCodebookTransformer(make_tiny_cfg(d_model=32, d_head=8))
    with pytest.raises(
        CodebookFileError, match=r"d_model saved 16 vs model 32.*d_head saved 4 vs model 8"
    ):
        other.load_codebooks(tmp_path / "cbs")
    assert other.codebooks == {}


def test_truncated_and_corrupted_safetensors_are_reported(tiny_cfg, tmp_path):
    model_with_codebooks(tiny_cfg).save_codebooks(tmp_path / "cbs")
    weights = tmp_path / "cbs" / "codebooks.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    fresh = HookedCodebookTransformer(tiny_cfg)
    with pytest.raises(CodebookFileError, match="truncated or corrupted"):
        fresh.load_codebooks(tmp_path / "cbs")
    weights.write_bytes(b"\x13\x37" * 100)
    with pytest.raises(CodebookFileError, match="codebooks.safetensors"):
        fresh.load_codebooks(tmp_path / "cbs")
    assert fresh.codebooks == {}


def test_config_json_with_missing_or_unknown_keys(tmp_path):
    cb = Codebook(CodebookConfig(d_in=4, num_codes=3))
    cb.save(tmp_path / "cb")
    cfg_path = tmp_path / "cb" / "cfg.json"
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({k: v for k, v in good.items() if k != "num_codes"}))
    with pytest.raises(ValueError, match="missing required key.*num_codes"):
        Codebook.load(tmp_path / "cb")
    cfg_path.write_text(json.dumps({**good, "temperature": 2.0}))
    with pytest.raises(ValueError, match="Unknown CodebookConfig key.*'temperature'"):
        Codebook.load(tmp_path / "cb")
    cfg_path.write_text("{not json")
    with pytest.raises(CodebookFileError, match="not valid JSON"):
        Codebook.load(tmp_path / "cb")


def test_codes_shape_must_fit_config(tmp_path):
    cb = Codebook(CodebookConfig(d_in=4, num_codes=3))
    cb.save(tmp_path / "cb")
    cfg_path = tmp_path / "cb" / "cfg.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "num_codes": 5}))
    with pytest.raises(
        CodebookFileError, match=r"codes of shape \(1, 3, 4\) do not fit the config \(1, 5, 4\)"
    ):
        Codebook.load(tmp_path / "cb")


def write_model_json(path, make_tiny_cfg, **extra):
    data = {**make_tiny_cfg().to_dict(), **extra}
    data["dtype"] = str(data["dtype"])
    path.write_text(json.dumps(data, default=str))
    return path


def test_a_config_file_cannot_turn_on_remote_code(make_tiny_cfg, tmp_path):
    """A file asking for trust_remote_code is refused: only the caller may allow running code."""
    from tl_codebook.io import load_model

    path = write_model_json(tmp_path / "model.json", make_tiny_cfg, trust_remote_code=True)
    with pytest.raises(ValueError, match=r"model\.json.*trust_remote_code.*--trust-remote-code"):
        load_model(str(path))
    allowed = load_model(str(path), trust_remote_code=True)
    assert allowed.cfg.trust_remote_code is True
    plain = write_model_json(tmp_path / "plain.json", make_tiny_cfg)
    assert load_model(str(plain)).cfg.trust_remote_code is False


def test_a_failing_load_leaves_the_model_exactly_as_before(tiny_cfg, tokens, tmp_path):
    """All or nothing: the later site cannot take a codebook, so the earlier one is not replaced."""
    model_with_codebooks(tiny_cfg).save_codebooks(tmp_path / "cbs")
    target = HookedCodebookTransformer(tiny_cfg)
    torch.manual_seed(9)
    mine = target.add_codebook(
        Codebook(CodebookConfig(d_in=16, num_codes=5, n_groups=4, hook_name="blocks.0.attn.hook_z"))
    )
    target.add_hook("blocks.1.hook_mlp_out", lambda act, hook: None)  # attach refuses a hooked site
    before = target(tokens)
    with pytest.raises(ValueError, match="blocks.1.hook_mlp_out.*has hooks attached"):
        target.load_codebooks(tmp_path / "cbs")
    assert target.codebooks == {"blocks.0.attn.hook_z": mine}
    assert torch.equal(target(tokens), before)


def test_model_weights_that_do_not_fit_leave_the_model_as_before(tiny_cfg, tokens, tmp_path):
    from safetensors.torch import load_file, save_file

    model = model_with_codebooks(tiny_cfg)
    model.fine_tuned = True
    model.save_codebooks(tmp_path / "cbs")
    weights = tmp_path / "cbs" / "model.safetensors"
    state = load_file(str(weights))
    state["blocks.0.mlp.W_in"] = torch.zeros(3, 3)
    save_file(state, str(weights))
    target = HookedCodebookTransformer(tiny_cfg)
    before = target(tokens)
    with pytest.raises(CodebookFileError, match=r"model.safetensors.*blocks.0.mlp.W_in.*\(3, 3\)"):
        target.load_codebooks(tmp_path / "cbs")
    assert target.codebooks == {} and not getattr(target, "fine_tuned", False)
    assert torch.equal(target(tokens), before)


@pytest.mark.parametrize("which", ["single", "set"])
def test_an_unknown_format_version_is_refused(tiny_cfg, tmp_path, which):
    if which == "single":
        Codebook(CodebookConfig(d_in=4, num_codes=3)).save(tmp_path / "cb")
        path = tmp_path / "cb" / "cfg.json"
    else:
        model_with_codebooks(tiny_cfg).save_codebooks(tmp_path / "cb")
        path = tmp_path / "cb" / "codebooks.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(CodebookFileError, match="format_version 99.*reads format_version 1"):
        if which == "single":
            Codebook.load(tmp_path / "cb")
        else:
            HookedCodebookTransformer(tiny_cfg).load_codebooks(tmp_path / "cb")


def test_a_save_that_dies_midway_leaves_the_previous_set_whole(
    tiny_cfg, tokens, tmp_path, monkeypatch
):
    import tl_codebook.io as io

    model = model_with_codebooks(tiny_cfg)
    model.save_codebooks(tmp_path / "cbs")
    expected = model(tokens)
    with torch.no_grad():
        for cb in model.codebooks.values():
            cb.codes.mul_(-1.0)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # a kill between the weights and the config

    monkeypatch.setattr(io, "atomic_write_json", die)
    with pytest.raises(KeyboardInterrupt):
        model.save_codebooks(tmp_path / "cbs")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "cbs").iterdir()) == [
        "codebooks.json",
        "codebooks.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["cbs"]  # no temporary left behind
    fresh = HookedCodebookTransformer(tiny_cfg)
    fresh.load_codebooks(tmp_path / "cbs")
    assert torch.equal(fresh(tokens), expected)


def test_saving_into_a_directory_with_other_files_is_refused(tiny_cfg, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds other files \['notes.txt'\]"):
        model_with_codebooks(tiny_cfg).save_codebooks(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
