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
                      modules_to_save=["classifier"])
    c.save_pretrained(tmp_path)
    assert MSPLoraConfig.from_pretrained(tmp_path) == c


def test_the_backend_is_a_runtime_choice_not_saved(tmp_path):
    MSPLoraConfig(target_modules=["q_proj"], backend="triton").save_pretrained(tmp_path)
    assert "backend" not in (tmp_path / "adapter_config.json").read_text()
    assert MSPLoraConfig.from_pretrained(tmp_path).backend == "auto"
    # adapter files written by msplora 0.1.0 carry a backend: it is ignored, not an error
    assert MSPLoraConfig.from_dict({"target_modules": ["q"], "backend": "triton"}).backend == "auto"


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
        (dict(alphas=(16, float("nan"), 16)), "alphas"),
        (dict(alphas=(float("inf"), 16, 16)), "alphas"),
        (dict(target_modules="(q_proj"), "target_modules.*regular expression"),
        (dict(exclude_modules="[v_proj"), "exclude_modules.*regular expression"),
        (dict(exclude_modules=3), "exclude_modules"),
        (dict(exclude_modules=[""]), "exclude_modules"),
        (dict(modules_to_save=[3]), "modules_to_save"),
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


def test_numpy_numbers_are_accepted_as_plain_ones():
    np = pytest.importorskip("numpy")
    c = MSPLoraConfig(target_modules=["q_proj"], ranks=np.array([8, 4, 2]), alphas=(np.float32(16), 16, 16),
                      num_mid_groups=np.int64(3), dropout=np.float64(0.05))
    assert c.ranks == (8, 4, 2) and all(type(r) is int for r in c.ranks)
    assert c.alphas == (16.0, 16.0, 16.0) and type(c.num_mid_groups) is int
    assert '"ranks": [\n    8,' in c.to_json_string()  # JSON-serialisable


def test_unknown_fields_and_foreign_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown MSPLoraConfig fields: \\['rank'\\]"):
        MSPLoraConfig.from_dict({"target_modules": ["q"], "rank": 8})
    with pytest.raises(ValueError, match="peft_type is 'LORA'"):
        MSPLoraConfig.from_dict({"target_modules": ["q"], "peft_type": "LORA"})
