"""The layering of ARCHITECTURE.md, checked on the imports: calls go down only.

public API (fastalign/*.py, fastalign/advantages/) -> ops (fastalign/ops/) -> kernels
(fastalign/kernels/). The float64 reference stands apart; the integrations call the public API.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fastalign_imports(path: pathlib.Path):
    """Every ``fastalign...`` module a file imports (at any depth: lazy imports count too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "fastalign" else [f"fastalign.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        yield from (n for n in names if n == "fastalign" or n.startswith("fastalign."))


def _inside(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


PUBLIC = sorted([p for p in (ROOT / "fastalign").glob("*.py") if p.name != "__init__.py"]
                + list((ROOT / "fastalign" / "advantages").glob("*.py")))

# layer: (its files, the fastalign modules it may import)
LAYERS = {
    "kernels": (sorted((ROOT / "fastalign" / "kernels").glob("*.py")), ("fastalign.kernels",)),
    "ops": (sorted((ROOT / "fastalign" / "ops").glob("*.py")), ("fastalign.ops", "fastalign.kernels",
                                                                 "fastalign._backend")),
    "reference": (sorted((ROOT / "fastalign" / "reference").glob("*.py")), ("fastalign.reference",)),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_a_layer_imports_only_the_ones_below(layer):
    files, allowed = LAYERS[layer]
    assert files
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in files for m in _fastalign_imports(p) if not _inside(m, allowed)}
    assert not bad, f"{layer} imports from above its layer: {sorted(bad)}"


def test_the_public_api_goes_through_the_ops():
    """No public module reaches a kernel, the reference, an integration or the bench directly."""
    above_or_apart = ("fastalign.kernels", "fastalign.reference", "fastalign.integrations", "fastalign.bench")
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in PUBLIC for m in _fastalign_imports(p) if _inside(m, above_or_apart)}
    assert not bad, sorted(bad)


def test_integrations_use_the_public_api():
    """Integrations are users of the library: no ops or kernels (the public functions choose those)."""
    files = sorted((ROOT / "fastalign" / "integrations").rglob("*.py"))
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in files for m in _fastalign_imports(p)
           if _inside(m, ("fastalign.ops", "fastalign.kernels", "fastalign._backend"))}
    assert not bad, sorted(bad)
