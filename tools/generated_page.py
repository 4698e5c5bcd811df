"""The command line of a generated documentation page: rewrite it, or with --check fail when it is stale."""
import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(page: pathlib.Path, render, description: str, source: str) -> int:
    """Write ``render()`` to ``page`` (a path under the repository); ``--check``: exit 1 if it differs."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--check", action="store_true", help=f"fail when {page.relative_to(ROOT)} is out of date")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not page.exists() or page.read_text() != text:
            print(f"{page.relative_to(ROOT)} is out of date: run python {source}", file=sys.stderr)
            return 1
        return 0
    page.write_text(text)
    print(f"wrote {page.relative_to(ROOT)}")
    return 0
