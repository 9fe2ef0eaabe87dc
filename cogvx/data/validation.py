"""Validating a training data set, before any model is loaded.

:func:`validate_dataset` reads the listing (:mod:`cogvx.data.listing`) and checks every clip
(inside data_root, present, non-empty, decodable, long enough) and every control video (the same,
plus one frame per clip frame and the clip's aspect ratio), collecting *all* problems at once, so a user fixes a broken data set in one pass instead of one crash per bad clip, minutes
into a run. :func:`apply_policy` then stops with the full report, or (``data.skip_invalid``)
drops the bad samples and writes a JSON report of what was dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogvx.config import Config, DataConfig
from cogvx.data.listing import Problem, Sample, printable, read_samples, resolve_path
from cogvx.data.video import VideoError, VideoInfo, file_problem, probe_video, usable_frame_count
from cogvx.errors import CogvxError
from cogvx.io import atomic_write_text


class DataValidationError(CogvxError):
    """The data set has problems (and data.skip_invalid is off, or nothing valid is left)."""

    exit_code = 4



@dataclass
class ValidationReport:
    """Everything :func:`validate_dataset` found: the samples, their problems, the probe results."""

    root: Path
    samples: list[Sample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    valid: list[Sample] = field(default_factory=list)
    invalid: dict[int, list[Problem]] = field(default_factory=dict)
    infos: dict[Path, VideoInfo] = field(default_factory=dict)

    @property
    def general_problems(self) -> list[Problem]:
        """Problems not tied to a formed sample (parse errors, count mismatches, ...)."""
        attached = {id(p) for problems in self.invalid.values() for p in problems}
        return [p for p in self.problems if id(p) not in attached]

    def rejected_lines(self) -> dict[str, list[Problem]]:
        """Listing lines that name a clip but could not become a sample, by origin."""
        lines: dict[str, list[Problem]] = {}
        for problem in self.general_problems:
            if problem.video is not None:
                lines.setdefault(problem.origin, []).append(problem)
        return lines

    @property
    def listed(self) -> int:
        """How many samples the listing names: those formed plus the lines rejected."""
        return len(self.samples) + len(self.rejected_lines())

    def format(self) -> str:
        """Human report: a header saying how much of the data set is affected, then one line per
        problem. The header reads naturally at the extremes: no sample read, every sample bad."""
        rejected = len(self.rejected_lines())
        affected, total = len(self.invalid) + rejected, self.listed
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        if total == 0:
            scope = "; no sample could be read"
        elif affected == total:
            scope = f" ({'its only sample' if total == 1 else f'all {total} samples'} affected)"
        else:
            scope = f" ({affected} of {total} samples affected)"
        lines = [f"{count} {noun} in data set {self.root}{scope}:"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)



# --------------------------------------------------------------------------- validation


def _path_problem(root: Path, rel: str, resolved: Path, what: str) -> str | None:
    """Why a listed path is not allowed (outside data_root), or None when it is fine."""
    written = Path(rel)
    if written.is_absolute():
        return f"{what} path is absolute; list it relative to data_root ({root})"
    if ".." in written.parts:
        return f"{what} path contains '..'; paths must stay inside data_root ({root})"
    if not resolved.is_relative_to(root):
        return f"{what} resolves outside data_root (through a symlink, to {resolved})"
    return None


def _separator_hint(rel: str, problem: str) -> str:
    """A hint to use '/' when a path that was not found is written with backslashes."""
    if "\\" in rel and problem.startswith(("file not found", "not found")):
        return " (the path contains '\\': use '/' as the path separator)"
    return ""


def _video_problem(sample: Sample, data: DataConfig, min_frames: int, probe: bool,
                   infos: dict[Path, VideoInfo], model_fps: int | None = None) -> str | None:
    """Why the sample's clip cannot be trained on (missing, not a regular file, empty, corrupt,
    short), or None. Only a regular file is ever opened (see :func:`file_problem`)."""
    path, root = sample.video, Path(data.data_root).expanduser()
    problem = file_problem(root / sample.video_rel, root)  # as written: names broken links, missing folders
    if problem:
        return problem + _separator_hint(sample.video_rel, problem)
    if not probe:
        return None
    try:
        info = probe_video(path)
    except VideoError as err:
        message = str(err)
        return message.removeprefix(f"{path}: ") or "not a readable video"
    short = _too_short(info, data, min_frames, model_fps)
    if short:
        return short
    infos[path] = info
    return None


def _too_short(info: VideoInfo, data: DataConfig, min_frames: int, model_fps: int | None) -> str | None:
    """Why a video has too few usable frames after data.skip_frames_* and sampling at data.fps
    (``model_fps`` when that is null), or None when it has ``min_frames`` or more."""
    fps = data.sample_fps(model_fps)
    usable = usable_frame_count(info, fps, data.skip_frames_start, data.skip_frames_end)
    if usable >= min_frames:
        return None
    detail = f"{info.frames} frames at {info.fps:g} fps"
    if data.skip_frames_start or data.skip_frames_end:
        detail += f", less {data.skip_frames_start} skipped at the start and " \
                  f"{data.skip_frames_end} at the end"
    if fps:
        detail += f", sampled at {fps} fps"
    return f"too short: {usable} usable frames, needs {min_frames} ({detail})"


def _image_problem(root: Path, sample: Sample) -> str | None:
    """Why the sample's first-frame image cannot be used, or None (also when there is none)."""
    if sample.image is None:
        return None
    rel = sample.image_rel or str(sample.image)
    escape = _path_problem(root, rel, sample.image, "image")
    if escape:
        return f"image {rel}: {escape.removeprefix('image ')}"
    problem = file_problem(sample.image, root, what="image file")
    if problem:
        return f"image {rel}: {problem}{_separator_hint(rel, problem)}"
    return None


# A control video is read frame for frame with its clip: rates may differ by rounding only (a
# decoder reports 29.97 for 30000/1001), aspect ratios by encoders' even-size rounding.
CONTROL_FPS_TOLERANCE = 0.01  # relative
CONTROL_ASPECT_TOLERANCE = 0.01  # relative


def _control_mismatches(control: VideoInfo, clip: VideoInfo) -> list[str]:
    """How a control video does not match its clip frame for frame (count, rate, aspect ratio)."""
    found = []
    if control.frames != clip.frames:
        found.append(f"{control.frames} frames, its clip has {clip.frames}; a control video must have "
                     "one frame per clip frame")
    if abs(control.fps - clip.fps) > CONTROL_FPS_TOLERANCE * clip.fps:
        found.append(f"{control.fps:g} fps, its clip has {clip.fps:g} fps; a control video must have "
                     "its clip's frame rate")
    control_aspect, clip_aspect = control.width / control.height, clip.width / clip.height
    if abs(control_aspect - clip_aspect) > CONTROL_ASPECT_TOLERANCE * clip_aspect:
        found.append(f"{control.width}x{control.height} (aspect ratio {control_aspect:.3f}), its clip is "
                     f"{clip.width}x{clip.height} ({clip_aspect:.3f}); a control video must have its "
                     "clip's aspect ratio (any size; it is resized with the clip)")
    return found


def _control_problems(root: Path, sample: Sample, data: DataConfig, min_frames: int, probe: bool,
                      infos: dict[Path, VideoInfo], model_fps: int | None = None) -> list[str]:
    """Every reason the sample's control video cannot be used ([] when it has none).

    It is checked like a clip (inside data_root, a non-empty regular file, decodable, long
    enough) and, when the clip was probed too, against it (see :func:`_control_mismatches`).
    Its probe result goes into ``infos`` beside the clips', so later stages need not probe again.
    """
    if sample.control is None:
        return []
    rel = sample.control_rel or str(sample.control)
    prefix = f"control video {rel}: "
    escape = _path_problem(root, rel, sample.control, "control video")
    if escape:
        return [prefix + escape.removeprefix("control video ")]
    problem = file_problem(root / rel, root)  # as written: names broken links, missing folders
    if problem:
        return [prefix + problem + _separator_hint(rel, problem)]
    if not probe:
        return []
    try:
        info = probe_video(sample.control)
    except VideoError as err:
        return [prefix + (str(err).removeprefix(f"{sample.control}: ") or "not a readable video")]
    infos[sample.control] = info
    short = _too_short(info, data, min_frames, model_fps)
    reasons = [prefix + short] if short else []
    clip = infos.get(sample.video)
    if clip is not None:
        reasons += [prefix + mismatch for mismatch in _control_mismatches(info, clip)]
    return reasons


def _sample_problems(root: Path, sample: Sample, data: DataConfig, min_frames: int, probe: bool,
                     seen: dict[Path, str], infos: dict[Path, VideoInfo],
                     model_fps: int | None = None) -> list[str]:
    """Every reason (message without the clip prefix) the sample is unusable."""
    reasons: list[str] = []
    escape = _path_problem(root, sample.video_rel, sample.video, "clip")
    if escape:
        reasons.append(escape)
    elif sample.video in seen:
        reasons.append(f"listed twice (first at {seen[sample.video]})")
    else:
        seen[sample.video] = sample.origin
        video = _video_problem(sample, data, min_frames, probe, infos, model_fps)
        if video:
            reasons.append(video)
    image = _image_problem(root, sample)
    if image:
        reasons.append(image)
    reasons += _control_problems(root, sample, data, min_frames, probe, infos, model_fps)
    return reasons


def validate_dataset(data: DataConfig, min_frames: int, probe: bool = True,
                     model_fps: int | None = None) -> ValidationReport:
    """Read the data set and check every sample; all problems are collected, none raised.

    ``probe`` decodes each clip's header (decord) to catch corrupt files and clips shorter than
    ``min_frames`` after data.skip_frames_* and sampling at data.fps (``model_fps``, the model's
    rate, when data.fps is null: pass ``config.spec.fps``); control videos (data.control = file)
    are probed too and compared with their clips. The results are kept in ``report.infos``
    (keyed by the resolved path) so later stages need not probe again.
    """
    root = resolve_path(Path(data.data_root).expanduser())
    samples, problems = read_samples(data)
    report = ValidationReport(root=root, samples=samples, problems=list(problems))
    seen: dict[Path, str] = {}
    for index, sample in enumerate(samples):
        reasons = _sample_problems(root, sample, data, min_frames, probe, seen, report.infos, model_fps)
        if reasons:
            found = [Problem(sample.origin, f"{sample.video_rel}: {r}", video=sample.video_rel)
                     for r in reasons]
            report.invalid[index] = found
            report.problems += found
        else:
            report.valid.append(sample)
    return report


# --------------------------------------------------------------------------- policy


def _reason(problem: Problem) -> str:
    """A problem's message without the leading clip path (the report names the clip already)."""
    if problem.video and problem.message.startswith(f"{problem.video}: "):
        return problem.message[len(problem.video) + 2:]
    return problem.message


def skip_report(report: ValidationReport) -> dict[str, Any]:
    """The JSON-ready record of what data.skip_invalid dropped and why."""
    dropped = [{"origin": report.samples[i].origin, "video": report.samples[i].video_rel,
                "reasons": [_reason(p) for p in problems]}
               for i, problems in sorted(report.invalid.items())]
    dropped += [{"origin": origin, "video": problems[0].video,
                 "reasons": [_reason(p) for p in problems]}
                for origin, problems in report.rejected_lines().items()]
    general = [str(p) for p in report.general_problems if p.video is None]
    return {"dropped": dropped, "kept": len(report.valid), "problems_without_sample": general}


def apply_policy(report: ValidationReport, skip_invalid: bool,
                 report_path: Path | None = None) -> list[Sample]:
    """The samples to train on: all of them, or (skip_invalid) the valid ones, or an error.

    Without skip_invalid any problem stops the run with the full report. With it, the dropped
    samples and the problems without a sample are written as JSON to ``report_path`` and the
    valid samples go on; nothing valid left is still an error.
    """
    if not report.problems:
        return list(report.valid)
    if not skip_invalid:
        raise DataValidationError(f"{report.format()}\n{_advice(report)}")
    where = ""
    if report_path is not None:
        text = json.dumps(skip_report(report), indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(report_path, printable(text))
        where = f" (report: {report_path})"
    if not report.valid:
        left = "No valid sample is left" if report.listed else "No sample could be read, so none is left"
        raise DataValidationError(f"{report.format()}\n{left} to train on with "
                                  f"data.skip_invalid=true{where}; fix the data set.")
    return list(report.valid)


def _advice(report: ValidationReport) -> str:
    """What to do about a report with problems: fix them, or skip the bad samples when some are good."""
    if report.valid:
        count = len(report.valid)
        return (f"Fix the listed problems, or set data.skip_invalid=true to drop the affected samples "
                f"and train on the {count} valid {'one' if count == 1 else 'ones'}.")
    if not report.listed:
        return "Fix the listed problems: no sample could be read."
    return "Fix the listed problems: no sample is usable (data.skip_invalid=true would leave nothing)."


DROPPED_REPORT = "dropped.json"


def dropped_report_path(config: Config) -> Path:
    """Where the samples data.skip_invalid drops are listed: prepare.output_dir/dropped.json, beside
    the latents made without them (validation, prepare and the flow all write it there)."""
    return Path(config.prepare.output_dir) / DROPPED_REPORT


def validated_samples(config: Config, report_path: Path | None) -> tuple[ValidationReport, list[Sample]]:
    """Validate the configured data set at the run's shortest bucket and sampling rate, then apply
    data.skip_invalid (the report written to ``report_path``; None writes none, e.g. on the
    processes of a launch other than the main one)."""
    report = validate_dataset(config.data, min_frames=min(bucket.frames for bucket in config.buckets),
                              model_fps=config.spec.fps)
    return report, apply_policy(report, config.data.skip_invalid, report_path)
