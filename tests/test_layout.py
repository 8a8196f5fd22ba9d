"""The house rules a reader relies on: scripts that only parse flags (no script imports another, nor does a
benchmark), library functions a screen long with few parameters, SQL in store.py alone."""

import ast
import os
import re

from conftest import ROOT

LIBRARY = ("dataset_maker", "detection", "lxmert", "photo_library", "utils", "GCN_lib")
MODULES = ("attention", "captioning", "data", "evaluation", "inference", "model", "vocab")
MAX_LINES, MAX_PARAMETERS = 80, 11
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE)\b.*\b(FROM|INTO|SET|WHERE)\b")


def python_files(*folders):
    for folder in folders:
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def scripts():
    """The top-level job scripts: every top-level .py that is not a library module."""
    return {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py") and name[:-3] not in MODULES}


def library_files():
    return [*python_files(*LIBRARY), *(f"{name}.py" for name in MODULES)]


def tree(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def imported(path):
    """The top-level names of the modules `path` imports."""
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_scripts_and_benchmarks_import_no_script():
    jobs = scripts()
    assert {"train", "index", "search", "extract_regions", "lxmert_match"} <= jobs
    offenders = [
        (path, name)
        for path in [*(f"{job}.py" for job in jobs), *python_files("bench"), *library_files()]
        for name in imported(path)
        if name in jobs
    ]
    assert offenders == []


def test_library_functions_are_short_and_take_few_parameters():
    long, wide = [], []
    for path in library_files():
        for node in ast.walk(tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                arguments = node.args
                count = len(arguments.posonlyargs + arguments.args + arguments.kwonlyargs)
                if lines > MAX_LINES:
                    long.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
                if count > MAX_PARAMETERS:
                    wide.append(f"{path}:{node.lineno} {node.name} ({count} parameters)")
    assert long == [] and wide == []


def test_sql_is_written_in_store_py_alone():
    found = []
    for path in [*library_files(), *(f"{job}.py" for job in scripts()), *python_files("bench")]:
        if path == os.path.join("photo_library", "store.py"):
            continue
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
                found.append(f"{path}:{node.lineno}")
    assert found == []
