"""README.md and docs/*.md as a user meets them.

- Every ```python block runs as pasted into a fresh interpreter: its own namespace, run from an
  empty directory. A block whose first line is the comment ``# continues the previous block`` runs
  joined to the block before it (which the reader is told to run first).
- Every ```bash block runs too, from an empty directory with ``tmt-pyg`` and ``python`` on the PATH, so
  it must be cheap; long jobs (training for minutes, the test suite) are fenced as ```shell, which
  renders the same and is not run.
- Every link is a public https URL or a file of the repository (with its #anchor, for markdown
  pages); no text points at a path outside the repository.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONTINUES = "# continues the previous block"


def fenced(page: Path, language: str) -> list:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def python_snippets(page: Path) -> list:
    """Each snippet as a user runs it: a block, or a block joined to those it continues."""
    snippets = []
    for block in fenced(page, "python"):
        if block.startswith(CONTINUES):
            assert snippets, f"{page.name}: the first block cannot continue a previous one"
            snippets[-1] = snippets[-1] + block
        else:
            snippets.append(block)
    return snippets


def cases(language: str) -> list:
    getter = python_snippets if language == "python" else lambda page: fenced(page, "bash")
    return [pytest.param(page, i, snippet, id=f"{page.name}-{i}") for page in PAGES for i, snippet in enumerate(getter(page))]


def test_readme_has_runnable_examples():
    assert len(python_snippets(ROOT / "README.md")) >= 3
    first_code = next(i for i, line in enumerate((ROOT / "README.md").read_text().splitlines()) if line == "```python")
    assert first_code < 40, f"the README's first Python example starts at line {first_code + 1}"


@pytest.mark.parametrize("page,index,snippet", cases("python"))
def test_python_snippet_runs_as_pasted(page, index, snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a snippet may write files (save_pretrained): into an empty folder
    exec(compile(snippet, f"{page.name} python block {index}", "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("page,index,snippet", cases("bash"))
def test_bash_snippet_runs(page, index, snippet, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", snippet], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"{page.name} bash block {index} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"


def anchors(page: Path) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_stay_in_the_repository_or_are_public(page):
    text = page.read_text()
    bad = []
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if link.startswith("https://"):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if "://" in link or ROOT not in [target, *target.parents] or not target.exists():
            bad.append(link)
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            bad.append(link)
    assert not bad, f"{page.name}: links outside the repository, missing files or anchors: {bad}"
    assert "../shared" not in text and "/work/" not in text, f"{page.name} names a path outside the repository"
