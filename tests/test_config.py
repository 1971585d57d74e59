"""Config: typed schema, overrides, and one-line errors that name the key."""

import pytest

from bigjax.config import Config, load_config, save_config, to_dict
from bigjax.errors import ConfigError


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config("configs/gpt_tiny.yaml", ["train.steps=7", "optimizer.lr=1e-3",
                                                "mesh.fsdp=2", "run.dir=/tmp/x", "model.use_bias=false"])
    assert (cfg.train.steps, cfg.optimizer.lr, cfg.mesh.fsdp, cfg.run.dir) == (7, 1e-3, 2, "/tmp/x")
    assert cfg.model.use_bias is False
    assert isinstance(cfg.optimizer.lr, float)


def test_effective_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("configs/gpt_tiny.yaml", ["init.from=runs/a@5", "seed=3"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert again.init.from_ == "runs/a@5"


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    (["train.steps=three"], "train.steps: got 'three', expected an integer"),
    (["train.steps=1.5"], "train.steps: got 1.5, expected an integer"),
    (["optimizer.name=adam"], "optimizer.name: got 'adam', expected one of 'adamw', 'sgd', 'rmsprop'"),
    (["model.use_bias=maybe"], "model.use_bias: got 'maybe', expected true or false"),
    (["train.batch_size=10", "train.grad_accum=4"],
     "train.batch_size=10 is not divisible by train.grad_accum=4"),
    (["model.n_heads=3"], "model.d_model=128 is not divisible by model.n_heads=3; set model.head_dim"),
    (["train.steps=0"], "train.steps must be at least 1, got 0"),
    (["distributed.hang_timeout_s=-5"],
     "distributed.hang_timeout_s must be 0 (never) or a number of seconds, got -5"),
    (["train"], "override 'train' is not of the form key.sub=value"),
    (["train=3"], "train: expected a mapping of keys, got 3"),
])
def test_bad_config_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/gpt_tiny.yaml", overrides)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("seed: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):  # safe_load refuses the tag
        load_config(unsafe)


def test_defaults_are_a_valid_config():
    assert isinstance(load_config(None), Config)


def test_a_run_saved_before_per_family_schemas_still_loads(tmp_path):
    """Older runs saved every Transformer key for every family (a BERT's `model.positions`, a
    causal LM's `task.num_labels`): their own config.yaml loads, and resumes against them compare
    only the keys both sides have; a config a user writes is still checked strictly."""
    from bigjax.checkpoint import model_config_diff
    import yaml

    now = to_dict(load_config("configs/bert_mini_mlm.yaml"))
    old = to_dict(load_config("configs/bert_mini_mlm.yaml"))
    old["model"].update(positions="learned", norm="layernorm", use_bias=True, n_kv_heads=0,
                        tie_embeddings=True, scan_layers=False, rope_theta=10000.0)
    old["task"]["num_labels"] = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"^unknown config key 'model\.\w+' for model 'bert'"):
        load_config(path)
    assert to_dict(load_config(path, saved=True)) == now
    assert model_config_diff(old["model"], now["model"]) == []
    assert model_config_diff(old["model"], {**now["model"], "name": "gpt"}) == [
        "model.name (checkpoint 'bert', config 'gpt')"]
