"""Reading the text files of a dataset (split files, label maps, COCO JSON) as UTF-8."""

from rfcn_tf.data.records import DataError


def read_utf8_text(path: str, what: str) -> str:
    """The text of the file `path`, decoded as UTF-8 with a leading BOM dropped.

    Raises DataError "<what> <path> is not UTF-8 text: <reason> at byte <offset> (line
    <n>)" naming the first undecodable byte (offset from the start of the file, 0-based;
    line 1-based). OSError from opening or reading the file propagates.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start + len(data) - len(e.object)  # e.object lacks a BOM
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(f"{what} {path} is not UTF-8 text: {e.reason} at byte {offset} "
                        f"(line {line})") from None
