"""Named scenarios: ``simulations/configs/NAME.toml``, resolved with ``--set`` overrides."""

from __future__ import annotations

from pathlib import Path

from common.config import RunConfig, load_config_file, parse_config, parse_overrides

# `fedtransfer simulate --config NAME` reads CONFIG_DIR / "NAME.toml".
CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config(config: str | None, overrides: list[str], out: str | None) -> RunConfig:
    """Named scenario or file, then ``--set`` overrides, then ``--out``."""
    raw: dict = {}
    if config:
        path = Path(config)
        if not path.is_file() and (CONFIG_DIR / f"{config}.toml").is_file():
            path = CONFIG_DIR / f"{config}.toml"
        raw.update(load_config_file(path))
    raw.update(parse_overrides(overrides))
    if out:
        raw["out-dir"] = out
    return parse_config(raw)
