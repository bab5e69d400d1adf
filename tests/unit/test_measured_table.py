"""The README's "Measured" table is generated from the stored results
(scripts/measured_table.py): a figure edited by hand, or a result file changed without
regenerating (`python scripts/measured_table.py --write`), fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def measured_table() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "measured_table", ROOT / "scripts" / "measured_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_table_is_the_one_generated_from_docs_results(
    measured_table: ModuleType,
) -> None:
    readme = (ROOT / "README.md").read_text()
    assert measured_table.table(readme) == measured_table.render(), (
        "README.md's Measured table differs: python scripts/measured_table.py --check"
    )


def test_every_file_the_rows_read_is_stored_under_docs_results(
    measured_table: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    names: list[str] = []
    read = measured_table.read

    def recording(name: str) -> str:
        names.append(name)
        return str(read(name))

    monkeypatch.setattr(measured_table, "read", recording)
    missing = []
    for row in measured_table.ROWS:
        for cell in (row.h200, row.cpu):
            try:
                cell()
            except FileNotFoundError as error:
                missing.append(f"{row.label}: {error.filename}")
    assert missing == []
    results = ROOT / "docs" / "results"
    assert names, "no row reads a stored result"
    assert [n for n in sorted(set(names)) if not (results / n).is_file()] == []
