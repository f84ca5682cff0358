"""Patients: grouping a site's records by patient, and a constructed grouping for public data.

A site that declares ``privacy-unit = "patient"`` knows each training record's
patient (``SiteData.train_groups``: any hashable id, read only for grouping,
never sent). This module turns those ids into patient indices
(:func:`factorize`), summarises them for the site's own log and ``site check``
(:func:`patient_summary`), and, because no public medical data set with patient
ids ships offline here, **constructs** patients for a data set that has none
(:func:`construct_patients`; ``docs/data.md``, "Patients: a constructed
grouping").

The construction is a stated rule, not a claim about real patients:

* **Label-consistent.** A patient's records all carry the same label (records
  are dealt to patients class by class).
* **1 to 10 records per patient, skewed.** Patient sizes are drawn from a
  truncated power law, ``P(k) ∝ k^-1.5`` for ``k = 1..10``: half the patients
  have one record, under 2 % have ten, and the mean is about 2.5 (repeat
  imaging is long-tailed: most people are imaged once, a few many times). The
  last patient of each class takes what is left (at least one record).
* **Seeded.** A pure function of the labels and the seed.
* **No look-alike structure.** Records are dealt to patients at random within a
  class, so two records of one constructed patient are no more alike than two
  records of the same class. Real repeat images of one patient are; that does
  not change the guarantee (patient-level DP holds for any grouping), only how
  much a record-level guarantee would leak about a real patient.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

# The constructed grouping's rule (docs/data.md); changing it changes every
# constructed scenario, so the values are named once here.
MAX_RECORDS_PER_PATIENT = 10
SIZE_EXPONENT = 1.5
_SALT = 0x9A71E47  # separates this rule's random stream from the partition's


def records_per_patient_pmf(max_records: int = MAX_RECORDS_PER_PATIENT,
                            exponent: float = SIZE_EXPONENT) -> np.ndarray:
    """``P(k)`` for ``k = 1..max_records``: the truncated power law ``k^-exponent``."""
    if int(max_records) != max_records or max_records < 1:
        raise ValueError(f"max_records must be an integer >= 1, got {max_records!r}")
    if not exponent >= 0:
        raise ValueError(f"exponent must be >= 0, got {exponent!r}")
    w = np.arange(1, int(max_records) + 1, dtype=np.float64) ** -float(exponent)
    return w / w.sum()


def construct_patients(labels: np.ndarray, *, seed: int, max_records: int = MAX_RECORDS_PER_PATIENT,
                       exponent: float = SIZE_EXPONENT) -> np.ndarray:
    """A patient id (int64, ``0..P-1``) for each record: the constructed grouping.

    Class by class, the records are shuffled and dealt into patients whose
    sizes are drawn from :func:`records_per_patient_pmf`; the last patient of
    a class takes the remainder. Ids are then shuffled, so an id says nothing
    about the class. Deterministic in ``(labels, seed)``.

    Raises:
        ValueError: ``labels`` is not a 1-D array of integers, or the size rule is invalid.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or (len(y) and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got shape {y.shape} "
                         f"and dtype {y.dtype}")
    pmf = records_per_patient_pmf(max_records, exponent)
    rng = np.random.default_rng([int(seed), _SALT])
    ids = np.empty(len(y), dtype=np.int64)
    next_id = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        # Enough draws to cover the class (each draw is >= 1), then cut at its size.
        sizes = rng.choice(np.arange(1, len(pmf) + 1), size=len(idx), p=pmf)
        ends = np.cumsum(sizes)
        count = int(np.searchsorted(ends, len(idx)) + 1)  # patients needed
        starts = np.concatenate([[0], ends[:count - 1]])
        for p, start in enumerate(starts):
            ids[idx[start:min(start + sizes[p], len(idx))]] = next_id + p
        next_id += count
    perm = rng.permutation(next_id)
    return perm[ids] if len(y) else ids


def factorize(groups: Sequence[Hashable] | np.ndarray) -> tuple[np.ndarray, int]:
    """``(patient index per record, number of patients)``, patients numbered in
    order of first appearance.

    Raises:
        ValueError: ``groups`` is not 1-D, or holds a missing id (None or NaN).
    """
    g = np.asarray(groups, dtype=object) if not isinstance(groups, np.ndarray) else groups
    if g.ndim != 1:
        raise ValueError(f"patient ids must be one per record (1-D), got shape {g.shape}")
    index: dict = {}
    out = np.empty(len(g), dtype=np.int64)
    for i, pid in enumerate(g.tolist()):
        if pid is None or (isinstance(pid, float) and pid != pid):
            raise ValueError(f"record {i} has no patient id; every training record of a "
                             "patient-level site needs one")
        out[i] = index.setdefault(pid, len(index))
    return out, len(index)


def group_sizes(groups: Sequence[Hashable] | np.ndarray) -> np.ndarray:
    """Records per patient, in order of first appearance."""
    inverse, count = factorize(groups)
    return np.bincount(inverse, minlength=count)


def patient_summary(groups: Sequence[Hashable] | np.ndarray, *,
                    max_records_per_patient: int | None = None) -> dict:
    """Patients, records and the records-per-patient distribution, for the site's
    own log and ``site check`` (local: it describes private records and is never
    sent). ``max_records_per_patient``: how many patients exceed the cap and how
    many records a step can use at most."""
    sizes = group_sizes(groups)
    out = {"patients": int(len(sizes)), "records": int(sizes.sum()),
           "records_per_patient": {
               "min": int(sizes.min()) if len(sizes) else 0,
               "median": float(np.median(sizes)) if len(sizes) else 0.0,
               "mean": float(sizes.mean()) if len(sizes) else 0.0,
               "max": int(sizes.max()) if len(sizes) else 0,
               "histogram": {int(k): int(v) for k, v in
                             zip(*np.unique(sizes, return_counts=True), strict=True)}}}
    if max_records_per_patient is not None:
        cap = int(max_records_per_patient)
        out["max_records_per_patient"] = cap
        out["patients_over_cap"] = int((sizes > cap).sum())
        out["records_usable_per_epoch"] = int(np.minimum(sizes, cap).sum())
    return out
