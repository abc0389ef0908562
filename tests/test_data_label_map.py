"""Label maps: TF OD API pbtxt and plain-text forms, and their errors."""

import pytest

from rfcn_tf.data.label_map import LabelMap, parse_pbtxt, read_label_map
from rfcn_tf.data.records import DataError


def test_pbtxt_round_trip_and_lookups(tmp_path):
    labels = LabelMap.from_names(["RBC", "WBC", "it's"])
    path = labels.write(str(tmp_path))
    assert path.endswith("label_map.pbtxt")
    again = read_label_map(path)
    assert again == labels
    assert again.num_classes == 3 and again.names == ["RBC", "WBC", "it's"]
    assert again.id_of(" WBC ") == 2 and again.id_of("wbc") is None
    assert again.name_of(3) == "it's" and again.name_of(4) is None


def test_tf_od_api_style_file_with_gaps_and_display_name():
    text = """
    item {
      name: "/m/01g317"
      id: 1
      display_name: "person"
    }
    item { id: 3 display_name: 'car' }
    """
    labels = parse_pbtxt(text)
    assert labels.ids == [1, 3]
    assert labels.num_classes == 3
    assert labels.names == ["/m/01g317", "", "car"]


def test_pbtxt_comments_are_ignored_outside_quotes():
    text = """
    # item { id: 9 name: 'commented out' }
    item { id: 1 name: 'a#1' }  # a trailing comment
    item {
      id: 2  # id: 5
      name: "b \\"#2\\""
      # name: 'c'
    }
    """
    labels = parse_pbtxt(text)
    assert labels.ids == [1, 2]
    assert labels.names == ["a#1", 'b "#2"']


def test_plain_text_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\n\n dog \n")
    assert read_label_map(str(path)).names == ["cat", "dog"]


@pytest.mark.parametrize("text, message", [
    ("item { id: 1 name: 'a' } item { id: 1 name: 'b' }", "id 1 appears twice"),
    ("item { id: 1 name: 'a' } item { id: 2 name: 'a' }", "used by ids 1 and 2"),
    ("item { id: 0 name: 'background' }", "must be an int >= 1"),
    ("item { name: 'a' }", "needs an id and a name"),
    ("nothing here", "no 'item"),
])
def test_malformed_label_maps_name_the_problem(text, message):
    with pytest.raises(DataError, match=message):
        parse_pbtxt(text)


def test_missing_file():
    with pytest.raises(DataError, match="not found"):
        read_label_map("/nonexistent/label_map.pbtxt")


@pytest.mark.parametrize("suffix, text", [
    (".txt", "RBC\r\nWBC\r\n"),
    (".pbtxt", 'item { id: 1 name: "RBC" }\nitem { id: 2 name: "WBC" }\n'),
])
def test_leading_bom_is_ignored(tmp_path, suffix, text):
    # Windows editors write a UTF-8 BOM; it must not become part of the first name.
    path = tmp_path / f"label_map{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert read_label_map(str(path)).names == ["RBC", "WBC"]


def test_file_that_is_not_text(tmp_path):
    path = tmp_path / "label_map.pbtxt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(DataError, match=f"label map {path} is not UTF-8 text"):
        read_label_map(str(path))
