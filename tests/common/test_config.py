"""The run config is parsed once: typed values, and bad input fails naming the key."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from common.config import (
    ALLOWED_KEYS,
    RunConfig,
    load_config_file,
    parse_config,
    parse_overrides,
)
from simulations.scenarios import CONFIG_DIR
from tests.conftest import REPO

CONFIGS = sorted(CONFIG_DIR.glob("*.toml"))


def test_unknown_key_is_named_and_allowed_keys_are_listed():
    with pytest.raises(ValueError) as err:
        parse_config({"num-site": 3})
    msg = str(err.value)
    assert "'num-site'" in msg
    assert "Allowed keys:" in msg
    for key in ("num-sites", "target-epsilon", "learning-rate", "dp"):
        assert key in msg


def test_snake_case_key_is_unknown():
    # Keys are kebab-case, as in Flower's run config; the field name is not a key.
    with pytest.raises(ValueError, match="unknown config key 'num_sites'"):
        parse_config({"num_sites": 3})


@pytest.mark.parametrize("key, value, words", [
    ("num-sites", "three", "'num-sites' must be an integer"),
    ("num-sites", 2.5, "'num-sites' must be an integer"),
    ("seed", True, "'seed' must be an integer"),
    ("dp", "maybe", "'dp' must be true or false"),
    ("dp", 1, "'dp' must be true or false"),
    ("learning-rate", "fast", "'learning-rate' must be a number"),
    ("target-epsilon", False, "'target-epsilon' must be a number"),
    ("dataset", 7, "'dataset' must be a string"),
])
def test_bad_type_names_the_key(key, value, words):
    with pytest.raises(ValueError, match=words):
        parse_config({key: value})


@pytest.mark.parametrize("key, value", [
    ("num-sites", 0),
    ("num-rounds", -1),
    ("batch-size", 0),
    ("min-sites", 5),  # more than the default 4 sites
    ("target-delta", 1.5),
    ("target-delta", 0.0),
    ("target-epsilon", math.inf),
    ("partitioner", "foo"),
    ("mode", "distributed"),
    ("head", "transformer"),
    ("device", "tpu"),
    ("learning-rate", math.nan),
    ("learning-rate", -1.0),
    ("learning-rate", math.inf),
    ("backbone", "efficientnet-lite0"),  # with a CSV: refused at parse time, naming the fix
    ("clip-norm", -1.0),
    ("fraction-train", 0.0),
    ("site-holdout", 1.0),
    ("site-shift", 1.5),
    ("momentum", 1.0),
    ("noise-multiplier", -0.5),
    ("noise-multiplier", math.nan),
    ("noise-multiplier", math.inf),
])
def test_bad_value_names_the_key(key, value):
    raw = {key: value, **({"dataset": "csv:hospital.csv"} if key == "backbone" else {})}
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        parse_config(raw)


def test_a_csv_with_an_image_backbone_fails_at_parse_time_naming_the_fix():
    with pytest.raises(ValueError, match='Set backbone = "identity"') as err:
        parse_config({"dataset": "breast-cancer-hospitals", "backbone": "efficientnet-lite0"})
    assert "tabular records" in str(err.value)
    cfg = parse_config({"dataset": "csv:x.csv"})  # the default backbone, "auto", is fine
    assert cfg.resolved_backbone().backbone == "identity"


def test_the_learning_rate_default_depends_on_the_input():
    assert RunConfig().learning_rate == 0.0 and RunConfig().lr == 8.0
    assert RunConfig(dataset="breast-cancer-hospitals").lr == 0.5
    assert RunConfig(dataset="csv:a.csv").lr == 0.5
    assert RunConfig(dataset="csv:a.csv", learning_rate=2.0).lr == 2.0


def test_class_weights_name_the_allowed_values():
    with pytest.raises(ValueError, match="config key 'class-weights': got 'private', allowed: "
                                         "none, public"):
        parse_config({"class-weights": "private"})
    assert parse_config({"class-weights": "public"}).class_weights == "public"
    with pytest.raises(ValueError, match="config key 'decision-objective': got 'f1', allowed: "
                                         "balanced-accuracy, accuracy, argmax"):
        parse_config({"decision-objective": "f1"})


def test_good_values_are_coerced_to_the_field_types():
    cfg = parse_config({"dp": "false", "seed": "3", "num-sites": 2.0, "learning-rate": 1,
                        "target-delta": "1e-6"})
    assert cfg.dp is False
    assert cfg.seed == 3 and isinstance(cfg.seed, int)
    assert cfg.num_sites == 2 and isinstance(cfg.num_sites, int)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.target_delta == 1e-6


def test_base_config_is_kept_for_keys_not_given():
    base = RunConfig(num_sites=3, seed=9)
    cfg = parse_config({"seed": 1}, base=base)
    assert (cfg.num_sites, cfg.seed) == (3, 1)


def test_overrides_become_typed_values():
    raw = parse_overrides(["dp=false", "seed=3", "dataset=medmnist:pneumoniamnist",
                           "target-delta = 1e-5", "data-dir=../shared/data"])
    assert raw == {"dp": False, "seed": 3, "dataset": "medmnist:pneumoniamnist",
                   "target-delta": 1e-5, "data-dir": "../shared/data"}
    assert type(raw["dp"]) is bool and type(raw["seed"]) is int
    cfg = parse_config(raw)
    assert (cfg.dp, cfg.seed, cfg.dataset) == (False, 3, "medmnist:pneumoniamnist")


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ValueError, match="'seed' must look like key=value"):
        parse_overrides(["seed"])


def test_override_of_nan_is_rejected_by_the_parser():
    with pytest.raises(ValueError, match="'learning-rate'"):
        parse_config(parse_overrides(["learning-rate=nan"]))


def test_to_toml_round_trips_to_an_equal_config():
    cfg = RunConfig(mode="centralized", dp=False, seed=41, dataset="medmnist:pneumoniamnist",
                    data_dir='C:\\data "shared"', num_sites=3, min_sites=3,
                    partitioner="iid", target_delta=1e-7, learning_rate=0.125,
                    site_shift=0.3, out_dir="runs/α")
    text = cfg.to_toml()
    back = parse_config(tomllib.loads(text))
    assert back == cfg
    # Every key is written, so the file alone reproduces the run.
    assert set(tomllib.loads(text)) == set(ALLOWED_KEYS)


def test_pyproject_defaults_parse():
    with (REPO / "pyproject.toml").open("rb") as fh:
        defaults = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    # One source of defaults: pyproject repeats RunConfig's, value for value.
    drift = {k: (v, RunConfig().to_dict().get(k)) for k, v in defaults.items()
             if parse_config({k: v}).to_dict()[k] != RunConfig().to_dict().get(k)}
    assert not drift, f"[tool.flwr.app.config] differs from RunConfig's defaults: {drift}"
    # `flwr run . --run-config "key=value"` refuses a key the app config lacks, with
    # "Invalid run configuration" and no key named: every key must be there.
    assert set(defaults) == set(ALLOWED_KEYS), sorted(set(ALLOWED_KEYS) ^ set(defaults))


def test_there_are_named_scenarios():
    assert {p.stem for p in CONFIGS} >= {"pneumonia", "breast-cancer"}


def test_the_default_scenario_is_runconfigs_defaults():
    """`fedtransfer simulate` without --config runs RunConfig() itself, and so does `make
    demo`, with no override: the default backbone is "auto" (chosen on public data first)."""
    from simulations.scenarios import resolve_config

    assert resolve_config(None, [], None) == RunConfig()
    assert RunConfig().backbone == "auto"
    demo = (REPO / "Makefile").read_text().split("demo: install", 1)[1].split("\n")[1]
    assert demo.split("fedtransfer ", 1)[1] == "simulate"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_scenario_config_parses(path):
    raw = load_config_file(path)
    cfg = parse_config(raw)
    for key, value in raw.items():
        if key == "schema":  # a [schema] table is kept as its canonical JSON
            assert json.loads(cfg.schema) == value
            continue
        assert cfg.to_dict()[key] == value


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config_file(tmp_path / "nope.toml")


def test_the_torch_free_registry_names_match_the_registries():
    """config.py validates by name (common/models/names.py) so that parsing a config
    imports no torch; the names must be exactly the registries' keys."""
    from common.models.heads import HEADS
    from common.models.names import HEAD_NAMES, STUDENT_NAMES
    from common.models.students import STUDENTS

    assert tuple(HEADS) == HEAD_NAMES and tuple(STUDENTS) == STUDENT_NAMES


def test_flwr_runs_default_paths_are_recorded_where_the_audit_looks(tmp_path):
    """issue 24: `flwr run .` with the default paths: the sites keep their ledgers under
    .fedtransfer/sites, the run goes to runs/<ts>; the server records the ledger folder in
    the run's config.toml, and the audit finds the ledgers there."""
    from client.settings import scenario_policy
    from common.audit.recompute import audit
    from common.config import simulated_ledger_dir
    from common.privacy.ledger import Entry, Ledger

    assert simulated_ledger_dir(RunConfig()) == Path(".fedtransfer/sites")
    assert simulated_ledger_dir(RunConfig(out_dir="r")) == Path("r/sites")
    cfg = RunConfig(ledger_dir=str(tmp_path / "ledgers"), backbone="identity")
    site = scenario_policy(cfg, {"partition-id": 1})
    assert site.ledger_path == tmp_path / "ledgers" / "site-1" / "ledger.sqlite"
    Ledger(site.ledger_path).append(Entry(
        run_id="r", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10, clip_norm=1.0,
        delta=1e-5, sampler="poisson", secure_rng=False, accountant="pld",
        accountant_version="x", libraries="{}", dataset_size=100, data_fingerprint="f",
        epsilon_after=0.5))
    run = tmp_path / "runs" / "ts"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(cfg.to_toml())
    (run / "summary.json").write_text('{"sites": {}}')
    report = audit([str(run)])
    assert [s.site for r in report.runs for s in r.sites] == ["1"]
