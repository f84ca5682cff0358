"""Data: what a record is, where it comes from, and whether a site's data is ready.

``schema`` (the federation's declared classes and features), ``splits`` (the record
containers every reader returns), ``datasets`` (the dataset registry, hospital
partitions, acquisition shift), ``readers`` (a site's own image folders, CSV and
``.npz`` files), ``sitecheck`` (``fedtransfer site check``).
"""
