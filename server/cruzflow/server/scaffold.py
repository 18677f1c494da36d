"""``cruzflow new workflow NAME``: a workflow project to start from, as the seed's
``cruz new workflow onboarding`` makes one.

It writes ``external-processes/NAME/`` with the workflow's package, its config
(``cruzflow.toml``), a ``pyproject.toml`` that depends on the release series
of this cruzflow, a README that says how to install it from this cruzflow's
wheels, and a test written with ``cruzflow.testing``. The files come from
``templates/workflow/`` (package data), filled in with ``string.Template``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import keyword
import re
import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from urllib.parse import urlparse
from urllib.request import url2pathname

_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
_MAX_NAME = 50
# Template file -> where it goes in the project; {package} is the package's folder.
_FILES = (
    ("cruzflow.toml.tmpl", "cruzflow.toml"),
    ("pyproject.toml.tmpl", "pyproject.toml"),
    ("README.md.tmpl", "README.md"),
    ("gitignore.tmpl", ".gitignore"),
    ("__init__.py.tmpl", "{package}/__init__.py"),
    ("workflow.py.tmpl", "{package}/workflow.py"),
    ("test_workflow.py.tmpl", "tests/test_workflow.py"),
)
# Names a project package must not take: python_path puts the project first on
# sys.path, so such a package would hide the module the server or a test imports.
_TAKEN = {"cruzflow", "tests", "test", "conftest", "examples"}


class ScaffoldError(Exception):
    """The project cannot be created; the message says how to mend that."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class Names:
    """What a project NAME becomes: ``onboarding`` gives package ``onboarding``,
    class ``OnboardingWorkflow``, workflow ``onboarding-workflow`` and binding
    ``ONBOARDING_WORKFLOW``, as in the seed's wrangler.toml."""

    name: str
    package: str
    class_name: str
    params_class: str
    workflow_name: str
    binding: str

    @classmethod
    def of(cls, name: str) -> Names:
        """Derive the names, or raise ScaffoldError (exit code 2) for a bad NAME."""
        hint = "e.g. onboarding or user-signup"
        if not _NAME.fullmatch(name) or len(name) > _MAX_NAME:
            raise ScaffoldError(
                f"{name!r} is not a valid workflow name: use 1 to {_MAX_NAME} lower-case "
                f"letters and digits, starting with a letter, words joined by '-' or '_' ({hint})",
                2,
            )
        parts = re.split(r"[-_]", name)
        package = "_".join(parts)
        if keyword.iskeyword(package) or package in _taken_modules():
            raise ScaffoldError(
                f"{name!r} would make a package {package!r}, which is the name of a module "
                f"Python or cruzflow already imports; the project's package would hide it. "
                f"Choose another name, e.g. {name}-flow",
                2,
            )
        # "onboarding-workflow" gives OnboardingWorkflow, not OnboardingWorkflowWorkflow.
        stem = parts[:-1] if len(parts) > 1 and parts[-1] == "workflow" else parts
        camel = "".join(part.capitalize() for part in stem)
        workflow_name = "-".join([*stem, "workflow"])
        return cls(
            name=name,
            package=package,
            class_name=f"{camel}Workflow",
            params_class=f"{camel}Params",
            workflow_name=workflow_name,
            binding=workflow_name.replace("-", "_").upper(),
        )


def _taken_modules() -> set[str]:
    return _TAKEN | set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("cruzflow")
    except importlib.metadata.PackageNotFoundError:
        return None


def _requirement(version: str | None) -> str:
    """The project's dependency on cruzflow: the release series of the
    cruzflow that made it, from that release on (``0.1.0`` gives
    ``cruzflow>=0.1.0,<0.2``: before 1.0 a minor release may break, as in semver)."""
    if version is None:
        return "cruzflow"
    version = version.split("+")[0]  # a local version cannot be a floor
    release = re.match(r"(\d+)\.(\d+)", version)
    if release is None:
        return f"cruzflow>={version}"
    major, minor = int(release[1]), int(release[2])
    upper = f"0.{minor + 1}" if major == 0 else f"{major + 1}"
    return f"cruzflow>={version},<{upper}"


def _wheel_folder() -> str:
    """Where the README's install step finds the cruzflow wheels: the ``dist/``
    that ``make dist`` writes in the checkout this cruzflow was installed from,
    or the folder of the wheel it was installed from (pip records either,
    PEP 610); else a path for the user to fill in."""
    try:
        recorded = importlib.metadata.distribution("cruzflow").read_text("direct_url.json")
        origin = json.loads(recorded or "{}")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        origin = {}
    url = origin.get("url", "") if isinstance(origin, dict) else ""
    if url.startswith("file://"):
        path = Path(url2pathname(urlparse(url).path))
        if "dir_info" in origin:
            return shlex.quote(str(path / "dist"))
        if "archive_info" in origin and path.suffix == ".whl":
            return shlex.quote(str(path.parent))
    return "/path/to/cruzflow/dist"


def scaffold_workflow(name: str, base: Path, *, force: bool = False) -> tuple[Path, list[Path]]:
    """Write ``base/external-processes/NAME/``; return it and the files written
    (relative to it). ScaffoldError: exit code 2 for a bad NAME, 1 for a folder
    that exists (without ``force``) or cannot be written."""
    names = Names.of(name)
    target = base / "external-processes" / name
    if target.exists() and not force:
        raise ScaffoldError(
            f"{target} exists already; choose another name, remove the folder, or pass "
            f"--force to write the project's files into it (overwriting those of the same name)",
            1,
        )
    version = _installed_version()
    values = {
        "name": names.name,
        "package": names.package,
        "class_name": names.class_name,
        "params_class": names.params_class,
        "workflow_name": names.workflow_name,
        "binding": names.binding,
        "cruzflow_requirement": _requirement(version),
        "cruzflow_version": version or "VERSION",
        "wheel_folder": _wheel_folder(),
    }
    templates = resources.files("cruzflow.server").joinpath("templates", "workflow")
    written: list[Path] = []
    try:
        for template, destination in _FILES:
            text = Template(templates.joinpath(template).read_text(encoding="utf-8"))
            relative = Path(destination.format(package=names.package))
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text.substitute(values), encoding="utf-8")
            written.append(relative)
    except OSError as exc:
        raise ScaffoldError(f"cannot write {target}: {exc}", 1) from None
    return target, written


def _new_workflow(args: argparse.Namespace) -> int:
    try:
        target, written = scaffold_workflow(args.name, Path(args.dir), force=args.force)
    except ScaffoldError as exc:
        print(f"cruzflow new workflow: {exc}", file=sys.stderr)
        return exc.exit_code
    names = Names.of(args.name)
    print(f"Created {target}/ with the workflow {names.workflow_name!r} ({names.class_name}):")
    for relative in written:
        print(f"  {relative.as_posix()}")
    print("Next:")
    print(f"  cd {target}")
    print("  python -m pytest                        # its tests, with cruzflow.testing")
    print("  cruzflow serve --config cruzflow.toml   # serve it on 127.0.0.1:50051")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``new workflow NAME [--dir DIR] [--force]`` to the cruzflow command."""
    new = subparsers.add_parser(
        "new",
        help="create a project to start from",
        description="Create a project to start from.",
    )
    kinds = new.add_subparsers(dest="kind", required=True, metavar="KIND")
    workflow = kinds.add_parser(
        "workflow",
        help="a workflow project in external-processes/NAME",
        description=(
            "Create external-processes/NAME/: a workflow package with a two-step example, "
            "its cruzflow.toml, a pyproject.toml and a test written with cruzflow.testing."
        ),
    )
    workflow.add_argument(
        "name", metavar="NAME", help="lower-case words joined by '-', e.g. onboarding"
    )
    workflow.add_argument(
        "--dir",
        default=".",
        help="folder to create external-processes/ in (default: the current folder)",
    )
    workflow.add_argument(
        "--force",
        action="store_true",
        help="write into an existing folder, overwriting the files of the same name",
    )
    workflow.set_defaults(func=_new_workflow)


def main_for_tests(argv: list[str]) -> int:
    """Run ``cruzflow`` with only the ``new`` command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="cruzflow")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    code: int = args.func(args)
    return code
