"""Dataset registry, hospital partitions and per-site acquisition shift.

Images are returned as float32 arrays in [0, 1], shaped (N, H, W) for
grayscale or (N, H, W, C) for colour, with integer labels in [0, K).
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.data.digests import record_digests
from common.data.grouping import construct_patients, factorize
from common.data.readers import (
    SiteDataError,
    data_spec,
    holdout_split,
    read_site_records,
    splits_from_records,
)
from common.data.schema import SchemaError, derived_tabular, image_schema, load_schema
from common.data.splits import (  # noqa: F401 (re-exported)
    MEDMNIST_CLASSES,
    SiteData,
    Splits,
    fingerprint_arrays,
    read_medmnist_npz,
)

log = logging.getLogger(__name__)

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"
# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


def _load_digits(data_dir: str, seed: int) -> Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)  # 8x8, values 0..16
    labels = bunch.target.astype(np.int64)
    # scikit-learn ships no split: a fixed, seeded 70/10/20 stratified split.
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=0.125, stratify=labels[rest], random_state=seed
    )
    return Splits(
        name="digits",
        classes=tuple(str(i) for i in range(10)),
        train_x=images[train], train_y=labels[train],
        val_x=images[val], val_y=labels[val],
        test_x=images[test], test_y=labels[test],
    )


def _medmnist_candidates(name: str, data_dir: str) -> list[Path]:
    out = []
    if name.endswith(".npz"):
        out.append(Path(name).expanduser())
        return out
    dirs = [data_dir] if data_dir else []
    dirs += [os.environ.get("MEDMNIST_DIR", ""), str(Path.home() / ".medmnist")]
    for d in dirs:
        if d:
            out.append(Path(d).expanduser() / f"{name}.npz")
    return out


def _download_medmnist(name: str, dest: Path, timeout: float = 20.0) -> None:
    url = MEDMNIST_URL.format(name=name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".npz.part")
    log.info("downloading %s to %s", url, dest)
    with urllib.request.urlopen(url, timeout=timeout) as resp, tmp.open("wb") as fh:
        while chunk := resp.read(1 << 20):
            fh.write(chunk)
    tmp.replace(dest)


def _load_medmnist(spec: str, data_dir: str, seed: int) -> Splits:
    name = spec
    candidates = _medmnist_candidates(name, data_dir)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        if name.endswith(".npz"):
            raise FileNotFoundError(f"MedMNIST file not found: {name}")
        dest = candidates[0]
        try:
            _download_medmnist(name, dest)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            looked = ", ".join(str(p) for p in candidates)
            raise FileNotFoundError(
                f"MedMNIST '{name}': no local copy (looked in {looked}) and the download "
                f"from {MEDMNIST_URL.format(name=name)} failed ({exc}). If this machine is "
                f"offline, copy {name}.npz into a folder and set data-dir to it."
            ) from exc
        path = dest
    return read_medmnist_npz(path)


def _load_local(kind: str) -> Callable[..., Splits]:
    """``imagefolder:<dir>`` / ``dicom:<dir>`` / ``csv:<file>``: a site's own files (common.data.readers),
    split 70/10/20 (seeded; site by site where records carry their site). Any
    corrupt file or bad label is an error naming it. A ``schema`` maps CSV
    columns and class names by name."""

    def load(rest: str, data_dir: str, seed: int, schema=None) -> Splits:
        spec = f"{kind}:{rest}"
        classes = schema.classes if schema is not None else None
        return splits_from_records(spec, read_site_records(spec, classes=classes, schema=schema),
                                   seed)

    return load


def _load_breast_cancer_hospitals(rest: str, data_dir: str, seed: int, schema=None) -> Splits:
    """scikit-learn's breast-cancer data (569 records, 30 features) as a CSV of
    hospitals (:func:`breast_cancer_hospitals_csv`), read like any site CSV."""
    path = breast_cancer_hospitals_csv(Path(data_dir or ".fedtransfer/data"))
    return _load_local("csv")(f"{path}?{BREAST_CANCER_OPTIONS}", data_dir, seed, schema)


BREAST_CANCER_OPTIONS = "label=diagnosis&site=hospital"


def record_columns(dataset: str) -> tuple[str, ...]:
    """The non-feature columns a dataset's CSV files carry (label, site, patient), from
    its spec: ``predict`` reads those files as the sites did. ``()`` for other data."""
    if dataset == "breast-cancer-hospitals":
        dataset = f"csv:x.csv?{BREAST_CANCER_OPTIONS}"
    if not dataset.startswith("csv:"):
        return ()
    try:
        return data_spec(dataset).columns
    except SiteDataError:
        return ()


def breast_cancer_hospitals_csv(folder: Path, *, num_sites: int = 4) -> Path:
    """Write (once) scikit-learn's breast-cancer records as a CSV with a
    ``hospital`` column and a ``diagnosis`` label (class names), and return it.

    The hospitals are built deterministically: records are dealt to
    ``num_sites`` hospitals with a per-class Dirichlet(1.0) share (seed 0), so
    hospitals differ in size and case mix. Test data for the natural
    partition, not a claim about real hospitals.
    """
    from sklearn.datasets import load_breast_cancer

    path = Path(folder) / f"breast-cancer-{num_sites}-hospitals.csv"
    if path.is_file():
        return path
    bunch = load_breast_cancer()
    rng = np.random.default_rng(0)
    site = np.empty(len(bunch.target), dtype=np.int64)
    for c in np.unique(bunch.target):
        idx = rng.permutation(np.flatnonzero(bunch.target == c))
        share = rng.dirichlet(np.ones(num_sites))
        cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
        for s, part in enumerate(np.split(idx, cuts)):
            site[part] = s
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*bunch.feature_names, "hospital", "diagnosis"])
        for x, s, y in zip(bunch.data, site, bunch.target, strict=True):
            w.writerow([*(repr(float(v)) for v in x), f"hospital-{s + 1}", bunch.target_names[y]])
    os.replace(tmp, path)
    return path


_REGISTRY: dict[str, Callable[[str, int], Splits]] = {"digits": _load_digits}
_PREFIXES: dict[str, Callable[..., Splits]] = {
    "medmnist": _load_medmnist, "imagefolder": _load_local("imagefolder"),
    "dicom": _load_local("dicom"), "csv": _load_local("csv")}
_TABULAR = {"breast-cancer-hospitals": _load_breast_cancer_hospitals}
DATASET_NAMES = ("digits", "breast-cancer-hospitals",
                 "medmnist:<name or path.npz>[?patients=constructed]",
                 "imagefolder:<dir>[?site=folder&patient=...]",
                 "dicom:<dir>[?site=folder&patient=...]",
                 "csv:<file>[?label=COL&missing=error|drop|zero&site=COL]",
                 "csv:<dir of per-site .csv files>")


def load_dataset(spec: str, data_dir: str = "", seed: int = 0, schema=None) -> Splits:
    """Load a dataset by registry name, e.g. ``digits`` or ``medmnist:pneumoniamnist``.
    ``schema`` (:class:`common.data.schema.Schema`) maps a CSV's columns and classes by name."""
    if spec in _REGISTRY:
        return _REGISTRY[spec](data_dir, seed)
    if spec in _TABULAR:
        return _TABULAR[spec]("", data_dir, seed, schema)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("imagefolder", "dicom", "csv") and rest:
        return _PREFIXES[prefix](rest, data_dir, seed, schema)
    if sep and prefix == "medmnist" and "?" in rest:
        return _with_patients(_PREFIXES[prefix], rest, data_dir, seed)
    if sep and prefix in _PREFIXES and rest:
        return _PREFIXES[prefix](rest, data_dir, seed)
    raise ValueError(f"unknown dataset {spec!r}. Valid: {', '.join(DATASET_NAMES)}")


PATIENT_SOURCES = ("constructed",)  # medmnist:<name>?patients=...


def _with_patients(load: Callable[..., Splits], rest: str, data_dir: str, seed: int) -> Splits:
    """``medmnist:<name>?patients=constructed``: the data set with each training
    record's patient constructed by :func:`common.data.grouping.construct_patients`
    (MedMNIST ships no patient ids; docs/data.md says what the construction is)."""
    name, _, query = rest.partition("?")
    options = dict(item.partition("=")[::2] for item in query.split("&") if item)
    unknown = sorted(set(options) - {"patients"})
    if unknown or options.get("patients") not in PATIENT_SOURCES:
        raise ValueError(f"dataset option(s) {query!r}: medmnist takes only "
                         f"patients={'|'.join(PATIENT_SOURCES)}")
    splits = load(name, data_dir, seed)
    return replace(splits, train_groups=construct_patients(splits.train_y, seed=seed))


# --------------------------------------------------------------------------
# Hospitals
# --------------------------------------------------------------------------


def partition_indices(
    labels: np.ndarray, *, num_sites: int, partitioner: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Split record indices into ``num_sites`` hospitals with flwr-datasets.

    ``iid`` uses :class:`IidPartitioner`; ``dirichlet`` uses
    :class:`DirichletPartitioner` (label skew with concentration ``alpha``).
    """
    key = (hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest(), labels.dtype.str,
           num_sites, partitioner, float(alpha), seed)
    if key not in _PARTITIONS:
        if len(_PARTITIONS) >= 4:
            _PARTITIONS.pop(next(iter(_PARTITIONS)))
        _PARTITIONS[key] = _partition(labels, num_sites=num_sites, partitioner=partitioner,
                                      alpha=alpha, seed=seed)
    return [p.copy() for p in _PARTITIONS[key]]


# A process serving many simulated sites (a Ray actor) partitions once, not once
# per site and round: with 50 sites that made the cost per round super-linear.
_PARTITIONS: dict[tuple, list[np.ndarray]] = {}


def _partition(labels: np.ndarray, *, num_sites: int, partitioner: str, alpha: float,
               seed: int) -> list[np.ndarray]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_sites > len(labels):
        raise ValueError(f"num-sites={num_sites} exceeds the {len(labels)} training records")
    ds = Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels})
    if partitioner == "iid":
        # IidPartitioner splits in order; shuffle first (seeded) so sites are IID.
        ds = ds.shuffle(seed=seed)
        part = IidPartitioner(num_partitions=num_sites)
    elif partitioner == "dirichlet":
        min_size = max(1, min(10, len(labels) // (num_sites * 4)))
        part = DirichletPartitioner(
            num_partitions=num_sites, partition_by="label", alpha=alpha,
            min_partition_size=min_size, self_balancing=False, seed=seed,
        )
    else:
        raise ValueError(f"unknown partitioner {partitioner!r}. Valid: iid, dirichlet")
    part.dataset = ds
    return [np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(num_sites)]


def check_natural_sites(splits: Splits, num_sites: int) -> None:
    """``partitioner = "site"`` needs records that carry their site, one site per
    simulated site.

    Raises:
        ValueError: naming what is missing or the site count the data holds.
    """
    if splits.train_site is None:
        raise ValueError(
            f"partitioner 'site' needs records that carry their site: dataset {splits.name!r} "
            "has none (use csv:<file>?site=COL, csv:<dir of per-site files>, "
            "imagefolder:<dir>?site=folder, or breast-cancer-hospitals)")
    if num_sites != len(splits.site_names):
        raise ValueError(f"num-sites = {num_sites}, but dataset {splits.name!r} holds "
                         f"{len(splits.site_names)} sites ({', '.join(splits.site_names)}); "
                         f"set num-sites = {len(splits.site_names)}")


def apply_site_shift(images: np.ndarray, *, site_id: int, strength: float, seed: int) -> np.ndarray:
    """Simulate a hospital's scanner: per-site contrast, brightness and noise.

    ``strength`` in [0, 1]; 0 returns the images unchanged. Deterministic per
    ``(seed, site_id)``. Tabular records (``(N, D)``) are returned unchanged: the
    shift simulates an imaging device, and a lab value has no contrast.
    """
    if strength <= 0 or images.ndim < 3:
        return images
    rng = np.random.default_rng([seed, site_id, 7919])
    contrast = 1.0 + strength * rng.uniform(-0.5, 0.5)
    brightness = strength * rng.uniform(-0.15, 0.15)
    noise_std = strength * rng.uniform(0.0, 0.08)
    noise = rng.normal(0.0, noise_std, size=images.shape).astype(np.float32)
    mean = images.mean(axis=tuple(range(1, images.ndim)), keepdims=True)
    out = (images - mean) * contrast + mean + brightness + noise
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def site_data(splits: Splits, *, site_id: int, num_sites: int, partitioner: str,
              alpha: float, holdout: float, shift: float, seed: int) -> SiteData:
    """The private data of hospital ``site_id``: its partition, split train/holdout
    (by patient, with ``train_groups`` and ``holdout_groups`` set, where ``splits``
    carries patient ids)."""
    if not 0 <= site_id < num_sites:
        raise ValueError(f"site id {site_id} out of range for {num_sites} sites")
    if splits.train_groups is not None:
        return _patient_site_data(splits, site_id=site_id, num_sites=num_sites,
                                  partitioner=partitioner, alpha=alpha, holdout=holdout,
                                  shift=shift, seed=seed)
    if partitioner == "site":
        check_natural_sites(splits, num_sites)
        idx = np.flatnonzero(splits.train_site == site_id)
    else:
        idx = partition_indices(splits.train_y, num_sites=num_sites, partitioner=partitioner,
                                alpha=alpha, seed=seed)[site_id]
    train, hold = holdout_split(len(idx), holdout, seed=seed, site_id=site_id)
    if len(train) < 2 or len(hold) < 1:
        raise ValueError(
            f"site {site_id} has only {len(idx)} records: too few to train and hold out"
        )
    order = np.concatenate([hold, train])
    x = apply_site_shift(splits.train_x[idx[order]], site_id=site_id, strength=shift, seed=seed)
    x_hold, x_train = x[:len(hold)], x[len(hold):]
    return SiteData(
        site_id=site_id,
        train_x=x_train, train_y=splits.train_y[idx[train]],
        holdout_x=x_hold, holdout_y=splits.train_y[idx[hold]],
        num_classes=splits.num_classes,
    )


def partition_patients(splits: Splits, *, num_sites: int, partitioner: str, alpha: float,
                       seed: int) -> list[np.ndarray]:
    """Patient indices (:func:`common.data.grouping.factorize` order) per site.

    ``iid`` and ``dirichlet`` partition the patients (flwr-datasets, as
    :func:`partition_indices` does records), each patient labelled by its first
    record; ``site`` takes the records' own sites and requires every patient's
    records to lie in one site. A patient's records never span sites.

    Raises:
        ValueError: a patient's records lie in two natural sites.
    """
    inverse, count = factorize(splits.train_groups)
    first = np.full(count, len(inverse), dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(len(inverse)))
    if partitioner != "site":
        # flwr-datasets deals each class in the order given; first-appearance order
        # puts large patients first (they appear early), so deal in a seeded random order.
        order = np.random.default_rng([seed, 7368787]).permutation(count)
        return [order[p] for p in partition_indices(splits.train_y[first[order]],
                                                    num_sites=num_sites, partitioner=partitioner,
                                                    alpha=alpha, seed=seed)]
    check_natural_sites(splits, num_sites)
    site_of = splits.train_site[first]
    if np.any(splits.train_site != site_of[inverse]):
        raise ValueError("a patient's records lie in more than one site; with patient ids, "
                         "every patient must belong to one site")
    return [np.flatnonzero(site_of == s) for s in range(num_sites)]


def _patient_split(splits: Splits, *, site_id: int, num_sites: int, partitioner: str,
                   alpha: float, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(holdout record indices, training record indices, training patients)`` of
    site ``site_id`` partitioned by patient (:func:`partition_patients`): a ``holdout``
    fraction of its patients (at least one, seeded) held out whole."""
    inverse, _ = factorize(splits.train_groups)
    patients = partition_patients(splits, num_sites=num_sites, partitioner=partitioner,
                                  alpha=alpha, seed=seed)[site_id]
    rng = np.random.default_rng([seed, site_id, 104729])
    patients = rng.permutation(patients)
    n_hold = max(1, int(round(len(patients) * holdout)))
    if len(patients) - n_hold < 2:
        raise ValueError(f"site {site_id} has only {len(patients)} patients: too few to train "
                         "and hold out")
    by_patient = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[by_patient], np.arange(inverse.max() + 2))

    def records(ps: np.ndarray) -> np.ndarray:
        return np.concatenate([by_patient[starts[p]:starts[p + 1]] for p in ps])

    return records(patients[:n_hold]), records(patients[n_hold:]), len(patients) - n_hold


def _patient_site_data(splits: Splits, *, site_id: int, num_sites: int, partitioner: str,
                       alpha: float, holdout: float, shift: float, seed: int) -> SiteData:
    """:func:`site_data` by patient (:func:`_patient_split`), so a patient's records
    never span sites or the train/holdout split."""
    hold, train, _ = _patient_split(splits, site_id=site_id, num_sites=num_sites,
                                    partitioner=partitioner, alpha=alpha, holdout=holdout,
                                    seed=seed)
    idx = np.concatenate([hold, train])
    x = apply_site_shift(splits.train_x[idx], site_id=site_id, strength=shift, seed=seed)
    groups = np.asarray(splits.train_groups)
    return SiteData(
        site_id=site_id,
        train_x=x[len(hold):], train_y=splits.train_y[train],
        holdout_x=x[:len(hold)], holdout_y=splits.train_y[hold],
        num_classes=splits.num_classes,
        train_groups=groups[train], holdout_groups=groups[hold],
    )


def site_train_counts(splits: Splits, *, num_sites: int, partitioner: str, alpha: float,
                      holdout: float, seed: int, unit: str = "record"
                      ) -> tuple[dict[int, int], dict[int, str]]:
    """``(training units per site, site names)`` of a simulated federation: counts
    only (the sites' unit makes them public), computed as :func:`site_data` splits.
    ``unit = "patient"`` counts training patients (data with patient ids), else records.
    Names are the records' own site names (``partitioner = "site"``), as the per-site
    metrics name them."""
    if splits.train_groups is not None:
        names = (dict(enumerate(splits.site_names)) if partitioner == "site"
                 else {i: f"site {i}" for i in range(num_sites)})
        counts = {}
        for i in range(num_sites):
            _, train, patients = _patient_split(splits, site_id=i, num_sites=num_sites,
                                                partitioner=partitioner, alpha=alpha,
                                                holdout=holdout, seed=seed)
            counts[i] = patients if unit == "patient" else len(train)
        return counts, names
    if partitioner == "site":
        check_natural_sites(splits, num_sites)
        sizes = [int((splits.train_site == i).sum()) for i in range(num_sites)]
        names = dict(enumerate(splits.site_names))
    else:
        sizes = [len(p) for p in partition_indices(splits.train_y, num_sites=num_sites,
                                                   partitioner=partitioner, alpha=alpha,
                                                   seed=seed)]
        names = {i: f"site {i}" for i in range(num_sites)}
    return {i: n - max(1, int(round(n * holdout))) for i, n in enumerate(sizes)}, names


EXPORT_SPLITS = ("train", "val", "test")


class ExportCounts(dict):
    """Records written per site and class; ``left_out``: records of the written splits
    left out because they are identical to a public or test record."""

    def __init__(self, counts: dict[str, dict[str, int]], left_out: int = 0):
        super().__init__(counts)
        self.left_out = left_out


def export_site_folders(splits: Splits, out: str | Path, *, num_sites: int, alpha: float,
                        seed: int = 0, include: tuple[str, ...] = ("train",)
                        ) -> ExportCounts:
    """Write the records of ``include`` (by default the source's training split only: the
    public val and test splits are the coordinator's, never a site's) as PNG files in
    ``out/site-<i>/<class>/``, leaving out any record identical to one of the splits not
    written (see below): hospitals as folders, dealt by a Dirichlet(α) label skew
    (flwr-datasets), for ``imagefolder:<out>?site=folder`` with ``partitioner = "site"``,
    or one folder per deployed site. Returns the record count per site and class.

    Raises:
        FileExistsError: ``out`` exists and is not empty (nothing is overwritten).
        ValueError: an unknown split in ``include``.
    """
    from PIL import Image  # lazy: only an export writes images

    bad = [p for p in include if p not in EXPORT_SPLITS]
    if bad or not include:
        raise ValueError(f"unknown split(s) {bad}; allowed: {', '.join(EXPORT_SPLITS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    x = np.concatenate([getattr(splits, f"{p}_x") for p in include])
    y = np.concatenate([getattr(splits, f"{p}_y") for p in include])
    # A record of the written splits identical to one of the coordinator's public or
    # test records (sources hold such duplicates across their splits: PneumoniaMNIST's
    # train split has 10) is left out: a site holding it would not be admitted.
    public = {d for p in ("val", "test") if p not in include
              for d in record_digests(getattr(splits, f"{p}_x"))}
    keep = np.array([d not in public for d in record_digests(x)], dtype=bool)
    left_out = int((~keep).sum())
    x, y = x[keep], y[keep]
    parts = partition_indices(y, num_sites=num_sites, partitioner="dirichlet", alpha=alpha,
                              seed=seed)
    counts: dict[str, dict[str, int]] = {}
    for s, idx in enumerate(parts):
        site = f"site-{s}"  # as the node configs, keys and the run records name it
        counts[site] = {}
        for c, name in enumerate(splits.classes):
            folder = out / site / name
            folder.mkdir(parents=True, exist_ok=True)
            mine = idx[y[idx] == c]
            for i in mine:
                img = np.clip(np.round(x[i] * 255), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:06d}.png")
            counts[site][name] = int(len(mine))
    return ExportCounts(counts, left_out)


def federation(cfg, *, dp_as_public: bool = False):
    """``(splits, schema)`` for a run: the dataset (a CSV's columns mapped by the
    declared schema's names) and the federation's schema, declared or derived,
    with every ``public`` constant fitted on the public validation split.

    ``dp``-scaled features stay unfitted (the server's scaling query fits them),
    unless ``dp_as_public`` (a centralized baseline, which has no sites).

    Raises:
        SchemaError: the declared schema does not match the dataset, naming both.
    """
    declared = load_schema(cfg.schema)
    # A tabular schema maps a CSV's columns by name; an image schema may declare a window.
    mapping = declared if declared is not None and (
        declared.input == "tabular" or declared.image_window) else None
    splits = load_dataset(cfg.dataset, cfg.data_dir, cfg.seed, schema=mapping)
    if declared is not None and tuple(declared.classes) != tuple(splits.classes):
        raise SchemaError(f"the schema's classes {list(declared.classes)} differ from dataset "
                          f"{cfg.dataset!r}'s {list(splits.classes)}")
    tabular = bool(splits.columns)
    if declared is not None and (declared.input == "tabular") != tabular:
        raise SchemaError(f"the schema declares {declared.input} input, dataset {cfg.dataset!r} "
                          f"holds {'tabular' if tabular else 'image'} records")
    if declared is None:
        schema = (derived_tabular(splits.classes, splits.columns, label=splits.label) if tabular
                  else image_schema(splits.classes, image_size=cfg.image_size,
                                    image_channels=cfg.image_channels))
    elif declared.input == "image":
        schema = replace(declared, image_size=cfg.image_size, image_channels=cfg.image_channels)
    else:
        schema = declared
    if dp_as_public:
        schema = replace(schema, features=tuple(
            replace(f, scaling="public") if f.scaling == "dp" and not f.fitted else f
            for f in schema.features))
    if schema.needs("public"):
        schema = schema.fit_public(splits.val_x)
    return splits, schema

