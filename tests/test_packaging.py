"""Packaging metadata: the oldest-versions pins agree with pyproject.toml's lower bounds."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def test_oldest_deps_pin_exactly_the_lower_bounds():
    """Every pin in tests/oldest-deps.txt is the lower bound pyproject.toml states for that
    package (the same one wherever it is named), and every runtime dependency is pinned, so
    `make test-oldest` tests the versions the package claims to support."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    extras = [Requirement(r) for reqs in project["optional-dependencies"].values() for r in reqs]
    bounds: dict[str, set[Version]] = {}
    for req in runtime + extras:
        for spec in req.specifier:
            if spec.operator == ">=":
                bounds.setdefault(req.name.lower(), set()).add(Version(spec.version))

    pins = {}
    for line in (ROOT / "tests" / "oldest-deps.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower()] = Version(spec.version)

    for name, version in pins.items():
        assert bounds.get(name) == {version}, (name, version, bounds.get(name))
    missing = {r.name.lower() for r in runtime} - set(pins)
    assert not missing, missing
