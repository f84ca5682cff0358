"""The federation file: one TOML that the coordinator and every site share.

It holds what every party must agree on, in the run config's own keys: the
schema (a ``[schema]`` table: classes in order; for images, ``image-size`` and
``image-channels``; for tables, the features), the ``backbone``, the public
data the coordinator evaluates and distils on (``dataset``, ``data-dir``), and
the plan (``num-rounds``, ``local-epochs``, ``batch-size``, ``target-epsilon``,
``target-delta``, ...). An optional ``[federation]`` table names it and points at
the hashes of the coordinator's public and test records (``public-hashes``).
Paths in the file are relative to the file.

The coordinator runs with ``federation = "<file>"`` (its keys become the run's,
and the run config may not contradict them); each site names its own copy in its
node config (``federation = "<file>"``), and takes its declaration from it: how
its records are read (:class:`common.declaration.Declaration`). Before round 1
the coordinator asks each site for its declaration's hash and refuses to start
when they differ.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from common.config import RunConfig, parse_config, read_federation_file
from common.data.schema import Schema, SchemaError, load_schema
from common.declaration import Declaration


@dataclass(frozen=True)
class Federation:
    path: Path
    name: str
    config: RunConfig  # the file's keys on RunConfig's defaults
    public_hashes: Path | None  # the coordinator's public and test record hashes
    sha256: str  # of the file's bytes

    @property
    def declaration(self) -> Declaration:
        """What a site of this federation declares (see the module doc)."""
        return Declaration(schema=federation_schema(self.config), backbone=self.config.backbone)


def federation_schema(cfg: RunConfig) -> Schema:
    """The federation's declared schema: its ``[schema]`` table, with the image size
    and channels of the run (a federation file must declare its classes: a site
    never derives them from its own records)."""
    schema = load_schema(cfg.schema or None)
    if schema is None:
        raise SchemaError("the federation file declares no [schema]: add classes = [...] in "
                          "order (and, for tables, the features), so that every site reads "
                          "its records the same way")
    if schema.input == "image":  # the declared window (if any) stays
        schema = replace(schema, image_size=cfg.image_size, image_channels=cfg.image_channels)
    return schema


def load_federation(path: str | Path) -> Federation:
    """Read and check a federation file.

    Raises:
        ValueError: unreadable, an unknown key, a bad value, no schema, or a backbone
            still to be chosen (``auto``: run ``fedtransfer select`` first and write
            the backbone it names).
    """
    path = Path(path).expanduser().resolve()
    keys, meta = read_federation_file(path)
    cfg = parse_config(keys)
    if cfg.backbone == "auto":
        raise ValueError(f"federation file {path}: backbone 'auto' is chosen before sites "
                         "declare: run `fedtransfer select` and write the backbone it names")
    federation_schema(cfg)  # raises on a missing or bad schema
    unknown = sorted(set(meta) - {"name", "public-hashes", "path"})
    if unknown:
        raise ValueError(f"federation file {path}: unknown [federation] key(s) {unknown}; "
                         "allowed: name, public-hashes")
    hashes = meta.get("public-hashes")
    if hashes:
        hashes = Path(str(hashes)).expanduser()
        hashes = hashes if hashes.is_absolute() else path.parent / hashes
    return Federation(path=path, name=str(meta.get("name", path.stem)), config=cfg,
                      public_hashes=hashes or None,
                      sha256=hashlib.sha256(path.read_bytes()).hexdigest())
