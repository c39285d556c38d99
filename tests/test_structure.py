"""The habits that keep the code readable, checked on the source (docs/ARCHITECTURE.md).

- polycoder's modules import each other without cycles, module by module and package by
  package (scripts/import_graph.py reads the graph from the source);
- library code never imports the command line (`polycoder.cli`); the CLI imports it;
- imports of our own modules stand at the top of the file (a deferred import is only for a
  heavy optional dependency, which is never one of ours), with one documented exception:
  the verb modules named in `polycoder.cli.COMMANDS` (see the test);
- the model file imports nothing of ours but its config and the ops interface;
- no module is over 500 lines, and nothing assigns an object's `__class__`.
"""

from __future__ import annotations

import importlib.util
import re

from conftest import REPO

from polycoder.cli import COMMANDS

SRC = REPO / "src" / "polycoder"
spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)

GRAPH = import_graph.imports(REPO / "src")


def test_the_graph_was_read():
    assert {"polycoder.model", "polycoder.generation.engine", "polycoder.cli"} <= set(GRAPH)
    assert ("polycoder.model", True) in {(d, top) for d, top, _ in GRAPH["polycoder.generation.engine"]}


def test_no_import_cycles_between_modules_or_packages():
    edges = {m: {d for d, _, _ in deps} for m, deps in GRAPH.items()}
    assert import_graph.cycles(edges) == []
    assert import_graph.cycles(import_graph.package_graph(GRAPH)) == []


def test_library_code_never_imports_the_cli():
    users = sorted(m for m, deps in GRAPH.items() if any(d == "polycoder.cli" for d, _, _ in deps))
    assert users == ["polycoder.__main__"]


def test_our_imports_are_at_the_top_of_each_file():
    """Except in a verb's module (the one `cli.COMMANDS` names): the CLI imports it to build
    the verb's parser, so it imports what runs the model (torch and our modules that import
    it) inside the functions that run it, and `polycoder VERB --help` answers in a fraction
    of a second instead of the 2 s of importing torch (tests/test_startup.py checks it).
    Torch is not optional, so nowhere else may our imports wait."""
    verb_modules = {target.split(":")[0] for target in COMMANDS.values()}
    deferred = [(m, d, line) for m, deps in GRAPH.items() for d, top, line in deps if not top and m not in verb_modules]
    assert deferred == []


def test_the_model_file_shows_the_model():
    assert {d for d, _, _ in GRAPH["polycoder.model"]} == {"polycoder.config", "polycoder.ops"}


def test_modules_stay_small_and_classes_are_never_swapped():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
    swapped = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if re.search(r"\.__class__\s*=[^=]", p.read_text())]
    assert swapped == []


def test_the_documented_package_graph_is_the_source_s():
    """docs/ARCHITECTURE.md lists which package imports which; it must say what the code does."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("## Which package imports which")[1].split("```")[1]
    documented = {}
    for line in block.strip().splitlines():
        name, _, deps = line.partition("->")
        deps = deps.split("(")[0].strip()
        documented[name.strip()] = set() if deps == "-" else {d.strip() for d in deps.split(",")}
    actual = {p.removeprefix("polycoder."): {d.removeprefix("polycoder.") for d in ds}
              for p, ds in import_graph.package_graph(GRAPH).items()}
    for package, deps in actual.items():
        if deps and package != "__main__":
            assert documented.get(package) == deps, f"{package}: documented {documented.get(package)}, imports {deps}"
    assert set(documented) <= set(actual)
