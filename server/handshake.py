"""The coordinator's declaration-only question, before round 1 and to late joiners.

Every site reads its records as it declares (:mod:`common.declaration`). Before it
asks for a round, the coordinator asks each connected site which declaration it
holds (schema and backbone, by hash and in full), in which unit of privacy, and
whether its data passed its own check (``query.declaration``). No site reads a
record to answer. A site whose declaration differs from the federation's is
named with each difference; before round 1 that stops the run (a federation whose
sites read their records differently has nothing to average). A site that is not
admitted is named and left out. Sites that connect later are asked before their
first round; only sites that answered as the federation declares are sampled.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.config import RunConfig
from common.data.digests import read_public_hashes
from common.data.schema import Schema
from common.audit.sources import register_public_key
from common.declaration import Declaration
from common.federation import load_federation
from common.privacy.ledger import key_id, load_public_key
from common.protocol import DECLARATION_MESSAGE_TYPE

log = logging.getLogger(__name__)


class FederationMismatch(RuntimeError):
    """A site declares something other than the federation; the run does not start."""


def wait_for_sites(grid: Grid, count: int, timeout: float, *, want: int | None = None,
                   grace: float = 10.0) -> list[int]:
    """The connected nodes once at least ``count`` are (or ``timeout`` passes); then up to
    ``grace`` seconds more for ``want`` (every planned site)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    grace_end = time.monotonic() + grace
    while want is not None and len(nodes) < want and time.monotonic() < grace_end:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    return nodes


class Handshake:
    """Which nodes answered as the federation declares (see the module doc)."""

    def __init__(self, cfg: RunConfig, schema: Schema, *, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir  # where each site's ledger public key is registered
        self.expected = Declaration(schema=schema, backbone=cfg.backbone)
        # The hash of the public-record digest list the federation publishes: each site
        # must have checked its records against exactly this list ('' when none is published).
        self.public_check = published_check(cfg)
        self.sites: dict[str, dict] = {}  # by site id: what each answered
        self.accepted: set[int] = set()  # node ids
        self.asked: set[int] = set()

    def start(self, grid: Grid) -> None:
        """Ask every site before round 1.

        Raises:
            FederationMismatch: a site declares another schema or backbone (named).
        """
        nodes = wait_for_sites(grid, self.cfg.min_sites, self.cfg.round_timeout,
                               want=self.cfg.num_sites)
        mismatches = self.ask(grid, nodes)
        if mismatches:
            raise FederationMismatch(
                "the federation does not start: " + "; ".join(mismatches) + ". Every site "
                f"must read its records as the federation declares (declaration "
                f"{self.expected.sha256[:16]}...: {json.dumps(self.expected.to_dict())})")

    def ask(self, grid: Grid, nodes: list[int]) -> list[str]:
        """Ask ``nodes`` that were not asked yet; returns the mismatches found."""
        new = [n for n in nodes if n not in self.asked]
        if not new:
            return []
        config = ConfigRecord({"declaration": self.expected.sha256,
                               "backbone": self.expected.backbone,
                               "schema": self.expected.schema.to_json()})
        messages = [Message(content=RecordDict({"config": config}),
                            message_type=DECLARATION_MESSAGE_TYPE, dst_node_id=n) for n in new]
        mismatches = []
        replies = {m.metadata.src_node_id: m for m in
                   grid.send_and_receive(messages, timeout=self.cfg.round_timeout)}
        for node in new:
            self.asked.add(node)
            msg = replies.get(node)
            problem, record = self._read(node, msg)
            site = str(record.get("site-id", f"node-{node}"))
            self.sites[site] = {"node_id": node, **{k.replace("-", "_"): v for k, v in
                                                    record.items() if k not in
                                                    ("declaration-json", "ledger-public-key")},
                                "accepted": problem is None}
            if problem is None:
                self.accepted.add(node)
            elif problem.startswith("declares"):
                mismatches.append(f"site {site} (node {node}) {problem}")
                log.error("site %s (node %d) %s", site, node, problem)
            else:
                log.warning("site %s (node %d) is left out: %s", site, node, problem)
        return mismatches

    def _read(self, node: int, msg: Message | None) -> tuple[str | None, dict]:
        if msg is None:
            return "did not answer the declaration question", {}
        if msg.has_error():
            return f"answered with an error: {msg.error.reason}", {}
        content = msg.content.config_records
        if "declaration" not in content:
            status = dict(content.get("status", {}))
            return f"is not ready ({status.get('status')}: {status.get('reason', '')})", status
        record = dict(content["declaration"])
        unit = str(record.get("privacy-unit", "record"))
        if record.get("declaration") == self.expected.sha256 and unit != self.cfg.privacy_unit:
            # The site's unit is its own policy; a round asking another would be declined.
            return (f"declares privacy-unit {unit!r} where the federation asks "
                    f"{self.cfg.privacy_unit!r}"), record
        if record.get("declaration") == self.expected.sha256:
            problem = self._register_key(record)
            if problem:
                return problem, record
            if self.public_check and record.get("public-check") != self.public_check:
                return ("did not check its records against the federation's published public "
                        "and test record digests (its check: "
                        f"{str(record.get('public-check'))[:16] or 'none'}, published "
                        f"{self.public_check[:16]})"), record
            return None, record
        try:
            theirs = json.loads(str(record.get("declaration-json", "")))
        except ValueError:
            theirs = {}
        mine = self.expected.to_dict()
        diffs = [f"{k} {json.dumps(theirs.get(k))} where the federation has {json.dumps(mine[k])}"
                 for k in mine if theirs.get(k) != mine[k]] or ["another declaration"]
        return "declares " + "; ".join(diffs), record

    def _register_key(self, record: dict) -> str | None:
        """Keep the site's ledger public key with the run (the audit verifies with it), or
        refuse a site whose key differs from the one the run already registered."""
        pem = str(record.pop("ledger-public-key", "") or "")
        if not pem or self.run_dir is None:
            return None
        try:
            path = register_public_key(self.run_dir, record.get("site-id"), pem)
        except ValueError as exc:
            return f"presents another ledger key than the run registered ({exc})"
        record["ledger-key-id"] = key_id(load_public_key(path))
        return None

    def counts(self) -> dict[int, int]:
        """The accepted sites' admitted training-unit counts (records or patients, as the
        federation's unit; public), by site id."""
        return {int(v["site_id"]): int(v["num_examples"]) for v in self.sites.values()
                if v.get("accepted") and "num_examples" in v}

    def summary(self) -> dict:
        return {"declaration": self.expected.sha256, "expected": self.expected.to_dict(),
                "public_check": self.public_check, "sites": self.sites}


def published_check(cfg: RunConfig) -> str:
    """The sha256 of the public-record digest list the run's federation file publishes."""
    if not cfg.federation:
        return ""
    hashes = load_federation(cfg.federation).public_hashes
    return read_public_hashes(hashes)[1] if hashes is not None else ""
