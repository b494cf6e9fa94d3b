import pytest
import torch

from mtl.combine import COMBINERS, build_combiner
from mtl.config import CombinerConfig
from mtl.errors import ConfigError

L = {"sst": torch.tensor(2.0), "para": torch.tensor(3.0), "sts": torch.tensor(5.0)}


def test_registry_has_the_field_s_methods():
    assert sorted(COMBINERS) == sorted(["dtp", "pcgrad", "scalarize", "sum", "uncertainty", "upgrad", "mgda", "cagrad", "nash_mtl", "imtl_g", "aligned_mtl", "dualproj", "gradvac", "graddrop", "fairgrad", "excess_mtl", "config", "rgw", "gradnorm", "rlw", "dwa", "imtl_l", "geomean", "stch", "famo"])
    assert all(cls.name == name for name, cls in COMBINERS.items())


@pytest.mark.parametrize("setting, value, owner", [
    ("alpha", 0.3, "scalarize"), ("weights", "0.5,0.5", "scalarize"), ("pcgrad_on", "representation", "pcgrad"),
    ("dtp_gamma", 2.0, "dtp"), ("combiner_lr", 0.01, "uncertainty")])
def test_a_setting_the_chosen_method_ignores_is_refused(setting, value, owner):
    readers = CombinerConfig.__dataclass_fields__[setting].metadata["methods"]
    assert owner in readers
    for method in COMBINERS:
        cfg = CombinerConfig(combiner=method, **{setting: value})
        if method in readers:
            continue
        with pytest.raises(ConfigError, match=rf"^combiner.{setting}: applies to --combiner {' or '.join(readers)}, "
                                              rf"not {method}$"):
            build_combiner(cfg, ("sst", "para"), False)


def test_sum_adds_losses():
    c = build_combiner(CombinerConfig("sum"), ("sst", "para"), False)
    assert float(c.combine({t: L[t] for t in ("sst", "para")})) == 5.0
    assert c.task_weights() == {"sst": 1.0, "para": 1.0}


def test_scalarize_pair_uses_alpha_in_canonical_order():
    c = build_combiner(CombinerConfig("scalarize", alpha=0.4), ("sst", "sts"), False)
    assert float(c.combine({"sst": L["sst"], "sts": L["sts"]})) == pytest.approx(0.4 * 2 + 0.6 * 5)
    assert c.task_weights() == pytest.approx({"sst": 0.4, "sts": 0.6})


def test_scalarize_three_tasks_needs_a_weight_vector():
    with pytest.raises(ConfigError, match="combiner.weights"):
        build_combiner(CombinerConfig("scalarize"), ("sst", "para", "sts"), False)
    c = build_combiner(CombinerConfig("scalarize", weights="0.2,0.3,0.5"), ("sst", "para", "sts"), False)
    assert float(c.combine(L)) == pytest.approx(0.2 * 2 + 0.3 * 3 + 0.5 * 5)
    with pytest.raises(ConfigError, match="2 weights given for 3 task"):
        build_combiner(CombinerConfig("scalarize", weights="0.5,0.5"), ("sst", "para", "sts"), False)


def test_scalarize_single_task_is_trivial_and_alpha_range_is_checked():
    c = build_combiner(CombinerConfig("scalarize", alpha=0.1), ("para",), False)
    assert float(c.combine({"para": L["para"]})) == 3.0
    with pytest.raises(ConfigError, match=r"^combiner.alpha: 1.2 is outside \[0, 1\]"):
        CombinerConfig("scalarize", alpha=1.2)


def test_one_task_per_step_sampling_is_refused_where_a_method_needs_all_tasks():
    with pytest.raises(ConfigError, match="needs every task's loss in each step"):
        build_combiner(CombinerConfig("scalarize"), ("sst", "para"), one_task_per_step=True)
    build_combiner(CombinerConfig("sum"), ("sst", "para"), one_task_per_step=True)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'frank_wolfe' \(known: .*scalarize.*sum.*upgrad\)"):
        build_combiner(CombinerConfig("frank_wolfe"), ("sst",), False)


def test_default_backward_applies_the_scale_and_returns_the_combined_loss():
    w = torch.nn.Parameter(torch.tensor(1.0))
    c = build_combiner(CombinerConfig("scalarize", alpha=0.25), ("sst", "para"), False)
    total = c.backward({"sst": 2 * w, "para": 4 * w}, lambda loss: (8 * loss).backward())
    assert float(total) == pytest.approx(0.25 * 2 + 0.75 * 4)
    assert float(w.grad) == pytest.approx(8 * (0.25 * 2 + 0.75 * 4))
