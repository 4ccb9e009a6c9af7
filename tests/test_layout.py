"""The layout holds: imports run one way down the stages (the chain stated in docs/design.md), and no
production package imports footage, benchmarks, tests or an entry script."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# never imported by a production package: they exist to check, measure or show the system
ABOVE_PRODUCTION = ("footage", "benchmarks", "tests", "train", "evaluate", "bench")


def _chain() -> list[set[str]]:
    """docs/design.md's import chain, lowest layer first: ``common -> storage -> ... -> evaluation``."""
    text = (ROOT / "docs" / "design.md").read_text()
    match = re.search(r"Imports run one way: .*?\n`([a-z_ |\->]+)`", text)
    assert match, "docs/design.md states the import chain (`common -> ... -> evaluation`)"
    return [{name.strip() for name in layer.split("|")} for layer in match.group(1).split("->")]


def _imports(package: str) -> list[tuple[str, int, str]]:
    """(file, line, top-level module) of every absolute import in ``package``, function-level ones included."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [(str(path.relative_to(ROOT)), node.lineno, name.split(".")[0]) for name in names]
    return found


def test_the_chain_names_the_production_packages():
    chain = _chain()
    named = set().union(*chain)
    for package in ("common", "shard_tools", "pipelines", "models", "objectives", "training", "evaluation"):
        assert package in named and (ROOT / package / "__init__.py").is_file(), package
    assert not named & set(ABOVE_PRODUCTION)


def test_imports_run_one_way():
    chain = _chain()
    layer_of = {name: i for i, layer in enumerate(chain) for name in layer}
    wrong = []
    for package, layer in layer_of.items():
        if not (ROOT / package).is_dir():
            continue  # a stage named in the chain that this checkout does not have yet
        for path, line, module in _imports(package):
            if module == package:
                continue
            if module in ABOVE_PRODUCTION:
                wrong.append(f"{path}:{line} imports {module} (tests, benchmarks, footage and entry scripts only)")
            elif module in layer_of and layer_of[module] >= layer:
                wrong.append(f"{path}:{line}: {package} imports {module}, which is not below it in docs/design.md")
    assert not wrong, "\n".join(wrong)
