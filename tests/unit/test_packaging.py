import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def pins(lines):
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)\s*", line)
        if m:
            out[m.group(1).lower()] = m.group(3)
    return out


def test_environment_yml_pins_what_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + [d for group in project["optional-dependencies"].values() for d in group]
    assert all("==" in d for d in declared), "every dependency is pinned exactly"
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins(pip_section) == pins(declared)
    assert pins(declared)["torch"] == "2.13.0"


def test_sample_data_is_packaged():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "sample_data/*.csv" in cfg["tool"]["setuptools"]["package-data"]["mtl"]
    assert "sample_data/*.yaml" in cfg["tool"]["setuptools"]["package-data"]["mtl"]      # the NLI spec
    assert len(list((ROOT / "mtl" / "sample_data").glob("*.csv"))) == 8            # sst, quora, sts, nli: train, dev
