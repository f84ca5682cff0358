"""The privacy audit: it reads ledgers and run records, never trusts a stored ε,
verifies with public keys only, and fails closed.

``sources`` (ledgers, exports, run records, anchors, seals, keys: read-only, never
raising on a bad ledger) -> ``checks`` (the registry of hazard codes and the pure
checks) -> ``recompute`` (ε recomputed per site three ways, in the site's unit; the
glue) -> ``report`` (text, JSON, HTML); ``empirical`` (a one-run canary audit of the
DP-SGD implementation).
"""
