"""The layers docs/architecture.md states, read from the source with `ast` (no import is run).

Every module of the package has a row in the doc's "Layers" table; a module imports only
modules of lower layers, or of its own layer where the table allows it. Prediction never
imports a training stage, even through another module, and no module reads another's
private names.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bottleneck"
DOC = ROOT / "docs" / "architecture.md"

# (layer, part, modules, what it may import from its own layer); the same rows as the doc's
# table, so that neither changes without the other.
LAYERS = [
    (1, "base", ("errors", "console", "stats", "data_tree", "locks"), "any"),
    (2, "rules", ("scores", "classifiers", "linear", "settings", "stages", "runtime", "views"), "any"),
    (3, "shared", ("data", "store", "weights", "backbones", "networks", "preprocess", "report", "trained", "folds",
                   "leaks", "decode"), "any"),
    (4, "extract", ("extract",), "own part"),
    (4, "fit", ("classify", "choose"), "own part"),
    (4, "finetune", ("finetune", "finetune_data", "finetune_loop", "finetune_probe", "finetune_top"), "own part"),
    (4, "predict", ("predict", "exported"), "own part"),
    (4, "export", ("export", "folded"), "own part"),
    (4, "compare", ("compare", "compare_html"), "own part"),
    (4, "audit", ("audit",), "own part"),
    (5, "entry", ("pipeline", "slurm", "cli", "__init__", "__main__"), "any"),
]
TRAINING = ("fit", "finetune")  # the parts that train a model
PREDICTION = ("predict", "trained")  # what reads a trained model and scores with it


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def module_aliases(tree: ast.Module, known: set[str]) -> dict[str, str]:
    """Local names bound to a module of the package (`from bottleneck import report as reports`)."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "bottleneck":
            found |= {a.asname or a.name: a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.Import):
            found |= {a.asname: a.name.split(".")[1] for a in node.names
                      if a.asname and a.name.startswith("bottleneck.")}
    return found


def imports(tree: ast.Module, known: set[str]) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) for every import of the package, at the top or in a function."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("bottleneck"):
            if node.module == "bottleneck":
                found += [(a.name, []) for a in node.names if a.name in known]
            else:
                found.append((node.module.split(".")[1], [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], []) for a in node.names if a.name.startswith("bottleneck.")]
    return found


def graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: {m for m, _ in imports(tree, set(trees))} - {name} for name, tree in trees.items()}


def doc_layers() -> list[tuple]:
    """The rows of the table under "## Layers" in docs/architecture.md."""
    section = DOC.read_text().split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            names = tuple(re.findall(r"`([\w.]+)`", cells[2]))
            rows.append((int(cells[0]), cells[1], tuple(n.removesuffix(".py") for n in names), cells[3]))
    return rows


def place() -> dict[str, tuple[int, str, str]]:
    return {m: (layer, part, within) for layer, part, mods, within in LAYERS for m in mods}


def allowed(importer: str, imported: str) -> bool:
    (layer, part, within), (their_layer, their_part, _) = place()[importer], place()[imported]
    if their_layer != layer:
        return their_layer < layer
    return within == "any" or their_part == part


def test_the_table_is_the_one_in_docs_architecture():
    assert doc_layers() == LAYERS


def test_every_module_has_one_row():
    listed = [m for _, _, mods, _ in LAYERS for m in mods]
    assert len(listed) == len(set(listed)), "a module is listed twice"
    missing = set(modules()) - set(listed)
    assert not missing, f"add {sorted(missing)} to the Layers table of docs/architecture.md and to LAYERS here"
    assert not set(listed) - set(modules()), "the table lists a module that is gone"


def test_every_import_goes_down_or_stays_in_its_part():
    wrong = [f"{a} imports {b}" for a, deps in graph().items() for b in sorted(deps) if not allowed(a, b)]
    assert not wrong, wrong


def reachable(start: str, g: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in g[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


@pytest.mark.parametrize("reader", PREDICTION)
def test_prediction_never_imports_a_training_stage(reader):
    training = {m for _, part, mods, _ in LAYERS if part in TRAINING for m in mods}
    assert training, "no training stage in the table"
    assert not reachable(reader, graph()) & training


def private_uses(name: str, tree: ast.Module, known: set[str]) -> list[str]:
    """`from bottleneck.x import _y` and `x._y` in `name`, for x another module of the package."""
    found = [f"{m}.{n}" for m, names in imports(tree, known) for n in names
             if m != name and n.startswith("_") and not n.startswith("__")]
    aliases = module_aliases(tree, known)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and aliases.get(owner.id, name) != name:
                found.append(f"{aliases[owner.id]}.{node.attr}")
            elif isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) and \
                    owner.value.id == "bottleneck" and owner.attr in known and owner.attr != name:
                found.append(f"{owner.attr}.{node.attr}")
    return found


def test_no_module_reads_another_modules_private_names():
    trees = modules()
    wrong = {name: uses for name, tree in trees.items() if (uses := private_uses(name, tree, set(trees)))}
    assert not wrong, wrong


def test_the_checks_see_what_they_forbid():
    """The readers above find an import in a function, an alias and a private name."""
    source = ("def f():\n    from bottleneck import report as reports, finetune\n"
              "    from bottleneck.classify import _duration\n    return reports._row, finetune.x\n")
    tree = ast.parse(source)
    known = {"report", "finetune", "classify"}
    assert {m for m, _ in imports(tree, known)} == {"report", "finetune", "classify"}
    assert sorted(private_uses("predict", tree, known)) == ["classify._duration", "report._row"]
    assert not allowed("trained", "finetune") and not allowed("predict", "classify")
    assert allowed("finetune_top", "finetune_loop") and allowed("cli", "predict")
