"""Each site's expected batch (and so its sampling rate q), planned from public counts.

A run requests one ``batch-size``; hospitals differ in size. A site with fewer
training records than the batch could never take a Poisson-sampled step of that
expected size (it used to decline every round, and the run left it out). So the
coordinator plans each site's expected batch from its record count, which is
public (every reply declares it; the unit of privacy is replace-one):

* a site with at least ``MIN_STEPS_PER_EPOCH`` batches' worth of records trains
  at the requested batch;
* a smaller site trains at ``floor(n / MIN_STEPS_PER_EPOCH)`` (at least
  ``MIN_BATCH``), so it still takes several noisy steps per epoch rather than one
  step over nearly all of its records (q near 1 gives DP-SGD almost no
  amplification by sampling);
* a site with fewer than ``MIN_BATCH * MIN_STEPS_PER_EPOCH`` records cannot be
  planned: the run stops before round 1 naming the hospital and what to change.

The plan is plain maths on public values (the requested batch and the record
count), so no extra field travels: the site applies :func:`plan_batch` to its own
count, and the server applies it to the counts it knows, to stop a run before
round 1 that some hospital could not join (:func:`plan_site_batches`), to log
each site's expected batch, and to bound each update's norm; ``fedtransfer site
check`` applies it too. A deployed site's count reaches the server with its
first reply (``num-examples``); the site's own planning never waits for it.
"""

from __future__ import annotations

from collections.abc import Mapping

MIN_STEPS_PER_EPOCH = 4
MIN_BATCH = 1


class BatchPlanError(ValueError):
    """A site too small for any batch; the message names the site and the key to change."""


def plan_batch(num_records: int, *, batch_size: int, site: str = "this site",
               min_steps: int = MIN_STEPS_PER_EPOCH) -> int:
    """The expected batch of a site with ``num_records`` training records under a
    requested ``batch_size`` (see the module doc).

    Raises:
        BatchPlanError: too few records to plan a batch, naming ``site``.
    """
    if batch_size < 1:
        raise BatchPlanError(f"batch-size must be >= 1, got {batch_size}")
    if num_records >= batch_size * min_steps:
        return batch_size
    batch = num_records // min_steps
    if batch < MIN_BATCH:
        raise BatchPlanError(
            f"{site} has {num_records} training records: too few for DP-SGD with at least "
            f"{min_steps} steps of {MIN_BATCH} expected records per epoch (needs "
            f"{MIN_BATCH * min_steps}); give it more records, lower site-holdout, or "
            "leave it out of num-sites / the data")
    return min(batch, batch_size)


def plan_site_batches(counts: Mapping[int, int], *, batch_size: int,
                      names: Mapping[int, str] | None = None) -> dict[int, int]:
    """Each site's expected batch, by site id, from its public training-record count.

    Raises:
        BatchPlanError: naming the first site (by ``names``, as the metrics name
            it) that cannot be planned.
    """
    names = names or {}
    return {sid: plan_batch(n, batch_size=batch_size, site=names.get(sid, f"site {sid}"))
            for sid, n in sorted(counts.items())}
