"""Running a federation on one machine: the Ray simulation, the pooled (centralized)
baseline, a real deployment over loopback, and the named scenarios."""

from pathlib import Path

# Named scenarios: `fedtransfer simulate --config NAME` reads CONFIG_DIR / "NAME.toml".
CONFIG_DIR = Path(__file__).parent / "configs"
