"""The README is a manual that stays true: every module and file it names exists, its links resolve,
the two commands sit near the top, it stays short, and docs/README.md indexes all of docs/.

Files are read and parsed, nothing is imported: no Ray, no torch, no photos.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

DEMO = "python3.11 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/ngt-ray demo"
TESTS = ("(command -v chromium || apt-get install -y chromium) && python3.11 -m venv .venv && "
         ".venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest -q tests")

# `ngt_ray.job.plan.plan`: a module path, possibly followed by attributes
DOTTED = re.compile(r"(?<![\w./-])ngt_ray(?:\.[A-Za-z_]\w*)+")
# `ngt_ray/job/fetch.py`, `jobs/gpu_check.sh`, `docs/evaluation/`: paths from the repository root
# (not `../shared/...` nor the key of a URL, hence the look-behind)
PATH = re.compile(r"(?<![\w./~:-])(?:ngt_ray|jobs|docs|cluster|tests|\.ci)/[\w.\-/]*")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _text() -> str:
    return README.read_text(encoding="utf-8")


@cache
def _top_level_names(path: Path) -> dict[str, ast.AST]:
    """Names a module defines or imports at its top level, with their nodes (classes for nesting)."""
    names: dict[str, ast.AST] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = node
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
    return names


def _module_file(parts: list[str], root: Path) -> Path | None:
    """The file of the module ``parts`` (``["ngt_ray", "job", "plan"]``), a package's ``__init__.py``."""
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def dotted_name_exists(name: str, root: Path = ROOT) -> bool:
    """``ngt_ray.a.b.attr``: the longest prefix that is a module exists, and what follows it is an
    attribute defined there (or nested in a class defined there)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = _module_file(parts[:cut], root)
        if module is None:
            continue
        rest = parts[cut:]
        if not rest:
            return True
        node: ast.AST | None = _top_level_names(module).get(rest[0])
        for attr in rest[1:]:
            if not isinstance(node, ast.ClassDef):
                return False
            node = next((n for n in node.body if getattr(n, "name", None) == attr
                         or (isinstance(n, ast.Assign | ast.AnnAssign) and attr in {
                             t.id for t in ast.walk(n) if isinstance(t, ast.Name)})), None)
        return node is not None
    return False


def path_exists(path: str, root: Path = ROOT) -> bool:
    """A file or folder, or a checkpoint or report stem (``ngt_ray/checkpoints/x`` for ``x.pt``)."""
    path = path.rstrip(".,;:")
    target = root / path
    if target.exists():
        return True
    return target.parent.is_dir() and any(target.parent.glob(target.name + ".*"))


def missing_names(text: str, root: Path = ROOT) -> list[str]:
    """Every module, attribute and repository path ``text`` names that does not exist under ``root``."""
    missing = [name for name in sorted(set(DOTTED.findall(text))) if not dotted_name_exists(name, root)]
    missing += [path for path in sorted(set(PATH.findall(text))) if not path_exists(path, root)]
    return missing


def broken_links(text: str, base: Path) -> list[str]:
    """Relative links (``](docs/x.md)``, ``](cluster/README.md#y)``) that do not resolve from ``base``."""
    broken = []
    for link in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue
        if not (base / link.split("#")[0]).exists():
            broken.append(link)
    return broken


def test_every_module_and_path_the_readme_names_exists():
    text = _text()
    assert DOTTED.search(text) and PATH.search(text), "the README names modules and files; the patterns found none"
    assert missing_names(text) == []


def test_the_check_catches_names_that_do_not_exist():
    stale = ("`ngt_ray.plan.plan(cfg)`, `ngt_ray.pipeline.build`, `ngt_ray/rows.py`, `ngt_ray.job.plan.nothing`, "
             "`docs/nowhere.md`, `jobs/gone.sh`")
    assert missing_names(stale) == ["ngt_ray.job.plan.nothing", "ngt_ray.pipeline.build", "ngt_ray.plan.plan",
                                    "docs/nowhere.md", "jobs/gone.sh", "ngt_ray/rows.py"]
    real = ("`ngt_ray.job.plan.plan`, `ngt_ray.job.contracts.ActorSpec`, `ngt_ray.grouptesting.algorithms`, "
            "`ngt_ray/job/fetch.py`, `ngt_ray/checkpoints/revolver-lite0-tree-k8`, `docs/evaluation/`, "
            "`../shared/data/caltech101`, `s3://my-bucket/docs/x.md`")
    assert missing_names(real) == []
    assert broken_links("[a](docs/nowhere.md) [b](docs/faults.md#rules) [c](https://x.org/y)", ROOT) == \
        ["docs/nowhere.md"]


def test_links_in_the_readme_resolve():
    text = _text()
    assert "](docs/" in text
    assert broken_links(text, ROOT) == []


def test_the_two_commands_are_near_the_top_and_the_readme_is_short():
    lines = _text().splitlines()
    top = "\n".join(lines[:60])
    assert DEMO in top, "the demo command must be within the first 60 lines, exactly as written"
    assert TESTS in top, "the tests command must be within the first 60 lines, exactly as written"
    assert len(lines) < 300, f"README.md has {len(lines)} lines; keep it under 300 (details go to docs/)"


def test_docs_readme_indexes_everything_in_docs():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    unlisted = [entry.name + ("/" if entry.is_dir() else "") for entry in sorted(DOCS.iterdir())
                if entry.name != "README.md" and not entry.name.startswith(".")
                and (entry.name + ("/" if entry.is_dir() else "")) not in index]
    assert unlisted == [], f"docs/README.md does not mention {unlisted}"
    assert broken_links(index, DOCS) == []
