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


def test_wheel_installs_and_imports_with_its_metadata(tmp_path):
    """The Installation section's wheel route: build a wheel from this tree, install it into
    a folder of its own, and import that copy: one version everywhere, the license and the
    typing marker shipped."""
    import subprocess
    import sys
    import zipfile

    import gru_jax

    dist, site = tmp_path / "dist", tmp_path / "site"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(dist), str(ROOT)], check=True, timeout=300)
    (wheel,) = dist.glob("gru_jax-*.whl")
    assert wheel.name.startswith(f"gru_jax-{gru_jax.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gru_jax/py.typed" in names
    assert any(n.endswith("licenses/LICENSE") for n in names), names
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True, timeout=300)
    probe = (
        "import gru_jax, importlib.metadata as m, pathlib; "
        "print(pathlib.Path(gru_jax.__file__).parent.parent, gru_jax.__version__, "
        "m.version('gru-jax'), m.metadata('gru-jax')['License-Expression'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
        cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120,
    ).stdout.split()  # fmt: skip
    assert out == [str(site), gru_jax.__version__, gru_jax.__version__, "Apache-2.0"]
