"""The generated documentation pages match what they are generated from."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("tool", ["docs_api.py", "docs_performance.py"])
def test_generated_page_is_current(tool):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_api_page_lists_every_public_name_with_its_arguments():
    import fastalign

    page = (ROOT / "docs" / "api.md").read_text()
    for name in fastalign.__all__:
        assert f"| `{name}` |" in page, name
    assert "temperature: float = 1.0" in page and "loss_type: str = 'ppo'" in page


def test_every_test_the_pages_name_exists():
    """The docs cite tests as evidence (``test_bad_inputs.py::test_a_global_count_tensor``, a bare
    ``test_...`` name, or ``test_cpo_*`` for several): each named test module is in tests/ and each named test
    (pattern) is defined there, or in benchmarks/ (a benchmark script the pages cite for a number)."""
    import re

    files = [*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    sources = "\n".join(p.read_text() for p in files)
    defined = set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", sources, re.M))
    modules = {p.name for p in files}
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        text = page.read_text()
        missing += [f"{page.name}: {m}" for m in set(re.findall(r"\b(test_\w+\.py)\b", text)) if m not in modules]
        for name, star in set(re.findall(r"(?<![\w./])(test_\w+)(\*?)(?![\w.])", text)):
            if not (any(t.startswith(name) for t in defined) if star else name in defined):
                missing.append(f"{page.name}: {name}{star}")
    assert not missing, missing
