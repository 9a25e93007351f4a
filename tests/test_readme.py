"""Every python block of the README runs as written (in order, sharing one namespace)."""
import re
from pathlib import Path


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # save_pretrained writes here
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].logits.shape == (2, 64, 1000)
