"""The package's layers go one way: no module, and no package, imports one that imports it back."""
import ast
import pathlib

import autobatch

PACKAGE = pathlib.Path(autobatch.__file__).resolve().parent


def imports() -> dict[str, set[str]]:
    """Every module of autobatch and the autobatch modules it imports (at any depth of its code)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autobatch"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("autobatch"))
        graph[name] = found - {name}
    return graph


def unit(module: str) -> str:
    """A module's unit of layering: its subpackage (autobatch.batchnorm, autobatch.planning...), or itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() and len(parts) == 2 else module


def cycle(graph: dict[str, set[str]]):
    """A cycle of ``graph`` as a list of nodes, or None."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            found = visit(target)
            if found:
                return found
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        found = visit(node)
        if found:
            return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    # The package's own __init__ re-exports; the command line and the integrations sit above everything.
    graph = {module: {t for t in targets if t != "autobatch"} for module, targets in imports().items()
             if module != "autobatch"}
    assert cycle(graph) is None


def test_no_package_imports_a_package_that_imports_it_back():
    units: dict[str, set[str]] = {}
    for module, targets in imports().items():
        if module == "autobatch":
            continue
        source = unit(module)
        units.setdefault(source, set()).update(unit(t) for t in targets if t != "autobatch" and unit(t) != source)
    assert cycle(units) is None, cycle(units)


def test_the_leaf_modules_import_nothing_of_autobatch_above_them():
    graph = imports()
    leaves = {"autobatch.oom", "autobatch.sizes", "autobatch.stages", "autobatch.checkpointing", "autobatch.modes",
              "autobatch.split", "autobatch.loss", "autobatch.forward", "autobatch.once"}
    for leaf in leaves:
        assert graph[leaf] <= leaves - {leaf}, (leaf, graph[leaf] - leaves)
