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
