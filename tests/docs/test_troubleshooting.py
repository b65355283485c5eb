"""The troubleshooting page has a section for every exception and warning class leanloss
exports, so a new class cannot ship undocumented."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import leanloss

PAGE = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


def exported_classes():
    names = [name for name in leanloss.__all__
             if isinstance(getattr(leanloss, name), type) and issubclass(getattr(leanloss, name), (Exception, Warning))]
    transformers_api = pytest.importorskip("leanloss.integrations.transformers")
    names += [name for name in transformers_api.__all__
              if isinstance(getattr(transformers_api, name), type) and issubclass(getattr(transformers_api, name), Exception)]
    return names


def test_every_exception_and_warning_class_has_a_section():
    headings = re.findall(r"^###\s+(\w+)", PAGE.read_text(), flags=re.M)
    names = exported_classes()
    assert {"InputWarning", "TargetOutOfRangeError", "UnsupportedModelError"} <= set(names)
    missing = [name for name in names if name not in headings]
    assert not missing, f"docs/troubleshooting.md has no '### <name>' section for {missing}"
