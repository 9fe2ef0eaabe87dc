"""fetch_dataset: folders and archives copied safely, hub ids failing fast offline, no redundant work."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import types
import zipfile
from pathlib import Path

import pytest

from cogvx.data.download import MARKER_NAME, DatasetNotAvailableError, fetch_dataset
from cogvx.errors import ConfigError
from tests.helpers import offline_env

FILES = {"prompts.txt": "a red ball\n", "videos.txt": "videos/a.mp4\n", "videos/a.mp4": "not really a video"}


def make_source(folder: Path, files: dict[str, str] = FILES) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def assert_dataset(data_root: Path) -> None:
    for name, text in FILES.items():
        assert (data_root / name).read_text() == text
    assert (data_root / MARKER_NAME).is_file()


# ----------------------------------------------------------------------------- local folder


def test_folder_is_copied_once_and_again_when_it_changes(tmp_path):
    source = make_source(tmp_path / "src")
    (source / "videos" / "b.mp4").symlink_to("a.mp4")  # a link inside the folder is fine
    data_root = tmp_path / "data" / "raw"
    assert fetch_dataset(str(source), data_root) == data_root
    assert_dataset(data_root)
    assert (data_root / "videos" / "b.mp4").is_symlink()
    assert (data_root / "videos" / "b.mp4").resolve() == (data_root / "videos" / "a.mp4").resolve()

    (data_root / "added-later.txt").write_text("x")
    fetch_dataset(str(source), data_root)
    assert (data_root / "added-later.txt").exists(), "an unchanged source was copied again"

    (source / "videos" / "c.mp4").write_text("new clip")
    fetch_dataset(str(source), data_root)
    assert (data_root / "videos" / "c.mp4").read_text() == "new clip"
    assert not (data_root / "added-later.txt").exists()


def test_symlink_escaping_the_folder_is_refused(tmp_path):
    source = make_source(tmp_path / "src")
    (tmp_path / "secret.txt").write_text("secret")
    (source / "videos" / "leak.mp4").symlink_to(tmp_path / "secret.txt")
    (source / "up").symlink_to("..")
    data_root = tmp_path / "raw"
    with pytest.raises(DatasetNotAvailableError, match="symlinks pointing outside it") as info:
        fetch_dataset(str(source), data_root)
    assert "up, videos/leak.mp4" in str(info.value)
    assert not data_root.exists()


def test_folder_equal_to_data_root_is_used_in_place_and_overlaps_are_refused(tmp_path):
    data_root = make_source(tmp_path / "raw")
    assert fetch_dataset(str(data_root), data_root) == data_root
    assert not (data_root / MARKER_NAME).exists()
    with pytest.raises(ConfigError, match="overlap"):
        fetch_dataset(str(data_root / "videos"), data_root)
    with pytest.raises(ConfigError, match="overlap"):
        fetch_dataset(str(tmp_path), data_root)
    assert [(data_root / name).read_text() for name in FILES] == list(FILES.values())


def test_files_not_put_there_by_cogvx_are_never_replaced(tmp_path):
    source = make_source(tmp_path / "src")
    data_root = tmp_path / "raw"
    (data_root / "videos").mkdir(parents=True)
    (data_root / "videos" / "mine.mp4").write_text("my own clip")
    with pytest.raises(ConfigError, match="already holds files that cogvx did not put there"):
        fetch_dataset(str(source), data_root)
    assert (data_root / "videos" / "mine.mp4").read_text() == "my own clip"


# ----------------------------------------------------------------------------- archives


def write_zip(path: Path, files: dict[str, str], prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(prefix + name, text)
    return path


def write_tar(path: Path, files: dict[str, str], prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("writer, suffix", [(write_zip, ".zip"), (write_tar, ".tar.gz")])
def test_archive_is_extracted(tmp_path, writer, suffix):
    archive = writer(tmp_path / f"clips{suffix}", FILES)
    data_root = tmp_path / "raw"
    fetch_dataset(str(archive), data_root)
    assert_dataset(data_root)
    (data_root / "added-later.txt").write_text("x")
    fetch_dataset(str(archive), data_root)
    assert (data_root / "added-later.txt").exists(), "an unchanged archive was extracted again"


def test_archive_of_one_folder_gives_that_folders_content(tmp_path):
    archive = write_tar(tmp_path / "clips.tgz", FILES, prefix="my-dataset/")
    fetch_dataset(str(archive), tmp_path / "raw")
    assert_dataset(tmp_path / "raw")
    assert not (tmp_path / "raw" / "my-dataset").exists()


def test_zip_with_parent_member_is_refused(tmp_path):
    archive = write_zip(tmp_path / "bad.zip", {**FILES, "../evil.txt": "evil"})
    data_root = tmp_path / "out" / "raw"
    with pytest.raises(DatasetNotAvailableError, match=r"'\.\./evil\.txt' \('\.\.' in its path\)"):
        fetch_dataset(str(archive), data_root)
    assert not data_root.exists()
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert os.listdir(tmp_path / "out") == [], "a staging folder was left behind"


def test_tar_with_absolute_member_is_refused(tmp_path):
    archive = write_tar(tmp_path / "bad.tar.gz", {**FILES, "/tmp/evil.txt": "evil"})
    data_root = tmp_path / "raw"
    with pytest.raises(DatasetNotAvailableError, match=r"'/tmp/evil\.txt' \(absolute path\)"):
        fetch_dataset(str(archive), data_root)
    assert not data_root.exists()


def test_tar_with_link_out_of_data_root_is_refused(tmp_path):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        link = tarfile.TarInfo("videos/a.mp4")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tf.addfile(link)
    with pytest.raises(DatasetNotAvailableError, match=r"'videos/a\.mp4' \(.*outside the destination"):
        fetch_dataset(str(archive), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_failed_refetch_leaves_the_previous_data_set(tmp_path):
    data_root = tmp_path / "raw"
    fetch_dataset(str(write_zip(tmp_path / "good.zip", FILES)), data_root)
    with pytest.raises(DatasetNotAvailableError, match="evil"):
        fetch_dataset(str(write_zip(tmp_path / "bad.zip", {"../evil.txt": "x"})), data_root)
    assert_dataset(data_root)


# ----------------------------------------------------------------------------- hub ids and unknown sources

HUB_SCRIPT = """
import sys
from pathlib import Path
from cogvx.data.download import fetch_dataset
from cogvx.errors import CogvxError
try:
    fetch_dataset(sys.argv[1], Path(sys.argv[2]))
except CogvxError as error:
    print(error, file=sys.stderr)
    sys.exit(error.exit_code)
"""


def test_hub_id_with_unreachable_hub_fails_fast(tmp_path):
    data_root = tmp_path / "raw"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT, "Wild-Heart/Disney-VideoGeneration-Dataset",
                             str(data_root)], env=offline_env(tmp_path), capture_output=True, text=True,
                            timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    assert "cannot download dataset 'Wild-Heart/Disney-VideoGeneration-Dataset'" in result.stderr
    assert "http://127.0.0.1:9) cannot be reached" in result.stderr
    assert "hf download Wild-Heart/Disney-VideoGeneration-Dataset --repo-type dataset" in result.stderr
    assert "data.source=synthetic" in result.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not data_root.exists()


def test_hub_id_with_hf_hub_offline_says_so(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetNotAvailableError, match="HF_HUB_OFFLINE is set") as info:
        fetch_dataset("org/name", tmp_path / "raw", revision="v1")
    assert "set data.source to its path" in str(info.value)
    assert info.value.exit_code == 3


@pytest.mark.parametrize("source, reason", [
    ("no/such/folder", "no such file or folder"),
    ("nothing-here", "no such file or folder"),
    ("org/bad name", "Repo id must use"),
])
def test_unknown_source_lists_accepted_forms(tmp_path, monkeypatch, source, reason):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotAvailableError, match="Accepted forms: 'synthetic'") as info:
        fetch_dataset(source, tmp_path / "raw")
    assert reason in str(info.value) and "hub dataset id 'org/name'" in str(info.value)


def test_plain_file_is_not_an_archive(tmp_path):
    (tmp_path / "clips.txt").write_text("x")
    with pytest.raises(DatasetNotAvailableError, match="not an archive"):
        fetch_dataset(str(tmp_path / "clips.txt"), tmp_path / "raw")


# ----------------------------------------------------------------------------- synthetic clips


def test_synthetic_is_built_once_per_count_and_seed(tmp_path, monkeypatch):
    """With a stand-in generator: same n and seed build once; another seed rebuilds."""
    calls = []

    def fake_make(out_dir, n, seed=0, fps=8, control=False):
        calls.append((n, seed))
        make_source(Path(out_dir))
        return Path(out_dir)

    module = types.ModuleType("cogvx.data.synthetic")
    module.make_synthetic_dataset = fake_make
    monkeypatch.setitem(sys.modules, "cogvx.data.synthetic", module)
    data_root = tmp_path / "raw"
    fetch_dataset("synthetic", data_root, synthetic_clips=3, seed=1)
    fetch_dataset("synthetic", data_root, synthetic_clips=3, seed=1)
    assert calls == [(3, 1)]
    assert_dataset(data_root)
    fetch_dataset("synthetic", data_root, synthetic_clips=3, seed=2)
    assert calls == [(3, 1), (3, 2)]
    (data_root / "videos" / "a.mp4").unlink()  # an incomplete data set is rebuilt
    fetch_dataset("synthetic", data_root, synthetic_clips=3, seed=2)
    assert calls == [(3, 1), (3, 2), (3, 2)]


def test_real_synthetic_dataset_is_built_once(tmp_path):
    data_root = tmp_path / "raw"
    fetch_dataset("synthetic", data_root, synthetic_clips=2, seed=0)
    videos = (data_root / "videos.txt").read_text().split()
    assert len(videos) == 2 and all((data_root / name).is_file() for name in videos)
    mtimes = {name: (data_root / name).stat().st_mtime_ns for name in videos}
    fetch_dataset("synthetic", data_root, synthetic_clips=2, seed=0)
    assert {name: (data_root / name).stat().st_mtime_ns for name in videos} == mtimes


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Just enough of the hub API for snapshot_download: dataset org/ok downloads, org/broken
    answers dataset_info but fails every later request, anything else is 404."""

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?")[0]
        match = re.fullmatch(r"/(?:api/)?datasets/org/(\w+)(/.*)?", path)
        repo, rest = (match.group(1), match.group(2) or "") if match else (None, "")
        if repo not in ("ok", "broken"):
            return self._send(404, b"not found")
        if path.startswith("/api/") and (rest == "" or rest.startswith("/revision/")):
            info = {"id": f"org/{repo}", "sha": FAKE_SHA, "siblings": [{"rfilename": n} for n in FILES]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        if repo == "broken":
            return self._send(400, b"hub is broken")  # 5xx would be retried with backoff
        if rest.startswith(f"/tree/{FAKE_SHA}"):
            tree = [{"type": "file", "path": name, "size": len(text), "oid": sha1(text.encode())}
                    for name, text in FILES.items()]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        name = rest.removeprefix(f"/resolve/{FAKE_SHA}/")
        if name in FILES:
            data = FILES[name].encode()
            return self._send(200, data, {"X-Repo-Commit": FAKE_SHA, "ETag": f'"{sha1(data)}"'})
        return self._send(404, b"not found")

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()
MANY_SCRIPT = """
import sys
from pathlib import Path
from cogvx.data.download import fetch_dataset
from cogvx.errors import CogvxError
for source, data_root in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        fetch_dataset(source, Path(data_root))
        print(f"=== {source}: ok")
    except CogvxError as error:
        print(f"=== {source}: exit {error.exit_code}: {error}")
"""


def test_hub_download_against_a_fake_hub(tmp_path):
    """Success (then nothing to do), a hub failing mid-download, and an unknown dataset id."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = offline_env(tmp_path) | {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
    roots = {repo: tmp_path / repo for repo in ("ok", "broken", "missing")}
    args = [str(item) for repo, root in roots.items() for item in (f"org/{repo}", root)]
    try:
        result = subprocess.run([sys.executable, "-c", MANY_SCRIPT, *args], env=env, capture_output=True,
                                text=True, timeout=120)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    outcomes = dict(part.split(": ", 1) for part in result.stdout.split("=== ")[1:])
    assert outcomes["org/ok"].strip() == "ok", outcomes
    assert_dataset(roots["ok"])
    marker = json.loads((roots["ok"] / MARKER_NAME).read_text())
    assert marker == {"identity": {"kind": "hub", "repo_id": "org/ok", "revision": None},
                      "complete": True, "commit": FAKE_SHA}
    fetch_dataset("org/ok", roots["ok"])  # nothing to do: no hub, no network needed

    assert outcomes["org/broken"].startswith("exit 3: cannot download dataset 'org/broken': download "
                                             "incomplete, 3 file(s) missing"), outcomes
    assert json.loads((roots["broken"] / MARKER_NAME).read_text())["complete"] is False
    fetch_dataset(str(make_source(tmp_path / "src")), roots["broken"])  # a partial download is cogvx's
    assert_dataset(roots["broken"])

    assert outcomes["org/missing"].startswith("exit 3: cannot download dataset 'org/missing': the hub "
                                              "refused (HfHubHTTPError"), outcomes
    assert "Check data.source (the dataset id) and data.revision" in outcomes["org/missing"]
    assert not roots["missing"].exists()
