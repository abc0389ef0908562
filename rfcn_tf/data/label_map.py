"""Label maps: 1-based class id <-> class name.

Files are read in two forms:
  * TF Object Detection API text protos (`.pbtxt`):
        item { id: 1 name: 'RBC' }   (display_name is read when name is absent)
    `#` starts a comment to the end of the line, outside quoted strings.
  * plain text (`.txt`): one class name per line, the first line is id 1.
Files are written as `.pbtxt`, which the TF OD API can read too.

Ids must be positive and unique, and names unique. Gaps in the ids are allowed
(the TF OD API's COCO map has them); `num_classes` is then the largest id and a
gap id has no name.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List, Optional

from rfcn_tf.data.records import DataError
from rfcn_tf.data.text_files import read_utf8_text

LABEL_MAP_FILENAME = "label_map.pbtxt"

_ITEM_RE = re.compile(r"item\s*\{(.*?)\}", re.S)
# A quoted string (kept) or a comment (dropped).
_STRING_OR_COMMENT_RE = re.compile(r"""("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|#[^\n]*""")
_FIELD_RE = re.compile(r"""(\w+)\s*:\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'|(-?\d+))""")


class LabelMap:
    """An id -> name mapping with ids starting at 1."""

    def __init__(self, id_to_name: Dict[int, str]):
        if not id_to_name:
            raise DataError("a label map needs at least one class")
        seen: Dict[str, int] = {}
        for class_id, name in id_to_name.items():
            if not isinstance(class_id, int) or class_id < 1:
                raise DataError(f"label map id {class_id!r} for {name!r} must be an int >= 1 "
                                "(0 is the background)")
            if not name or not name.strip():
                raise DataError(f"label map id {class_id} has an empty name")
            if name in seen:
                raise DataError(f"label map name {name!r} is used by ids {seen[name]} and {class_id}")
            seen[name] = class_id
        self._id_to_name = dict(sorted(id_to_name.items()))
        self._name_to_id = seen

    @classmethod
    def from_names(cls, names: Iterable[str]) -> "LabelMap":
        """Ids 1..N in the order given."""
        names = [n.strip() for n in names]
        return cls({i + 1: n for i, n in enumerate(names)})

    @property
    def num_classes(self) -> int:
        """The largest id: the number of object classes the model predicts (no background)."""
        return max(self._id_to_name)

    @property
    def ids(self) -> List[int]:
        return list(self._id_to_name)

    @property
    def names(self) -> List[str]:
        """Names in id order; a gap id gets "" so that names[id - 1] is the name of id."""
        return [self._id_to_name.get(i, "") for i in range(1, self.num_classes + 1)]

    def id_of(self, name: str) -> Optional[int]:
        """The id of `name` (surrounding whitespace ignored), or None if unknown."""
        return self._name_to_id.get(name.strip())

    def name_of(self, class_id: int) -> Optional[str]:
        return self._id_to_name.get(int(class_id))

    def to_pbtxt(self) -> str:
        out = []
        for class_id, name in self._id_to_name.items():
            escaped = name.replace("\\", "\\\\").replace("'", "\\'")
            out.append(f"item {{\n  id: {class_id}\n  name: '{escaped}'\n}}\n")
        return "".join(out)

    def write(self, path: str) -> str:
        """Writes the .pbtxt form to `path` (a file, or a directory for label_map.pbtxt)."""
        if os.path.isdir(path):
            path = os.path.join(path, LABEL_MAP_FILENAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_pbtxt())
        return path

    def __eq__(self, other) -> bool:
        return isinstance(other, LabelMap) and self._id_to_name == other._id_to_name

    def __repr__(self) -> str:
        return f"LabelMap({self._id_to_name})"


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def parse_pbtxt(text: str, source: str = "<string>") -> LabelMap:
    """Parses TF OD API label map text; raises DataError naming `source` on malformed items."""
    id_to_name: Dict[int, str] = {}
    text = _STRING_OR_COMMENT_RE.sub(lambda m: m.group(1) or "", text)
    items = _ITEM_RE.findall(text)
    if not items:
        raise DataError(f"label map {source} has no 'item {{ id: ... name: ... }}' entries")
    for body in items:
        fields: Dict[str, str] = {}
        for key, dq, sq, num in _FIELD_RE.findall(body):
            fields.setdefault(key, num if num else _unescape(dq or sq))
        name = fields.get("name") or fields.get("display_name")
        if "id" not in fields or not name:
            raise DataError(f"label map {source}: item {{{body.strip()}}} needs an id and a name")
        class_id = int(fields["id"])
        if class_id in id_to_name:
            raise DataError(f"label map {source}: id {class_id} appears twice")
        id_to_name[class_id] = name
    return LabelMap(id_to_name)


def read_label_map(path: str) -> LabelMap:
    """Reads a .pbtxt label map, or a .txt with one name per line (blank lines ignored),
    as UTF-8 (a leading BOM is ignored).

    Raises DataError naming the file when it is missing, not UTF-8 text, or malformed.
    """
    if not os.path.isfile(path):
        raise DataError(f"label map file not found: {path}")
    text = read_utf8_text(path, "label map")
    if path.endswith(".txt"):
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise DataError(f"label map {path} is empty")
        return LabelMap.from_names(names)
    return parse_pbtxt(text, source=path)
