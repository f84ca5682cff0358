"""``benchmarks/BENCHMARKS.md`` is current: it states the commit it was generated from,
and no code its numbers depend on (``benchmarks/``, ``common/privacy/``,
``simulations/engine.py``) changed after that commit. The report's own outputs
(``BENCHMARKS.md`` and ``benchmarks/results/``) do not count as changes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.machine import STAMP, STAMP_RE
from benchmarks.markdown import render
from tests.conftest import REPO

WATCHED = ("benchmarks", "common/privacy", "simulations/engine.py")
GENERATED = ("benchmarks/BENCHMARKS.md", "benchmarks/results")
REPORT = "benchmarks/BENCHMARKS.md"


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60)


def in_git_checkout(repo: Path) -> bool:
    r = _git(repo, "rev-parse", "--is-inside-work-tree")
    return r.returncode == 0 and r.stdout.strip() == "true"


def staleness(repo: Path, report: str) -> str | None:
    """Why ``report`` (BENCHMARKS.md's text) is stale in the checkout ``repo``, or None."""
    m = STAMP_RE.search(report)
    if m is None or m["commit"] == "unknown":
        return (f"{REPORT} does not state the commit it was generated from; regenerate it "
                "(make bench-full)")
    if m["dirty"] != "false":
        return (f"{REPORT} was generated from a checkout with uncommitted changes "
                f"(dirty={m['dirty']}); regenerate it from a clean one (make bench-full)")
    commit = m["commit"]
    if _git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        return f"{REPORT} names commit {commit[:12]}, which this repository does not have"
    excludes = [f":(exclude){p}" for p in GENERATED]
    newest = _git(repo, "log", "-1", "--format=%H %s", "--", *WATCHED, *excludes).stdout.strip()
    if not newest:
        return None  # nothing watched was ever committed
    sha, _, subject = newest.partition(" ")
    if _git(repo, "merge-base", "--is-ancestor", sha, commit).returncode != 0:
        return (f"{REPORT} was generated from {commit[:12]}, but {sha[:12]} (\"{subject}\") "
                f"changed {', '.join(WATCHED)} after it; regenerate it (make bench-full)")
    return None


def test_benchmarks_md_is_generated_from_the_newest_code():
    if not in_git_checkout(REPO):
        pytest.skip(f"{REPO} is not a git checkout: the report's age against the code "
                    "cannot be checked")
    shallow = _git(REPO, "rev-parse", "--is-shallow-repository").stdout.strip() == "true"
    why = staleness(REPO, (REPO / REPORT).read_text())
    if shallow and why is not None and "does not have" in why:
        pytest.skip(f"a shallow clone: {why}")
    assert why is None, why


# -- the check itself, on a repository made here --------------------------------


def _commit(repo: Path, path: str, text: str, message: str) -> str:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(text)
    assert _git(repo, "add", path).returncode == 0
    r = _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    assert r.returncode == 0, r.stderr
    return _git(repo, "rev-parse", "HEAD").stdout.strip()


def _stamp(commit: str, dirty: bool = False) -> str:
    return "# report\n\n" + STAMP.format(commit=commit, committed="2026-12-07T00:00:00+00:00",
                                         dirty=str(dirty).lower()) + "\n"


def test_staleness_follows_the_watched_code_only(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert _git(repo, "init", "-q").returncode == 0
    made = _commit(repo, "benchmarks/suite.py", "a = 1\n", "benchmark code")
    assert staleness(repo, _stamp(made)) is None
    # Regenerating commits the report and its results: not a change of the code.
    _commit(repo, REPORT, _stamp(made), "regenerate the report")
    _commit(repo, "benchmarks/results/run.json", "{}", "results")
    _commit(repo, "docs/other.md", "x", "unwatched")
    assert staleness(repo, _stamp(made)) is None
    # Any watched path changing afterwards makes it stale, and the message says which commit.
    for path in ("common/privacy/accounting.py", "simulations/engine.py", "benchmarks/scale.py"):
        changed = _commit(repo, path, f"# {path}\n", f"change {path}")
        why = staleness(repo, _stamp(made))
        assert why is not None and changed[:12] in why and f"change {path}" in why
        made = changed
        assert staleness(repo, _stamp(made)) is None
    assert "uncommitted" in staleness(repo, _stamp(made, dirty=True))
    assert "does not state" in staleness(repo, "# report without a stamp\n")
    assert "does not have" in staleness(repo, _stamp("0" * 40))


def test_the_report_states_the_commit_and_date(tmp_path):
    doc = json.loads((REPO / "benchmarks/results/2026-11-26-cpu2-xeon-full.json").read_text())
    code = {"commit": "ab" * 20, "committed": "2026-12-07T10:00:00+00:00", "dirty": False}
    text = render({**doc, "code": code}, tmp_path / "r.json", {}, tmp_path)
    m = STAMP_RE.search(text)
    assert m and m["commit"] == "ab" * 20 and m["dirty"] == "false"
    assert "from commit `abababababab` (committed 2026-12-07T10:00:00+00:00) on 2026-11-26" in text
    old = render(doc, tmp_path / "r.json", {}, tmp_path)  # a results file made before the stamp
    assert STAMP_RE.search(old)["commit"] == "unknown" and "was not recorded" in old
