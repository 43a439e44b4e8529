"""The wheelhouse the images install from: every runtime dependency at the version installed here.

    python deploy/wheelhouse.py build/wheelhouse/cpu                   # `make images` runs this
    python deploy/wheelhouse.py build/wheelhouse/cuda --torch-index-url https://download.pytorch.org/whl/cu128

Run with the interpreter of the environment the tests ran in (the Makefile's ``.venv``): it pins the
installed versions of ``potluck``'s dependencies (extras left out, so no test tools), and of the build
tools that install ``potluck`` itself from source without an index, into ``OUT/requirements.txt``,
then fetches a wheel of each with this machine's pip configuration (its index, ``find-links``, proxy).
``deploy/Dockerfile`` installs them with ``pip --no-index``: the image holds exactly these versions and
its build reaches no package index.

``--torch-index-url`` takes torch from that index instead (the CUDA variant: the tests ran on the CPU
build), with whatever it needs from there (the ``nvidia-*`` libraries); the other pins stay.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT_DISTRIBUTION = "potluck"
BUILD_TOOLS = ("setuptools",)
"""pyproject's build backend: the image builds ``potluck`` from its source with ``--no-build-isolation``."""


def runtime_pins(root: str = ROOT_DISTRIBUTION, extra_roots: tuple[str, ...] = BUILD_TOOLS) -> dict[str, str]:
    """``{canonical name: installed version}`` of everything ``root`` needs at run time, transitively,
    plus ``extra_roots`` and what they need. Extras count only where a requirement asks for them."""
    environment = default_environment()
    pins: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    pending += [(name, frozenset()) for name in extra_roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"wheelhouse: {name} is required but not installed in {sys.prefix}") from None
        if canonicalize_name(name) != canonicalize_name(root):
            pins[canonicalize_name(name)] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({**environment, "extra": extra}) for extra in ("", *extras)
            )
            if wanted:
                pending.append((requirement.name, frozenset(requirement.extras)))
    return dict(sorted(pins.items()))


def requirements_text(pins: dict[str, str], torch_from_index: bool) -> str:
    lines = [f"# pinned by deploy/wheelhouse.py from {sys.prefix} (python {python_version()})"]
    for name, version in pins.items():
        if name == "torch" and torch_from_index:
            version = version.split("+")[0]  # the index's own build of that release
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def build(out: Path, torch_index_url: str | None) -> None:
    """Fill ``out`` afresh; wheels of a previous ``out`` are reused, not downloaded again."""
    pins = runtime_pins()
    previous = out.with_name(out.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    out.mkdir(parents=True)
    requirements = out / "requirements.txt"
    requirements.write_text(requirements_text(pins, torch_from_index=torch_index_url is not None))
    # the interpreter's minor version, which every cp3XX wheel here is built for: the Dockerfile checks
    # the base image's against it
    (out / "python-version").write_text(python_version() + "\n")
    reuse = ["--find-links", str(previous)] if previous.exists() else []
    pinned = requirements.read_text().splitlines()[1:]
    try:
        if torch_index_url:
            torch = [line for line in pinned if line.startswith("torch==")]
            pinned = [line for line in pinned if not line.startswith("torch==")]
            pip("download", *reuse, "--only-binary=:all:", "--dest", str(out), "--extra-index-url",
                torch_index_url, *torch)  # fmt: skip
        pip("wheel", *reuse, "--no-deps", "--wheel-dir", str(out), *pinned)
    except subprocess.CalledProcessError:
        # keep what the last one had, so that the next try downloads only what is missing
        for wheel in previous.glob("*.whl") if previous.exists() else ():
            if not (out / wheel.name).exists():
                wheel.rename(out / wheel.name)
        raise SystemExit("wheelhouse: pip could not fetch every wheel (its message is above)") from None
    finally:
        shutil.rmtree(previous, ignore_errors=True)
    print(f"wheelhouse: {len(list(out.glob('*.whl')))} wheels in {out} for python {python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the wheelhouse folder (replaced)")
    parser.add_argument(
        "--torch-index-url", default=None, help="take torch (and its own dependencies) from this index"
    )
    args = parser.parse_args(argv)
    build(args.out, args.torch_index_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
