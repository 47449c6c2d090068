"""The documents point at real things: every test named in docs/guarantees.md exists, and no
code or document sends its reader to a specification they do not have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_named_in_the_guarantees_exists():
    text = (ROOT / "docs" / "guarantees.md").read_text()
    named = re.findall(r"tests/(test_\w+\.py)::(test_\w+)", text)
    assert len(named) > 80
    missing = []
    for file, name in named:
        source = ROOT / "tests" / file
        if not source.exists() or not re.search(rf"^def {name}\(", source.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, missing


def test_no_reference_to_a_spec_the_reader_does_not_have():
    offenders = []
    for path in [*ROOT.glob("src/**/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bSPEC\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, offenders


def test_no_document_names_a_path_or_address_of_one_machine():
    """Documents are read on other machines: no /tmp/…, /work/…, /root, /home/… path and no
    IP address but the loopback (bqx's own `/tmp/bqx-<hash>` socket rule is a design, kept)."""
    machine = re.compile(
        r"(?<![\w.])/(?:tmp|work|root|home)/(?!bqx-<)|\b(?!127\.0\.0\.1\b)(?:\d{1,3}\.){3}\d{1,3}\b"
    )
    offenders = []
    for path in [*ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("bench/results/*.md")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if machine.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    assert not offenders, "\n".join(offenders)
