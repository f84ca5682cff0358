"""Docs that run (issue 24): every TOML, JSON and shell snippet in README.md and docs/
is parsed; every `fedtransfer` command in them is parsed by the real command line, its
`--set` keys by the real config parser, and its data specs by the real reader."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib

import pytest

from cli.main import build_parser
from common.config import parse_config, parse_overrides, render_reference
from common.data.readers import data_spec
from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```([\w-]*)\n(.*?)^\1```", re.M | re.S)
SHELL = ("bash", "sh", "shell", "console")


def _snippets():
    for page in PAGES:
        for m in FENCE.finditer(page.read_text()):
            lang, body = m.group(2).lower(), m.group(3)
            body = "\n".join(line[len(m.group(1)):] for line in body.splitlines())
            line = page.read_text()[:m.start()].count("\n") + 1
            yield pytest.param(lang, body, id=f"{page.name}:{line}:{lang or 'text'}")


SNIPPETS = list(_snippets())


def test_the_pages_have_snippets_to_check():
    langs = {p.values[0] for p in SNIPPETS}
    assert {"toml", "bash"} <= langs


@pytest.mark.parametrize("lang, body", [p for p in SNIPPETS if p.values[0] == "toml"])
def test_every_toml_snippet_parses(lang, body):
    doc = tomllib.loads(body)
    if "schema" in doc:  # a [schema] table is a real schema
        from common.data.schema import Schema

        Schema.from_dict(doc["schema"])


@pytest.mark.parametrize("lang, body", [p for p in SNIPPETS if p.values[0] == "json"])
def test_every_json_snippet_parses(lang, body):
    json.loads(body)


def _commands(body: str) -> list[str]:
    """Shell commands, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


@pytest.mark.parametrize("lang, body", [p for p in SNIPPETS if p.values[0] in SHELL])
def test_every_shell_snippet_parses_and_its_fedtransfer_commands_are_valid(lang, body):
    check = subprocess.run(["bash", "-n"], input=body, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    parser = build_parser()
    for cmd in _commands(body):
        head = re.sub(r"^(?:[A-Z_]+=\S*\s+)+", "", cmd)
        if not head.startswith(("fedtransfer ", "flwr run ")):
            continue
        words = shlex.split(head, comments=True)
        if words[0] == "flwr":  # its --run-config keys are RunConfig keys
            if "--run-config" in words:
                items = shlex.split(words[words.index("--run-config") + 1])
                parse_config(parse_overrides(items))
            continue
        args = parser.parse_args(words[1:])  # exits (fails the test) on a bad command
        if getattr(args, "set", None):
            parse_config(parse_overrides(args.set))
        for spec in (getattr(args, "data", None),):
            if spec:
                data_spec(spec)


def test_docs_configuration_is_generated_from_runconfig():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert render_reference(page) == page, "run `python -m common.config` to regenerate"
