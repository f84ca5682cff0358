"""The ``fedtransfer`` command line: ``main`` (simulate, compare, audit, deploy, ...),
``models`` (predict, export) and ``site`` (site check, site export)."""
