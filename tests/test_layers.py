"""The package's import layers, held by reading the source with ast (no import runs).

Each module may import only from its own layer or lower ones; no import of our own modules inside
a function (such imports hide circles); no `_private` name taken from another module; only the
training application (training/, and tools/ above it) takes the training config (a `cfg` argument).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segment_anything"
LOW_UTILS = ("accumulate amg block_features clicks distributed draw image_spec log losses metrics onnx postprocess "
             "random_weights resize save_weight tiles trainable transforms weights").split()
LAYERS = [["modeling"], ["build_sam"], [f"utils.{m}" for m in LOW_UTILS],
          ["", "predictor", "automatic_mask_generator", "tiled_predictor", "tiled_mask_generator"], ["utils.data"], ["utils"], ["training"], ["tools"]]
# Known violations, each to be removed with the code that causes it; the test fails when one is
# fixed and still listed, so the list only shrinks.
ALLOWED = set()


def layer(module: str) -> int:
    """The layer of the longest name that is module or a package above it (utils.data.x: utils.data)."""
    owners = [(len(name), i) for i, names in enumerate(LAYERS) for name in names
              if module == name or module.startswith(f"{name}.") or not name and not module]
    return max(owners)[1]


def violations(edges=None):
    edges = {} if edges is None else edges
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        here = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = here.split(".")[:-1] if parts[-1] != "__init__" else here.split(".")
        tree = ast.parse(path.read_text())
        local = {id(inner) for outer in ast.walk(tree) if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for inner in ast.walk(outer) if isinstance(inner, ast.ImportFrom)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(a.arg == "cfg" and (a.annotation is None or "TrainConfig" in ast.unparse(a.annotation))
                                                                      for a in node.args.args):
                if layer(here) < layer("training"):
                    yield f"{here}.{node.name} takes the training config"
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("segment_anything")):
                continue
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module.removeprefix("segment_anything").lstrip(".")
            if id(node) in local:
                yield f"{here} imports {target} inside a function"
            for alias in node.names:
                path = PACKAGE.joinpath(*target.split("."), alias.name)
                full = f"{target}.{alias.name}".lstrip(".") if path.with_suffix(".py").exists() or path.is_dir() else target
                edges.setdefault(here, set()).add(full)
                if layer(full) > layer(here):
                    yield f"{here} imports {full} from a higher layer"
                if alias.name.startswith("_") and full == target:
                    yield f"{here} imports private {target}.{alias.name}"


def cycles(edges):
    """Each circle of imports that a depth-first walk meets, as "a -> b -> a" from its smallest name."""
    found, state = set(), {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                ring = path[path.index(target):]
                start = ring.index(min(ring))
                found.add(" -> ".join(ring[start:] + ring[:start] + [min(ring)]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return found


def test_layers():
    edges = {}
    found = set(violations(edges))
    found |= cycles(edges)
    assert not found - ALLOWED, "new layer violations:\n" + "\n".join(sorted(found - ALLOWED))
    assert not ALLOWED - found, "fixed, remove from ALLOWED:\n" + "\n".join(sorted(ALLOWED - found))
