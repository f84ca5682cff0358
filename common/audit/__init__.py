"""The privacy audit: it reads ledgers and run records and never trusts a stored ε.

``recompute`` (ε recomputed per site three ways, hazards), ``report`` (text, JSON,
HTML), ``empirical`` (a one-run canary audit of the DP-SGD implementation).
"""
