"""notebooks/quickstart.ipynb: committed with outputs stripped, and runs top to bottom headless on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "falqon-lit-test"
STRIP_COMMAND = (
    "python -c \"import nbformat as f; p='notebooks/quickstart.ipynb'; nb=f.read(p, 4); "
    "[c.update(outputs=[], execution_count=None) for c in nb.cells if c.cell_type == 'code']; f.write(nb, p)\""
)


def test_notebook_committed_without_outputs() -> None:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell["outputs"] or cell["execution_count"] is not None)
    ]
    assert not dirty, f"{NOTEBOOK.name} cells {dirty} carry outputs; strip them with: {STRIP_COMMAND}"
    assert "widgets" not in nb["metadata"], f"{NOTEBOOK.name} carries widget state; strip it with: {STRIP_COMMAND}"


@pytest.fixture
def kernel_manager(tmp_path: Path):
    """A kernel manager whose kernel is this interpreter (not whatever ``python3`` kernelspec is installed)."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / KERNEL_NAME)  # argv: sys.executable -m ipykernel_launcher
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(kernel_manager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # inherited by the kernel: nothing may be downloaded
    work = tmp_path / "work"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, km=kernel_manager, timeout=600, resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 3  # training curves, quantization statistics, benchmark chart
    run = work / "runs" / "notebook" / "version_0"
    assert {p.name for p in (run / "plots").iterdir()} == {"training_curves.png", "quant_stats.png"}
    assert (run / "metrics.csv").is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (run / "vllm").iterdir()}
