import pytest

from mtl.config import RunConfig, parse_tasks
from mtl.errors import ConfigError


def test_defaults_are_the_reference_protocol():
    c = RunConfig()
    assert (c.optim.lr, c.optim.weight_decay, c.optim.eps, c.optim.batch_size, c.optim.epochs) == (1e-5, 0.01, 1e-6, 8, 10)
    assert (c.model.dropout, c.model.pooling, c.model.pair_encoding, c.data.epoch_mode) == (0.5, "cls", "joint", "min_size")


def test_dict_round_trip_is_exact():
    c = RunConfig().replace(**{"data.tasks": "sts,sst", "combiner.combiner": "scalarize", "alpha": 0.3, "seed": 4})
    again = RunConfig.from_dict(c.to_dict())
    assert again == c
    assert again.data.tasks == ("sst", "sts")   # canonical order


@pytest.mark.parametrize("key,value,field", [
    ("alpha", 1.5, "combiner.alpha"),
    ("alpha", -0.1, "combiner.alpha"),
    ("tasks", "sst,nli", "data.tasks"),
    ("tasks", "sst,sst", "data.tasks"),
    ("precision", "fp8", "precision"),
    ("epoch_mode", "fixed_n", "data.examples_per_task"),
    ("weights", "0.5,0.6", "combiner.weights"),
    ("lr", 0.0, "optim.lr"),
    ("pooling", "max", "model.pooling"),
    ("sim_head", "cosine", "model.sim_head"),
    ("select_metric", "para/acc", "select_metric"),
])
def test_invalid_values_name_their_field(key, value, field):
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**{key: value})
    assert str(err.value).startswith(field + ":")


def test_unknown_field_is_named():
    d = RunConfig().to_dict()
    d["optim"]["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match=r"^optim\.learning_rate: unknown field"):
        RunConfig.from_dict(d)


def test_wrong_type_is_named():
    d = RunConfig().to_dict()
    d["optim"]["batch_size"] = "eight"
    with pytest.raises(ConfigError, match=r"^optim\.batch_size: 'eight' is not a valid int"):
        RunConfig.from_dict(d)


def test_parse_tasks_orders_and_checks():
    assert parse_tasks("sts,para") == ("para", "sts")
    with pytest.raises(ConfigError):
        parse_tasks("")


def test_fingerprint_ignores_storage_but_not_settings():
    a = RunConfig().replace(out="/a")
    assert a.fingerprint() == RunConfig().replace(out="s3://b/c").fingerprint()
    assert a.fingerprint() != RunConfig().replace(seed=1).fingerprint()
