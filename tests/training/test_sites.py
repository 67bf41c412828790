"""Site specs: the strings the CLI takes, the same strings in TrainConfig, and errors whose
suggestions work when followed."""

import pytest
import torch

from tl_codebook import HookedCodebookTransformer
from tl_codebook.codebook import Codebook
from tl_codebook.training import SiteSpec, TrainConfig, parse_site, resolve_sites


def attach_and_run(model, specs):
    """Resolve `specs`, attach their codebooks and run a forward pass; the resolved configs."""
    resolved = resolve_sites(model, [parse_site(s) for s in specs], {"num_codes": 8}, "1")
    for cfg in resolved.values():
        model.add_codebook(Codebook(cfg))
    model(torch.zeros(1, 3, dtype=torch.long))
    return resolved


def test_per_head_site_error_suggests_specs_that_work(tiny_cfg):
    model = HookedCodebookTransformer(tiny_cfg)
    with pytest.raises(ValueError) as error:
        resolve_sites(model, [parse_site("attn.hook_z")], {"num_codes": 8}, "1")
    message = str(error.value)
    assert "n_groups=1" not in message
    assert "'attn.hook_z:group'" in message and "'hook_attn_out'" in message
    grouped = attach_and_run(HookedCodebookTransformer(tiny_cfg), ["attn.hook_z:group"])
    assert grouped["blocks.1.attn.hook_z"].n_groups == 4
    flat = attach_and_run(HookedCodebookTransformer(tiny_cfg), ["hook_attn_out"])
    assert (flat["blocks.1.hook_attn_out"].d_in, flat["blocks.1.hook_attn_out"].n_groups) == (16, 1)


def test_per_head_site_with_a_group_count_other_than_the_heads_fails_at_once(tiny_cfg):
    model = HookedCodebookTransformer(tiny_cfg)
    with pytest.raises(ValueError, match=r"n_groups=1 .*4 heads.*'attn.hook_z:group'"):
        resolve_sites(model, [parse_site("attn.hook_z:n_groups=1")], {}, "1")
    explicit = attach_and_run(model, ["attn.hook_z:n_groups=4"])
    assert explicit["blocks.1.attn.hook_z"].n_groups == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("blocks.0.hook_resid_post", SiteSpec(at="blocks.0.hook_resid_post")),
        (
            "attn.hook_z:group:k=2",
            SiteSpec(at="attn.hook_z", group=True, options={"k": 2}),
        ),
        ("hook_mlp_out:layers=0-1", SiteSpec(at="hook_mlp_out", layers="0-1")),
    ],
)
def test_train_config_accepts_the_site_strings_the_cli_takes(text, expected):
    assert TrainConfig(sites=[text]).sites == [expected]
    from_json = TrainConfig.from_dict({"mode": "frozen", "sites": [text]})
    assert from_json.sites == [expected]
    assert TrainConfig.from_dict(from_json.to_dict()).sites == [expected]


def test_train_config_site_string_errors_name_the_spec():
    with pytest.raises(ValueError, match="Site spec 'hook_mlp_out:kk=2': unknown option 'kk'"):
        TrainConfig(sites=["hook_mlp_out:kk=2"])
