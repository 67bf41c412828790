"""configs.py: one dict -> config path, one "did you mean", one choice check."""

from dataclasses import dataclass

import pytest

from tl_codebook.configs import check_choice, dataclass_from_dict, did_you_mean


@dataclass
class _Cfg:
    steps: int
    lr: float = 1e-3
    name: str | None = None
    verbose: bool = False


def test_builds_with_ints_for_floats_and_none_for_optionals():
    cfg = dataclass_from_dict(_Cfg, {"steps": 3, "lr": 1, "name": None})
    assert (cfg.steps, cfg.lr, cfg.name) == (3, 1, None)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": "3"}, r"_Cfg.steps must be an integer, got '3' \(str\)"),
        ({"steps": 3, "lr": "0.1"}, r"_Cfg.lr must be a number, got '0.1'"),
        ({"steps": True}, r"_Cfg.steps must be an integer, got True"),
        ({"steps": 3, "verbose": 1}, r"_Cfg.verbose must be true or false"),
        ({"steps": 3, "name": 5}, r"_Cfg.name must be a string or null"),
        ({"stpes": 3}, r"Unknown _Cfg key\(s\): 'stpes' \(did you mean 'steps'\?\)"),
        ({}, r"_Cfg is missing required key\(s\): steps"),
    ],
)
def test_bad_dicts_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        dataclass_from_dict(_Cfg, data)


def test_did_you_mean_and_check_choice():
    assert did_you_mean("cosin", ["cosine", "euclidean"]) == " Did you mean 'cosine'?"
    assert did_you_mean("zzz", ["cosine"]) == ""
    assert check_choice("mode", "joint", ("frozen", "joint")) == "joint"
    with pytest.raises(
        ValueError, match=r"mode='jiont' is not one of frozen, joint\. Did you mean 'joint'\?"
    ):
        check_choice("mode", "jiont", ("frozen", "joint"))
