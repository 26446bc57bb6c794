"""The shape of the house, read from the code (ast), no model: no import cycles, no stage importing a later
one, nothing importing the entry point, and one table for what a method is."""
import ast
import re
import subprocess

from app import ROOT

# the stages in the order data flows through them (ARCHITECTURE.md); an earlier one never imports a later one
STAGES = ["recipe", "data", "model", "train", "export", "smoke", "report", "card"]


def imports() -> dict[str, set[str]]:
    """{module: the app modules it imports, at its top or inside a function}."""
    graph = {}
    for path in (ROOT / "app").glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "app":
                found |= {a.name for a in node.names if (ROOT / "app" / f"{a.name}.py").is_file()}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("app.")}
        graph[path.stem] = found - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, found = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while component[-1:] != [v]:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(imports()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds them


def test_no_stage_imports_a_later_one_and_nothing_imports_the_cli():
    graph = imports()
    backwards = [(a, b) for i, a in enumerate(STAGES) for b in STAGES[i + 1:] if b in graph[a]]
    assert backwards == []
    assert [m for m, deps in graph.items() if "cli" in deps] == ["__main__"]


def test_a_method_is_one_row_that_the_cli_the_recipe_and_the_makefile_read():
    from app.cli import COMMANDS
    from app.methods import METHODS
    from app.recipe import SECTIONS, trl_config_fields

    assert set(METHODS) <= set(COMMANDS) and set(METHODS) <= set(SECTIONS)
    for name in METHODS:
        assert trl_config_fields(name), name  # its config's fields, read from TRL's source
    targets = subprocess.run(["make", "-s", "--eval=print-methods: ; @echo $(METHODS)", "print-methods"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert targets == list(METHODS)


def test_a_recipe_is_read_in_one_place_and_used_typed():
    """recipe.yaml (a recipe's or a run's) is parsed by app/recipe.py alone, into one typed `Recipe` whose own
    sections are dataclasses: no module re-reads it as raw YAML, and none indexes a section like a dict."""
    from app.recipe import OURS, load_recipe

    yaml_readers = sorted(p.stem for p in (ROOT / "app").glob("*.py") if "import yaml" in p.read_text())
    assert yaml_readers == ["pairs", "recipe"]  # pairs: a constitution file, not a recipe
    indexed = re.compile(rf"\brecipe\.({'|'.join(OURS)})(\[|\.get\()")
    dict_style = [f"{p.name}: {line.strip()}" for p in (ROOT / "app").glob("*.py") for line in p.read_text().splitlines()
                  if indexed.search(line)]
    assert dict_style == []
    recipe = load_recipe("tiny")
    assert all(isinstance(getattr(recipe, s), cls) for s, cls in OURS.items())
