"""The README and the docs pages: every python block runs as written (each page in order, sharing one
namespace), and every relative link into the repository points at a file that exists."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def run_blocks(page: Path) -> dict:
    namespace = {}
    for block in python_blocks(page):
        exec(compile(block, str(page.relative_to(ROOT)), "exec"), namespace)
    return namespace


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    assert len(python_blocks(ROOT / "README.md")) >= 4
    monkeypatch.chdir(tmp_path)  # save_pretrained writes here
    assert run_blocks(ROOT / "README.md")["out"].logits.shape == (2, 64, 1000)


@pytest.mark.parametrize("page", [p for p in PAGES[1:] if python_blocks(p)], ids=lambda p: p.name)
def test_docs_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_blocks(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    links = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", page.read_text())
    targets = [(link, (page.parent / link).resolve()) for link in links if "://" not in link]
    missing = [link for link, target in targets if ROOT in target.parents and not target.exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"
