"""The package's modules import each other without cycles, counting imports inside functions:
each module can be read, and imported, after the modules it builds on."""

import ast
import importlib.util
from pathlib import Path

import fastgpt


def package_modules():
    """{module name: path} of every module of the installed fastgpt package, subpackages included."""
    modules = {}

    def walk(name, directories):
        for directory in map(Path, directories):
            for path in sorted(directory.glob("*.py")):
                modules[name if path.stem == "__init__" else f"{name}.{path.stem}"] = path
            for child in sorted(directory.iterdir()):
                if (child / "__init__.py").is_file():
                    walk(f"{name}.{child.name}", [child])
    walk("fastgpt", fastgpt.__path__)
    # fastgpt.kernels is installed from another folder of the repository.
    kernels = importlib.util.find_spec("fastgpt.kernels")
    walk("fastgpt.kernels", kernels.submodule_search_locations)
    return modules


def imported_modules(name, path, known):
    """The package modules that module `name` imports anywhere in its code."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package the module is in
                parts = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from package import name` imports the submodule `name` where there is one.
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    # A module's own packages are imported before it anyway: not an edge.
    return {module for module in found if module in known and not name.startswith(module + ".") and module != name}


def cycle(graph):
    """One import cycle of the graph as a list of modules, or None."""
    state = {}

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state:
                found = visit(imported, path + [imported])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_the_walk_sees_the_whole_package_and_its_imports():
    modules = package_modules()
    assert {"fastgpt.model", "fastgpt.ops", "fastgpt.ops.cpp", "fastgpt.kernels.causal_attention"} <= modules.keys()
    assert imported_modules("fastgpt.sample", modules["fastgpt.sample"], modules) >= {"fastgpt.model",
                                                                                      "fastgpt.device"}


def test_the_cycle_finder_finds_a_cycle_made_by_an_import_inside_a_function(tmp_path):
    (tmp_path / "a.py").write_text("import fastgpt.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from fastgpt import a\n")
    known = {"fastgpt.a": tmp_path / "a.py", "fastgpt.b": tmp_path / "b.py"}
    graph = {name: imported_modules(name, path, known) for name, path in known.items()}
    assert cycle(graph) == ["fastgpt.a", "fastgpt.b", "fastgpt.a"]


def test_no_import_cycles_among_the_modules():
    modules = package_modules()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph))
