"""MSPLoraConfig: defaults, JSON round trip, and a ValueError naming each bad field."""
import pytest

from msplora import MSPLoraConfig


def test_defaults_follow_the_paper():
    c = MSPLoraConfig(target_modules=["query", "value"])
    assert c.ranks == (8, 4, 2) and c.alphas == (16.0, 16.0, 16.0) and c.num_mid_groups == 3
    assert [c.scaling(s) for s in ("global", "mid", "layer")] == [2.0, 4.0, 8.0]


def test_json_round_trip(tmp_path):
    c = MSPLoraConfig(target_modules=r".*\.q_proj", ranks=(16, 0, 3), alphas=(8, 8, 4), dropout=0.05,
                      use_rslora=True, init_weights="gaussian", exclude_modules=["layers.0.q_proj"],
                      modules_to_save=["classifier"], backend="torch")
    c.save_pretrained(tmp_path)
    assert MSPLoraConfig.from_pretrained(tmp_path) == c


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules=5), "target_modules"),
        (dict(ranks=(8, 4)), "ranks"),
        (dict(ranks=(8, -1, 2)), "ranks"),
        (dict(ranks=(0, 0, 0)), "ranks"),
        (dict(ranks=(8.0, 4, 2)), "ranks"),
        (dict(alphas=(16, 0, 16)), "alphas"),
        (dict(num_mid_groups=0), "num_mid_groups"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(use_rslora="yes"), "use_rslora"),
        (dict(init_weights="pissa"), "init_weights"),
        (dict(backend="cuda"), "backend"),
        (dict(modules_to_save="classifier"), "modules_to_save"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    kwargs.setdefault("target_modules", ["q_proj"])
    with pytest.raises(ValueError, match=field):
        MSPLoraConfig(**kwargs)


def test_unknown_fields_and_foreign_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown MSPLoraConfig fields: \\['rank'\\]"):
        MSPLoraConfig.from_dict({"target_modules": ["q"], "rank": 8})
    with pytest.raises(ValueError, match="peft_type is 'LORA'"):
        MSPLoraConfig.from_dict({"target_modules": ["q"], "peft_type": "LORA"})
