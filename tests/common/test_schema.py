"""The federation schema: records map by name, never by position; scaling is public or DP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.data.readers import SiteDataError, read_site_records, scan
from common.data.schema import Schema, SchemaError, load_schema

SCHEMA = {
    "classes": ["healthy", "disease"],
    "label": "outcome",
    "features": [
        {"name": "age", "lower": 0, "upper": 120, "scaling": "declared", "center": 50,
         "scale": 10},
        {"name": "cholesterol", "lower": 50, "upper": 500, "scaling": "public"},
        {"name": "sex", "kind": "categorical", "levels": ["f", "m"]},
    ],
}
ROWS = [("age", "cholesterol", "sex", "outcome"),
        ("60", "200", "m", "disease"), ("40", "180", "f", "healthy"),
        ("70", "300", "f", "disease"), ("30", "150", "m", "healthy")]


def _csv(path, rows, order=None):
    order = order or list(range(len(rows[0])))
    path.write_text("".join(",".join(r[i] for i in order) + "\n" for r in rows))
    return path


def test_a_reordered_csv_maps_by_name_to_the_same_records(tmp_path):
    schema = Schema.from_dict(SCHEMA)
    a = scan(f"csv:{_csv(tmp_path / 'a.csv', ROWS)}", schema=schema)
    b = scan(f"csv:{_csv(tmp_path / 'b.csv', ROWS, order=[3, 2, 0, 1])}", schema=schema)
    assert a.columns == ("age", "cholesterol", "sex=f", "sex=m")
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.y.tolist() == [1, 0, 1, 0]  # by the schema's class order, never sorted names
    np.testing.assert_array_equal(a.x[:, 2:], [[0, 1], [1, 0], [1, 0], [0, 1]])


@pytest.mark.parametrize("header, words", [
    (("age", "Cholesterol", "sex", "outcome"), "'Cholesterol' differs only in case from the "
                                               "schema's feature 'cholesterol'"),
    (("age", "cholesterol", "sex", "ward", "outcome"), "column 'ward' is not in the federation"),
    (("age", "sex", "outcome"), "required feature column(s) missing: ['cholesterol']"),
])
def test_unknown_case_changed_or_missing_columns_are_named(tmp_path, header, words):
    rows = [header] + [tuple("1" if h not in ("sex", "outcome") else
                             ("m" if h == "sex" else "disease") for h in header)] * 3
    with pytest.raises(SiteDataError) as err:
        scan(f"csv:{_csv(tmp_path / 's.csv', rows)}", schema=Schema.from_dict(SCHEMA))
    assert words in str(err.value)


def test_an_undeclared_level_or_class_is_named_not_guessed(tmp_path):
    rows = [*ROWS, ("50", "200", "x", "disease"), ("50", "200", "m", "Disease")]
    s = scan(f"csv:{_csv(tmp_path / 's.csv', rows)}", schema=Schema.from_dict(SCHEMA))
    assert any("column 'sex'" in p and "declared levels ['f', 'm']" in p for p in s.problems())
    assert any("'Disease' differs only in case from the declared class 'disease'" in p
               for p in s.problems())
    with pytest.raises(SiteDataError, match="column 'sex'"):
        read_site_records(f"csv:{tmp_path / 's.csv'}", schema=Schema.from_dict(SCHEMA))


def test_transform_clips_centres_scales_and_fills_missing_with_the_centre():
    schema = Schema.from_dict(SCHEMA).with_constants({"cholesterol": (200.0, 50.0)})
    design = np.array([[60, 250, 0, 1], [500, 10, 1, 0], [np.nan, np.nan, np.nan, np.nan]])
    out = schema.transform(design)
    np.testing.assert_allclose(out[0], [1.0, 1.0, 0, 1])
    # 500 is clipped to the public upper bound 120, 10 to the lower bound 50.
    np.testing.assert_allclose(out[1], [7.0, -3.0, 1, 0])
    np.testing.assert_allclose(out[2], [0, 0, 0, 0])
    assert out.dtype == np.float32


def test_public_fit_is_the_public_splits_mean_and_std():
    schema = Schema.from_dict(SCHEMA)
    assert not schema.fitted and [f.name for f in schema.needs("public")] == ["cholesterol"]
    design = np.array([[1, 100, 0, 1], [1, 300, 1, 0], [1, 200, 1, 0], [1, np.nan, 0, 1]])
    fitted = schema.fit_public(design)
    f = fitted.feature("cholesterol")
    assert (f.center, f.scale) == pytest.approx((200.0, np.std([100, 300, 200])))
    assert fitted.fitted and fitted.sha256 != schema.sha256


def test_dp_sums_without_noise_give_the_clipped_mean_and_std():
    schema = Schema.from_dict({"classes": ["a", "b"], "scaling": "dp", "features": [
        {"name": "x", "lower": 0, "upper": 10}, {"name": "y", "lower": -1, "upper": 1}]})
    rng = np.random.default_rng(0)
    design = np.stack([rng.uniform(-5, 15, 500), rng.uniform(-1, 1, 500)], axis=1)
    vec, bound = schema.scaling_vectors(design)
    assert vec.shape == (500, 4) and bound == pytest.approx(1.0)
    assert (np.linalg.norm(vec, axis=1) <= bound + 1e-12).all()
    fitted = schema.fit_from_sums(vec.sum(axis=0), len(design))
    clipped = np.clip(design[:, 0], 0, 10)
    x = fitted.feature("x")
    assert (x.center, x.scale) == pytest.approx((clipped.mean(), clipped.std()), rel=1e-9)


def test_opendp_noise_has_the_accounted_scale():
    from common.privacy.scaling import noisy_sum

    vectors = np.full((20, 2), 0.5) / math.sqrt(2)  # norm 0.5 each
    draws = np.array([noisy_sum(vectors, norm_bound=0.5, sigma=4.0) for _ in range(400)])
    # σ·C = 2: the standard deviation of 800 Gaussian draws is within ±15% of it.
    assert np.std(draws - vectors.sum(axis=0)) == pytest.approx(2.0, rel=0.15)
    with pytest.raises(ValueError, match="norm"):
        noisy_sum(vectors * 4, norm_bound=0.5, sigma=4.0)


@pytest.mark.parametrize("raw, words", [
    ({"classes": ["a"]}, "at least two class names"),
    ({"classes": ["a", "A"]}, "differ only in case"),
    ({"classes": ["a", "b"], "features": [{"name": "x", "scaling": "dp"}]},
     "scaling 'dp' needs public bounds"),
    ({"classes": ["a", "b"], "features": [{"name": "x", "scaling": "declared", "center": 1}]},
     "needs 'center' and 'scale'"),
    ({"classes": ["a", "b"], "features": [{"name": "s", "kind": "categorical"}]},
     "lists its levels"),
    ({"classes": ["a", "b"], "missing": "mean", "features": ["x"]}, "'mean' is not offered"),
    ({"classes": ["a", "b"], "features": ["x"], "colour": 1}, "unknown schema key"),
])
def test_bad_schemas_are_named(raw, words):
    with pytest.raises(SchemaError, match=words):
        Schema.from_dict(raw)


def test_schema_round_trips_through_json_and_toml(tmp_path):
    schema = Schema.from_dict(SCHEMA)
    assert Schema.from_json(schema.to_json()) == schema
    (tmp_path / "s.toml").write_text('[schema]\nclasses = ["healthy", "disease"]\n'
                                     'label = "outcome"\nfeatures = ["age"]\n')
    assert load_schema(str(tmp_path / "s.toml")).columns == ["age"]
    with pytest.raises(SchemaError, match="schema file not found"):
        load_schema(str(tmp_path / "absent.toml"))


def test_the_derived_schema_records_the_label_column_the_run_used(tmp_path):
    """issue 24: a run on csv:...?label=target records label 'target' (schema.json, the card),
    not the default 'label'."""
    from common.config import RunConfig
    from common.data.datasets import federation

    path = tmp_path / "t.csv"
    path.write_text("a,b,target\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)))
    _, schema = federation(RunConfig(dataset=f"csv:{path}?label=target"))
    assert schema.label == "target" and [f.name for f in schema.features] == ["a", "b"]


def test_a_one_class_split_scores_without_library_warnings():
    """issue 24: a one-class test split printed scikit-learn's "single label" notice."""
    import warnings

    from common.models.metrics import classification_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(np.array([[0.9, 0.1], [0.8, 0.2]]), np.array([0, 0]))
    assert m["accuracy"] == 1.0 and np.isnan(m["auc"])
