"""What a site declares about its records, and how a request is compared with it.

A site fixes how its records are read: the federation's schema (classes in
order; for images the size and channels each record is converted to; for
tables the features, their kinds and levels, the label column and the
missing-value policy) and the backbone that turns a record into features. It
declares them in its own node config or policy file, checks them against its
data once (admission, when it starts or by ``fedtransfer site check``), and
never re-reads its records per request.

A request carries the federation's schema and backbone too. The site compares
the two *declarations* (:func:`differences`), never a declaration with its
records, so whether a request is declined is a function of the request and the
site's declaration only: a coordinator cannot learn anything about a record by
varying how the site should read it.

The request's schema may add what is public and was fitted after the
declaration was written: the centre and scale of ``public``- or ``dp``-scaled
features (fitted on the server's public split, or from the sites' DP sums).
Everything else must be equal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from common.data.schema import Schema

# Feature scalings whose constants the federation fits after the declaration (public).
FITTED_LATER = ("public", "dp")


def declared_part(schema: Schema) -> Schema:
    """``schema`` without the constants the federation fits later (see the module doc)."""
    return replace(schema, features=tuple(
        replace(f, center=None, scale=None) if f.kind == "numeric" and f.scaling in FITTED_LATER
        else f for f in schema.features))


@dataclass(frozen=True)
class Declaration:
    """How a site reads its records: the federation's schema and the backbone."""

    schema: Schema
    backbone: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "schema", declared_part(self.schema))

    def to_dict(self) -> dict:
        return {"schema": self.schema.to_dict(), "backbone": self.backbone}

    @property
    def sha256(self) -> str:
        """The declaration's hash: what a site and the coordinator compare (no record is in it)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def num_classes(self) -> int:
        return len(self.schema.classes)


def differences(site: Declaration, schema: Schema, backbone: str) -> list[str]:
    """How a request's schema and backbone differ from the site's declaration
    (empty: they agree). Each line names the field and both values; it is built
    from the two declarations only."""
    if backbone != site.backbone:
        return [f"backbone {backbone!r} is not this site's declared backbone {site.backbone!r}"]
    mine, theirs = site.schema.to_dict(), declared_part(schema).to_dict()
    out = []
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) != theirs.get(key):
            if key == "features":
                out.append(_feature_differences(mine.get(key) or [], theirs.get(key) or []))
            else:
                out.append(f"schema '{key}' {theirs.get(key)!r} differs from this site's declared "
                           f"{mine.get(key)!r}")
    return out


def _feature_differences(mine: list[dict], theirs: list[dict]) -> str:
    names_mine, names_theirs = [f["name"] for f in mine], [f["name"] for f in theirs]
    if names_mine != names_theirs:
        return (f"schema features {names_theirs} differ from this site's declared "
                f"{names_mine}")
    bad = [f"{a['name']}: {b} (declared {a})" for a, b in zip(mine, theirs, strict=True) if a != b]
    return "schema feature(s) differ from this site's declaration: " + "; ".join(bad)
