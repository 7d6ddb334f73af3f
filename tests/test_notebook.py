"""The seed's notebook runs: examples/encrypted-mnist.ipynb executes top to bottom against
services it starts on loopback, and is committed without outputs."""
from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "encrypted-mnist.ipynb"


def test_notebook_is_committed_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "strip outputs before committing"


@pytest.mark.slow
def test_notebook_runs_end_to_end_and_predicts_like_the_plaintext_model(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for name in ("ENCINFER_INFERENCE", "ENCINFER_KEYSTORE", "ENCINFER_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ENCINFER_NOTEBOOK_IMAGES", "10")
    monkeypatch.setenv("ENCINFER_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("MPLBACKEND", "agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "agreement with the plaintext model: 1.000" in text, text
    assert "done" in text
