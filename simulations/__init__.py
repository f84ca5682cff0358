"""Running a federation on one machine: the Ray simulation, the pooled (centralized)
baseline, a real deployment over loopback, backbone selection on public data, and
the named scenarios."""
