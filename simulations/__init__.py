"""Multi-hospital scenarios, named configs and the `fedtransfer` command line."""
