"""Read report texts: a CSV with `findings`/`impression` columns, or a folder of `report.txt` files.

A phantom folder or a prepared cache has both (a manifest.csv and one report.txt per subject); a folder
is read through its report.txt files, found recursively in sorted order.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from medsyn.errors import DataError

REPORT_FILE = "report.txt"
TEXT_COLUMNS = ("findings", "impression")
# section headings of report.txt files ("FINDINGS:", "Impression:"), not part of the report's wording
_HEADING = re.compile(r"^\s*(findings|impression)\s*:", re.IGNORECASE | re.MULTILINE)


def read_corpus(source: str | os.PathLike) -> list[str]:
    """One text per report (Findings, then Impression, as paragraphs) from a CSV file or a folder."""
    path = Path(source)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return _read_csv(path)
    raise DataError(f"--reports {path}: no such file or folder; expected a CSV with findings/impression "
                    f"columns or a folder of {REPORT_FILE} files")  # fmt: skip


def _read_csv(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = [c for c in TEXT_COLUMNS if c in (reader.fieldnames or [])]
            if not columns:
                raise DataError(f"{path}: no findings or impression column (columns: "
                                f"{', '.join(reader.fieldnames or []) or 'none'})")  # fmt: skip
            texts = ["\n\n".join((row.get(c) or "").strip() for c in columns) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the reports ({err}); expected a UTF-8 CSV") from err
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{path}: no report text in the findings/impression columns")
    return texts


def _read_folder(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob(REPORT_FILE) if p.is_file())
    if not files:
        raise DataError(f"{path}: no {REPORT_FILE} files in the folder or below it; expected a folder of "
                        f"reports or a CSV with findings/impression columns")  # fmt: skip
    texts = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{file}: cannot read the report ({err})") from err
        text = _HEADING.sub("\n\n", text).strip()
        if text:
            texts.append(text)
    if not texts:
        raise DataError(f"{path}: every {REPORT_FILE} is empty")
    return texts
