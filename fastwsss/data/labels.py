"""Image-level labels from a file, for images without masks: a CSV (an image, then its classes by name or index) or
the reference repositories' ``cls_labels_onehot.npy`` (a dict: image name -> multi-hot over the foreground classes).

The CSV's cells after the image: one class per cell (``a.jpg,cat,traffic light``: a cell that is a class name, spaces
and all, is that class), or several in one cell separated by spaces (``a.jpg,cat dog``), where a name with spaces is
in double quotes (the cell ``cat "traffic light"``; Python's csv writer and spreadsheets write it quoted, with the
inner quotes doubled). The delimiter is ``,``, ``;`` or a tab, whichever splits the file's rows (the error names the
one read); a UTF-8 byte-order mark is skipped; a header row and ``#`` comment lines are skipped.

A bad file is one error that lists every offending row with its line number: an unknown class, a listed image that
is missing, a duplicate, an image with no foreground class, a malformed row.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
_HEADER = {"image", "name", "file", "path", "filename"}
DELIMITERS = (",", "\t", ";")  # in order of preference when several split the rows as well
_CLASS_TOKEN = re.compile(r'"([^"]*)"|(\S+)')  # a double-quoted name (spaces allowed), or a run of non-spaces


class LabelFileError(ValueError):
    pass


def read_class_names(path: str | Path, num_classes: int | None = None) -> list[str]:
    """A class-names file (one per line; ``#`` comments) -> [background, class 1, ...]. The background line may be
    given or left out; ``num_classes`` (background included) is checked when given."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"class names file not found: {path}")
    names = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names or names[0].lower() not in ("background", "bg", "_background_"):
        names = ["background", *names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LabelFileError(f"{path}: class names listed twice: {', '.join(dup)}")
    if num_classes is not None and len(names) != num_classes:
        raise LabelFileError(f"{path} names {len(names) - 1} foreground classes (+ background = {len(names)}), "
                             f"data.num_classes is {num_classes}")
    return names


def _delimiter(text: str) -> str:
    """The delimiter of DELIMITERS that gives the most data rows (not comments or blank) an image and a class cell."""
    def split_rows(d: str) -> int:
        rows = csv.reader(io.StringIO(text), delimiter=d)
        return sum(len(r) >= 2 and bool(r[0].strip()) and not r[0].lstrip().startswith("#") for r in rows)

    counts = [split_rows(d) for d in DELIMITERS]
    return DELIMITERS[counts.index(max(counts))]


def _cell_classes(cell: str, names: set[str]) -> list[str]:
    """The classes of one cell: the whole cell if it is a class name (spaces and all), else its space-separated
    tokens, a double-quoted token being one name with its spaces."""
    cell = " ".join(cell.split())
    if not cell or cell in names:
        return [cell] if cell else []
    return [quoted or plain for quoted, plain in _CLASS_TOKEN.findall(cell)]


def _resolve_image(root: Path | None, entry: str) -> Path | None:
    """The image file an entry names (a path relative to ``root``, or absolute; the suffix may be left out)."""
    path = Path(entry) if Path(entry).is_absolute() or root is None else root / entry
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return path if path.is_file() else None
    for suffix in IMAGE_SUFFIXES:
        for candidate in (path.with_name(path.name + suffix), path.with_name(path.name + suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def read_label_file(path: str | Path, class_names: list[str], images: Path | None = None
                    ) -> tuple[list[str], np.ndarray, dict[str, Path]]:
    """A label file -> (image names, multi-hot [N, C-1] bool, name -> image file where ``images`` is given).

    CSV rows: ``image, class, class, ...`` (a header row and ``#`` comments are skipped; the cell syntax, delimiter
    and byte-order mark: the module docstring); an image is a path relative to ``images`` (or absolute, or a bare
    name; the suffix may be left out) and its name is that path without the suffix; a class is a name of
    ``class_names`` or its index (1 .. C-1; 0 is the background).
    ``.npy``: the reference's dict name -> multi-hot [C-1] (``np.load(..., allow_pickle=True).item()``).
    With ``images``, every listed image must exist there."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"label file not found: {path}")
    C = len(class_names)
    index = {" ".join(n.split()): i for i, n in enumerate(class_names)}
    rows: list[tuple[str, str, list[int]]] = []  # (where, image entry, class indices)
    problems: list[str] = []
    read_as = ""  # how a CSV was read, said with its problems
    if path.suffix == ".npy":
        try:
            table = np.load(path, allow_pickle=True).item()
        except Exception as err:  # noqa: BLE001 - numpy raises several types for a bad file
            raise LabelFileError(f"{path}: not a dict of image name -> multi-hot saved by numpy: {err}") from None
        if not isinstance(table, dict):
            raise LabelFileError(f"{path}: holds a {type(table).__name__}, not a dict of image name -> multi-hot")
        for name, onehot in table.items():
            v = np.asarray(onehot)
            if v.shape != (C - 1,) or not np.isin(v, (0, 1)).all():
                problems.append(f"entry {name!r}: multi-hot of shape {v.shape} with values {np.unique(v)[:5]}, "
                                f"expected 0/1 over the {C - 1} foreground classes")
                continue
            rows.append((f"entry {name!r}", str(name), [int(i) + 1 for i in np.nonzero(v)[0]]))
    else:
        try:
            with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark is not the header's
                text = f.read()
        except UnicodeDecodeError as err:
            raise LabelFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        delimiter = _delimiter(text)
        read_as = f" (read as {'tab' if delimiter == chr(9) else repr(delimiter)}-separated)"
        spaced = [n for n in class_names if " " in n]
        for line_no, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if line_no == 1 and cells[0].lower() in _HEADER:
                continue
            where = f"line {line_no}"
            if not cells[0]:
                problems.append(f"{where}: no image in the first column: {delimiter.join(row)!r}")
                continue
            classes = [c for cell in cells[1:] for c in _cell_classes(cell, set(index))]
            found, unknown = [], []
            for c in classes:
                if c in index:
                    found.append(index[c])
                elif c.isdigit() and 0 <= int(c) < C:
                    found.append(int(c))
                else:
                    unknown.append(c)
            if unknown:
                hint = (f"; a name with spaces ({spaced[0]!r}) is a cell of its own or in double quotes"
                        if spaced and any(" " in n and set(n.split()) & set(unknown) for n in spaced) else "")
                problems.append(f"{where}: unknown class(es) {', '.join(unknown)} (the classes are "
                                f"{', '.join(class_names[1:])}, or their indices 1..{C - 1}{hint})")
                continue
            rows.append((where, cells[0], found))
    names, labels, files, seen = [], [], {}, {}
    for where, entry, found in rows:
        name = Path(entry).with_suffix("").as_posix() if Path(entry).suffix.lower() in IMAGE_SUFFIXES else entry
        if name in seen:
            problems.append(f"{where}: image {entry} is listed again (first at {seen[name]})")
            continue
        seen[name] = where
        if not [c for c in found if c > 0]:
            problems.append(f"{where}: image {entry} has no foreground class (weak supervision needs at least one)")
            continue
        if images is not None:
            file = _resolve_image(images, entry)
            if file is None:
                problems.append(f"{where}: image {entry} not found under {images}")
                continue
            files[name] = file
        onehot = np.zeros(C - 1, dtype=bool)
        onehot[[c - 1 for c in found if c > 0]] = True
        names.append(name)
        labels.append(onehot)
    if problems:
        more = f"\n  (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise LabelFileError(f"{path}: {len(problems)} bad row(s){read_as}:\n  " + "\n  ".join(problems[:20]) + more)
    if not names:
        raise LabelFileError(f"{path} lists no image")
    return names, np.stack(labels), files
