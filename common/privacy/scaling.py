"""DP feature scaling: the Gaussian mechanism on a site's clipped sums (OpenDP).

Before round 1, for every numeric feature whose schema scaling is ``dp``,
each site releases the sum over its training records of the per-record
vectors of :meth:`common.data.schema.Schema.scaling_vectors` (each of L2 norm at
most ``C``), plus Gaussian noise of standard deviation ``σ·C``, drawn by
OpenDP's ``make_gaussian``. Replacing one record moves the sum by at most
``2C``, exactly what DP-SGD's accounting assumes for clip norm ``C``; so the
release is recorded in the site's ledger as the mechanism ``(σ, q = 1,
steps = 1)``, and one accountant composes it with the DP-SGD rounds.

σ is calibrated at the site so that the release alone costs ``budget`` times
the site's cap (at the cap's δ); the site's σ floor still applies. The
server sums the sites' noisy vectors and turns them into each feature's
centre and scale (:meth:`common.data.schema.Schema.fit_from_sums`):
post-processing, no further ε.
"""

from __future__ import annotations

import numpy as np

from common.privacy.accounting import Mechanism, calibrate_noise_multiplier

# The ledger's sampler for a release over every training record (q = 1).
SAMPLER = "full:opendp-gaussian"
# OpenDP draws the noise from the operating system's CSPRNG (its ledger entry says so).
SECURE_RNG = True


def scaling_sigma(*, cap: float, delta: float, budget: float, floor: float = 0.0) -> float:
    """σ for a release that alone costs ``budget * cap`` at ``delta`` (replace-one PLD)."""
    if not 0 < budget <= 0.5:
        raise ValueError(f"scaling budget must be in (0, 0.5] of the cap, got {budget!r}")
    sigma = calibrate_noise_multiplier(target_epsilon=budget * cap, delta=delta, sample_rate=1.0,
                                       steps=1)
    return max(sigma, floor)


def mechanism(sigma: float) -> Mechanism:
    """The ledger's record of one scaling release."""
    return Mechanism(noise_multiplier=sigma, sample_rate=1.0, steps=1)


def noisy_sum(vectors: np.ndarray, *, norm_bound: float, sigma: float) -> np.ndarray:
    """``sum(vectors) + N(0, (σ·C)² I)`` through OpenDP's Gaussian mechanism.

    Each row's L2 norm must be at most ``norm_bound`` (``C``); this is
    checked, not assumed. OpenDP samples the noise exactly (no floating-point
    attack on the tails) and its own zCDP map is checked against σ.
    """
    import opendp.prelude as dp

    dp.enable_features("contrib")
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"scaling vectors must be (N, D) with D > 0, got {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1)
    if (norms > norm_bound * (1 + 1e-9)).any():
        raise ValueError(f"a scaling vector has L2 norm {norms.max():.6g} above the bound "
                         f"{norm_bound:.6g}")
    total = vectors.sum(axis=0)
    space = (dp.vector_domain(dp.atom_domain(T=float, nan=False), size=len(total)),
             dp.l2_distance(T=float))
    meas = dp.m.make_gaussian(*space, scale=float(sigma * norm_bound))
    # OpenDP's own privacy map: ρ (zCDP) for a change of 2C in the sum.
    rho = float(meas.map(2 * norm_bound))
    if not np.isclose(rho, 2.0 / sigma ** 2, rtol=1e-6):
        raise RuntimeError(f"OpenDP maps this release to ρ={rho}, expected 2/σ²={2 / sigma ** 2}")
    return np.asarray(meas(total.tolist()), dtype=np.float64)
