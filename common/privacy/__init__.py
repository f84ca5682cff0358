"""Privacy: the accounting of mechanism histories, the site's ledger, and DP statistics.

``accounting`` (pure functions: ε of a history, σ calibration) <- ``ledger`` (the
site's append-only record of what it released) and ``scaling`` (the Gaussian
mechanism on a site's clipped feature sums). Nothing here imports Flower.
"""
