"""The README's Python snippets run as written, in order, in one namespace (as a reader pastes them)."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 3
    (tmp_path / "data").symlink_to(ROOT / "data")  # the snippets read data/examples/
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    namespace: dict = {}
    for i, block in enumerate(blocks):
        code = compile(block, f"README.md python block {i + 1}", "exec")
        exec(code, namespace)
    out = namespace["out"]
    assert len(out.images) == 2 and out.attention_maps is not None
    assert os.path.isfile(tmp_path / "my-adapter.safetensors")
