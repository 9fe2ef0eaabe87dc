"""Reading a data set's listing: which clips, captions, images and control videos it names,
before any clip is opened.

A data set is a folder (``data.data_root``) holding clips and a listing of them, in one of three
layouts: ``prompts.txt`` + ``videos.txt`` (+ optional ``images.txt``, + ``control_videos.txt``
with data.control = file), a CSV file, or a JSON list / JSONL file (with a control column / key
with data.control = file). :func:`read_samples` parses the listing into samples and collects every problem
(encoding, control characters, missing columns, count mismatches) without raising; checking the
clips themselves is :mod:`cogvx.data.validation`'s job.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cogvx.config import DataConfig
from cogvx.data.video import file_problem

METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.json")


@dataclass(frozen=True)
class Sample:
    """One training example: a caption, its clip, an optional first-frame image and (data.control
    = file) the control video that steers it; ``*_rel`` are the paths as listed."""

    caption: str
    video: Path
    image: Path | None
    origin: str
    video_rel: str
    image_rel: str | None = None
    control: Path | None = None
    control_rel: str | None = None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data set, located by ``origin`` ("videos.txt:3").

    ``video`` is the clip path as listed when the problem concerns a line that names a clip but
    could not become a sample (e.g. an empty caption), so the skip report can say which clip
    was dropped.
    """

    origin: str
    message: str
    video: str | None = None

    def __str__(self) -> str:
        return f"{self.origin}: {self.message}"



# --------------------------------------------------------------------------- reading listings


class _ListingProblem(Exception):
    """The listing cannot be read (or chosen); :func:`read_samples` reports ``problem`` for it."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _read_listing(path: Path, name: str) -> bytes:
    """The bytes of a listing file; _ListingProblem when it is not a readable regular file.

    It is opened non-blocking and checked with fstat before reading, so a FIFO or a device in
    its place is refused instead of blocking (or streaming forever).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        problem = file_problem(path, what="listing file")
        raise _ListingProblem(Problem(name, problem or f"cannot be read ({err.strerror})")) from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _ListingProblem(Problem(name, file_problem(path, what="listing file")
                                             or "not a regular file"))
        try:
            return handle.read()
        except OSError as err:
            raise _ListingProblem(Problem(name, f"cannot be read ({err.strerror})")) from None


def _listing_status(path: Path) -> str | None:
    """None when ``path`` is a regular file (possibly empty), else why not ("file not found", ...)."""
    problem = file_problem(path, what="listing file")
    return None if problem in (None, "empty file (0 bytes)") else problem


def _decode_lines(path: Path, name: str) -> tuple[list[str], dict[int, Problem]]:
    """The file's lines (1-based index = position + 1) and a problem per line that is not UTF-8.

    Bad lines are still returned, decoded with ``surrogateescape``, so line numbers stay aligned;
    :func:`_is_clean` tells callers to leave those values out. A UTF-8 BOM is dropped and
    trailing empty lines (an editor's final newline) do not count as lines.
    """
    raw = _read_listing(path, name)
    offset = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    raw = raw[offset:]
    lines: list[str] = []
    bad: dict[int, Problem] = {}
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as err:
            byte = chunk[err.start]
            bad[number] = Problem(f"{name}:{number}", f"not valid UTF-8 (byte 0x{byte:02x} at "
                                  f"offset {offset + err.start}); save the file as UTF-8")
            text = chunk.decode("utf-8", errors="surrogateescape")
        lines.append(text.rstrip("\r"))
        offset += len(chunk) + 1
    while lines and not lines[-1]:
        bad.pop(len(lines), None)
        lines.pop()
    return lines, bad


def printable(text: str) -> str:
    """``text`` with undecodable bytes shown as U+FFFD, safe to print and to write as UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _is_clean(*values: str | None) -> bool:
    """False when a value holds undecodable bytes (already reported by :func:`_decode_lines`)."""
    return not any(v is not None and any("\udc80" <= ch <= "\udcff" for ch in v) for v in values)


# T5 reads 226 tokens (~1,000 characters); far longer captions mean a broken listing file.
MAX_CAPTION_CHARS = 10_000
# Control characters a caption may hold: whitespace the tokenizer reads as a space. Any other
# (NUL, ESC, DEL, the C1 range, ...) is a binary or corrupted listing, refused with its position.
ALLOWED_CONTROLS = frozenset("\t\n\r")
_CONTROL_NAMES = {0x00: "NUL", 0x08: "backspace", 0x0B: "vertical tab", 0x0C: "form feed",
                  0x1B: "ESC", 0x7F: "DEL"}


def _control_character(text: str, allowed: frozenset[str] = ALLOWED_CONTROLS) -> str | None:
    """The first control character of ``text`` not in ``allowed``, described with its position."""
    for index, char in enumerate(text, start=1):
        if char not in allowed and unicodedata.category(char) == "Cc":
            name = _CONTROL_NAMES.get(ord(char))
            return f"U+{ord(char):04X}{f' {name}' if name else ''} at character {index}"
    return None


def resolve_path(path: Path) -> Path:
    """``path`` made absolute with symlinks resolved, or only made absolute when resolving fails
    (a symlink loop): the file checks then report the loop for what it is."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(path))


def _control_problem(caption: str, video_rel: str, image_rel: str | None,
                     names: tuple[str, str]) -> tuple[bool, str] | None:
    """(about the caption?, message) when a listed value holds a control character, else None.

    Paths may hold none (os calls refuse a NUL outright); captions may hold tabs and line breaks.
    """
    for value, label in ((video_rel, f"clip path ({names[1]})"), (image_rel, "image path")):
        found = _control_character(value or "", frozenset())
        if found:
            return False, f"{label} contains a control character ({found}); remove it"
    found = _control_character(caption)
    if found:
        return True, (f"caption ({names[0]}) for {video_rel} contains a control character "
                      f"({found}); remove it (tabs and line breaks are allowed)")
    return None


@dataclass(frozen=True)
class _ListedControl:
    """The control video a listing line names (data.control = file), before it is checked.

    ``value`` is the raw value (None when the line, cell or key is missing), ``label`` how
    messages call its field ("control_videos.txt line", "'control' column") and ``origin``
    where it is when that is not the sample's own line ("control_videos.txt:3").
    """

    value: Any
    label: str
    origin: str | None = None


def _control_video_rel(control: _ListedControl, origin: str, video_rel: str,
                       problems: list[Problem]) -> str | None:
    """The control video path as listed, or None with a problem: not a string, empty or missing,
    or holding a control character (an undecodable value was reported when it was read)."""
    where = control.origin or origin
    if control.value is not None and not isinstance(control.value, str):
        problems.append(Problem(where, f"{control.label} for {video_rel} must be a string (a control "
                                f"video path), got {json.dumps(control.value)}", video=video_rel))
        return None
    rel = (control.value or "").strip()
    if not _is_clean(rel):
        return None
    if not rel:
        problems.append(Problem(where, f"no control video for {video_rel} ({control.label} is empty or "
                                "missing); data.control=file needs one control video per clip, or set "
                                "data.control=canny to compute them from the clips", video=video_rel))
        return None
    found = _control_character(rel, frozenset())
    if found:
        problems.append(Problem(where, f"control video path ({control.label}) contains a control "
                                f"character ({found}); remove it", video=video_rel))
        return None
    return rel


def _make_sample(root: Path, caption: Any, video: Any, image: Any, origin: str,
                 names: tuple[str, str], problems: list[Problem],
                 caption_origin: str | None = None,
                 control: _ListedControl | None = None) -> Sample | None:
    """A Sample from raw listing values, or None (with a problem) when one cannot be formed.

    ``names`` are how the caption and the video field are called in messages ("'caption'
    column", "videos.txt line"). Values that are not strings are problems, not crashes.
    ``control`` is given when data.control = file: the sample then needs a control video.
    """
    for value, label in ((caption, names[0]), (video, names[1])):
        if value is not None and not isinstance(value, str):
            problems.append(Problem(origin, f"{label} must be a string, got {json.dumps(value)}"))
            return None
    if image is not None and not isinstance(image, str):
        problems.append(Problem(origin, f"image must be a string or empty, got {json.dumps(image)}"))
        return None
    video_rel = (video or "").strip()
    caption_text = (caption or "").strip()
    image_rel = (image or "").strip() or None
    if not _is_clean(caption_text, video_rel, image_rel):
        return None
    if not video_rel:
        problems.append(Problem(origin, f"empty {names[1]} (no clip path)"))
        return None
    character = _control_problem(caption_text, video_rel, image_rel, names)
    if character:
        about_caption, message = character
        problems.append(Problem((caption_origin or origin) if about_caption else origin, message,
                                video=video_rel))
        return None
    if not caption_text:
        problems.append(Problem(caption_origin or origin, f"empty caption ({names[0]}) for "
                                f"{video_rel}", video=video_rel))
        return None
    if len(caption_text) > MAX_CAPTION_CHARS:
        problems.append(Problem(caption_origin or origin, f"caption ({names[0]}) for {video_rel} is "
                                f"{len(caption_text):,} characters; over {MAX_CAPTION_CHARS:,} is refused "
                                "(T5 reads 226 tokens; a caption this long is a broken listing)", video=video_rel))
        return None
    control_rel = _control_video_rel(control, origin, video_rel, problems) if control is not None else None
    if control is not None and control_rel is None:
        return None
    return Sample(caption=caption_text, video=resolve_path(root / video_rel),
                  image=resolve_path(root / image_rel) if image_rel else None,
                  origin=origin, video_rel=video_rel, image_rel=image_rel,
                  control=resolve_path(root / control_rel) if control_rel else None,
                  control_rel=control_rel)


def _txt_names(data: DataConfig) -> dict[str, str | None]:
    """The txt layout's listing files by role; "control" is None unless data.control = file."""
    return {"prompts": data.prompts_file, "videos": data.videos_file, "images": data.images_file,
            "control": data.control_videos_file if data.control == "file" else None}


def _no_control_listing(data: DataConfig, root: Path) -> Problem:
    """The problem of data.control = file without its control_videos_file."""
    name, videos = data.control_videos_file, data.videos_file
    return Problem(name, f"not found in {root}; data.control=file needs {name} with one control video "
                   f"path per line (relative to data_root), on the same line as its clip in {videos}; "
                   "or set data.control=canny to compute Canny edge controls from the clips")


def _count_problems(names: dict[str, str | None], lines: dict[str, list[str] | None]) -> list[Problem]:
    """Problems of listing files whose line counts do not match videos.txt's."""
    pname, vname, iname, cname = (names[k] for k in ("prompts", "videos", "images", "control"))
    prompts, videos, images, controls = (lines[k] for k in ("prompts", "videos", "images", "control"))
    problems: list[Problem] = []
    if len(prompts) != len(videos):
        problems.append(Problem(vname, f"{pname} has {len(prompts)} lines, {vname} has "
                                f"{len(videos)}; only the first {min(len(prompts), len(videos))} "
                                "pairs are read"))
    if images is not None and len(images) != len(videos):
        problems.append(Problem(iname, f"{iname} has {len(images)} lines, {vname} has "
                                f"{len(videos)}; an empty line means no image for that clip"))
    if controls is not None and len(controls) != len(videos):
        problems.append(Problem(cname, f"{cname} has {len(controls)} lines, {vname} has "
                                f"{len(videos)}; it must list one control video per clip, on the "
                                "clip's line"))
    return problems


def _read_txt(data: DataConfig, root: Path) -> tuple[list[Sample], list[Problem]]:
    """prompts.txt + videos.txt (+ images.txt when present, + control_videos.txt with data.control
    = file), paired line by line."""
    names = _txt_names(data)
    pname, vname = data.prompts_file, data.videos_file
    status = {name: _listing_status(root / name) for name in names.values() if name is not None}
    odd = [Problem(name, reason) for name, reason in status.items()
           if reason and not reason.startswith("file not found")]
    if odd:
        return [], odd
    missing = [n for n in (pname, vname) if status[n]]
    if missing:
        return [], [Problem(" + ".join(missing), f"not found in {root}; a txt data set needs {pname} "
                            f"(one caption per line) and {vname} (one clip path per line), or "
                            f"give a CSV/JSON listing with data.metadata_file")]
    lines: dict[str, list[str] | None] = {}
    bad: dict[str, dict[int, Problem]] = {}
    for role, name in names.items():
        present = name is not None and status[name] is None
        lines[role], bad[role] = _decode_lines(root / name, name) if present else (None, {})
    problems = _count_problems(names, lines)
    control_missing = names["control"] is not None and lines["control"] is None
    if control_missing:
        problems.append(_no_control_listing(data, root))
    samples = _txt_samples(root, names, lines, bad, problems)
    return ([] if control_missing else samples), problems


def _txt_samples(root: Path, names: dict[str, str | None], lines: dict[str, list[str] | None],
                 bad: dict[str, dict[int, Problem]], problems: list[Problem]) -> list[Sample]:
    """The samples of the txt layout's aligned lines; the lines' problems go to ``problems``.

    A line that is not UTF-8 is reported once, with the clip of its line when there is one.
    """
    pname, vname, cname = names["prompts"], names["videos"], names["control"]
    prompts, videos, images, controls = (lines[k] for k in ("prompts", "videos", "images", "control"))
    samples: list[Sample] = []
    for number in range(1, min(len(prompts), len(videos)) + 1):
        video = videos[number - 1]
        image = images[number - 1] if images is not None and number <= len(images) else None
        clip = video.strip() if number not in bad["videos"] else ""
        for found in bad.values():
            if number in found:
                problems.append(replace(found.pop(number), video=clip or None))
        control = None
        if controls is not None:
            value = controls[number - 1] if number <= len(controls) else None
            control = _ListedControl(value, f"{cname} line {number}", f"{cname}:{number}")
        sample = _make_sample(root, prompts[number - 1], video, image, f"{vname}:{number}",
                              (f"{pname} line", f"{vname} line"), problems,
                              caption_origin=f"{pname}:{number}", control=control)
        if sample is not None:
            samples.append(sample)
    problems += [p for found in bad.values() for p in found.values()]
    return samples


def _read_csv(data: DataConfig, root: Path, name: str) -> tuple[list[Sample], list[Problem]]:
    """A CSV file with a header row; columns named by data.caption/video/image_column."""
    lines, bad = _decode_lines(root / name, name)
    problems = list(bad.values())
    reader = csv.reader(io.StringIO("\n".join(lines), newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        if not header or not any(header):
            return [], problems + [Problem(name, "empty file; expected a header row naming the "
                                           f"'{data.caption_column}' and '{data.video_column}' columns")]
        wanted = {"caption": data.caption_column, "video": data.video_column}
        if data.control == "file":
            wanted["control"] = data.control_column
        absent = [f"'{col}' ({role}, data.{role}_column)" for role, col in wanted.items()
                  if col not in header]
        if absent:
            return [], problems + [Problem(f"{name}:1", f"no {' or '.join(absent)} column; the "
                                           f"columns are: {printable(', '.join(header))}")]
        named = (data.caption_column, data.video_column, data.image_column, *wanted.values())
        columns = {col: header.index(col) for col in named if col in header}
        samples: list[Sample] = []
        previous = reader.line_num
        for row in reader:
            start, previous = previous + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            values = {col: row[i] if i < len(row) else None for col, i in columns.items()}
            control = (_ListedControl(values.get(data.control_column), f"'{data.control_column}' column")
                       if data.control == "file" else None)
            sample = _make_sample(root, values[data.caption_column], values[data.video_column],
                                  values.get(data.image_column), f"{name}:{start}",
                                  (f"'{data.caption_column}' column", f"'{data.video_column}' column"),
                                  problems, control=control)
            if sample is not None:
                samples.append(sample)
    except csv.Error as err:
        return [], problems + [Problem(f"{name}:{reader.line_num}", f"not valid CSV: {err}")]
    return samples, problems


def _record_sample(data: DataConfig, root: Path, record: Any, origin: str,
                   problems: list[Problem]) -> Sample | None:
    """A Sample from one JSON object, or None with a problem (not an object, a key missing)."""
    if not isinstance(record, dict):
        problems.append(Problem(origin, f"expected an object with '{data.caption_column}' and "
                                f"'{data.video_column}' keys, got {type(record).__name__}"))
        return None
    absent = [f"'{key}'" for key in (data.caption_column, data.video_column) if key not in record]
    if absent:
        keys = printable(", ".join(map(str, record))) or "none"
        problems.append(Problem(origin, f"no {' or '.join(absent)} key (keys: {keys}); see "
                                "data.caption_column / data.video_column",
                                video=record.get(data.video_column) if isinstance(
                                    record.get(data.video_column), str) else None))
        return None
    control = (_ListedControl(record.get(data.control_column), f"'{data.control_column}' key")
               if data.control == "file" else None)
    return _make_sample(root, record[data.caption_column], record[data.video_column],
                        record.get(data.image_column), origin,
                        (f"'{data.caption_column}'", f"'{data.video_column}'"), problems,
                        control=control)


def _read_jsonl(data: DataConfig, root: Path, name: str) -> tuple[list[Sample], list[Problem]]:
    """One JSON object per line; blank lines are ignored, a malformed line is one problem."""
    lines, bad = _decode_lines(root / name, name)
    samples: list[Sample] = []
    problems: list[Problem] = []
    for number, line in enumerate(lines, start=1):
        if number in bad:
            problems.append(bad[number])
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(f"{name}:{number}", f"not valid JSON: {err.msg} "
                                    f"(column {err.colno})"))
            continue
        sample = _record_sample(data, root, record, f"{name}:{number}", problems)
        if sample is not None:
            samples.append(sample)
    return samples, problems


def _read_json(data: DataConfig, root: Path, name: str) -> tuple[list[Sample], list[Problem]]:
    """A JSON list of objects; a record is located by its index ("metadata.json[2]")."""
    lines, bad = _decode_lines(root / name, name)
    problems = list(bad.values())
    try:
        records = json.loads("\n".join(lines))
    except json.JSONDecodeError as err:
        return [], problems + [Problem(f"{name}:{err.lineno}", f"not valid JSON: {err.msg} "
                                       f"(column {err.colno})")]
    if not isinstance(records, list):
        return [], problems + [Problem(name, f"expected a list of objects, got "
                                       f"{type(records).__name__}; use one object per line "
                                       "in a .jsonl file, or wrap the objects in [...]")]
    samples = [_record_sample(data, root, record, f"{name}[{index}]", problems)
               for index, record in enumerate(records)]
    return [s for s in samples if s is not None], problems


def _listing(data: DataConfig, root: Path) -> tuple[str, str | None]:
    """(format, metadata file name): which layout data.format picks in this data_root."""
    if data.format == "txt":
        return "txt", None
    if data.metadata_file is not None:
        suffix = Path(data.metadata_file).suffix.lower()
        kind = data.format if data.format != "auto" else {
            ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(suffix, "unknown")
        return kind, data.metadata_file
    candidates = {"auto": METADATA_NAMES, "csv": ("metadata.csv",),
                  "json": ("metadata.jsonl", "metadata.json")}[data.format]
    found = [name for name in candidates if _present(root / name)]
    txt = [data.prompts_file, data.videos_file]
    if len(found) > 1 or (found and data.format == "auto" and all(_present(root / n) for n in txt)):
        raise _ListingProblem(_ambiguity(data, root, found, txt if len(found) == 1 else []))
    if found:
        return ("csv" if found[0].endswith(".csv") else "json"), found[0]
    return ("txt", None) if data.format == "auto" else (data.format, candidates[0])


def _present(path: Path) -> bool:
    """Whether something (a file, even an unreadable one, a folder, ...) is at ``path``."""
    return not (file_problem(path, what="listing file") or "").startswith("file not found")


def _ambiguity(data: DataConfig, root: Path, found: list[str], txt: list[str]) -> Problem:
    """The problem of a data_root holding several listings: cogvx does not guess which one counts."""
    listings = found + ([" + ".join(txt)] if txt else [])
    choices = [f"data.metadata_file={name}" for name in found]
    if txt:
        choices = [f"data.format={'csv' if found[0].endswith('.csv') else 'json'} (or {choices[0]}) "
                   f"to use {found[0]}", f"data.format=txt to use {' + '.join(txt)}"]
    return Problem("data.format", f"{data.format} finds {' and '.join(listings)} in {root} and does not guess "
                   f"which one lists the data set; set {', or '.join(choices)}")


def _root_problem(root: Path) -> str | None:
    """Why data_root cannot be used ("does not exist", "is not a folder", ...), or None."""
    try:
        return None if stat.S_ISDIR(os.stat(root).st_mode) else "is not a folder"
    except (OSError, ValueError):
        reason = file_problem(root, what="folder") or "cannot be read"
        return "does not exist" if reason.startswith("file not found") else f"cannot be used: {reason}"


def _read_listing_of_kind(data: DataConfig, root: Path, kind: str,
                          name: str | None) -> tuple[list[Sample], list[Problem]]:
    """Samples and problems of the listing :func:`_listing` chose."""
    if kind == "txt":
        return _read_txt(data, root)
    if kind == "unknown":
        return [], [Problem(str(name), "cannot tell the format from the extension "
                            "(.csv, .json or .jsonl); set data.format to csv or json")]
    status = _listing_status(root / name)
    if status and status.startswith("file not found"):
        return [], [Problem(name, f"not found in {root}; set data.metadata_file to the listing "
                            "file, relative to data_root")]
    if status:
        return [], [Problem(name, status)]
    if kind == "csv":
        return _read_csv(data, root, name)
    reader = _read_jsonl if name.lower().endswith(".jsonl") else _read_json
    return reader(data, root, name)


def read_samples(data: DataConfig) -> tuple[list[Sample], list[Problem]]:
    """Parse the listing of ``data.data_root`` into samples, collecting problems (never raising).

    Samples that cannot be formed (empty caption, undecodable line, missing key) are left out;
    their problems say where they are. A missing data_root or listing file is one problem.
    """
    root = Path(data.data_root).expanduser()
    what = _root_problem(root)
    if what:
        return [], [Problem("data.data_root", f"{root.absolute()} {what}; point data.data_root at "
                            "the folder holding the clips (or run `cogvx data download`)")]
    try:
        kind, name = _listing(data, root)
        samples, problems = _read_listing_of_kind(data, root, kind, name)
    except _ListingProblem as err:
        return [], [err.problem]
    if not samples and not problems:
        problems.append(Problem(name or data.videos_file, "lists no samples"))
    return samples, problems


