"""Notebooks run top to bottom against a real feature workspace, so they cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from recsys.config import Settings

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def test_training_frame_notebook(feature_ws: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the kernel inherits this environment, exactly as a data scientist's shell would set it
    monkeypatch.setenv("RECSYS_HOME", str(feature_ws.home))
    monkeypatch.setenv("RECSYS_DATA_DIR", str(feature_ws.data_path))
    monkeypatch.setenv("RECSYS_DATASET", feature_ws.dataset)
    monkeypatch.setenv("RECSYS_FEAST_PROJECT", feature_ws.feast_project)
    monkeypatch.setenv("REDIS_URL", feature_ws.effective_redis_url)
    notebook = nbformat.read(NOTEBOOKS / "training_frame.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "no feature value comes from after its label" in outputs
    assert "labels" in outputs and "positive" in outputs
