"""Tests for download.sh against a local HTTP server standing in for Meta's CDN.

Needs bash, wget and md5sum on PATH (wget: `apt-get install -y wget`).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "download.sh"
SECRET = "Policy=eyJTdGF0ZW1lbnQiOlt7InNlY3JldCI6dHJ1ZX1dfQ__&Signature=s3cr3tSIG&Key-Pair-Id=K2SECRETPAIR"


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self):  # noqa: N802 (http.server naming)
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format, *args):  # keep pytest output clean
        pass


class Remote:
    """A fake remote tree served over http://127.0.0.1:<free port>/."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        handler = type("Handler", (_Handler,), {"requests": self.requests})
        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
        )
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}/*?{SECRET}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def add_model(self, folder: str, shards: int = 1, corrupt: str | None = None) -> dict[str, bytes]:
        """Create LICENSE, USE_POLICY.md and a model folder with a correct checklist.chk.

        If `corrupt` names a file, that file is served with content that differs from
        the checklist. Returns {relative path: content the checklist expects}.
        """
        files = {
            "LICENSE": b"fake license\n",
            "USE_POLICY.md": b"# fake use policy\n",
            f"{folder}/params.json": b'{"dim": 8, "n_layers": 1}\n',
            f"{folder}/tokenizer.model": b"fake tokenizer " + folder.encode() + b"\n",
        }
        for s in range(shards):
            files[f"{folder}/consolidated.{s:02d}.pth"] = os.urandom(1024) + bytes([s])
        for rel, data in files.items():
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(data)
        checklist = "".join(
            f"{hashlib.md5(data).hexdigest()}  {rel.split('/', 1)[1]}\n"
            for rel, data in files.items()
            if rel.startswith(folder + "/")
        )
        (self.root / folder / "checklist.chk").write_text(checklist)
        files[f"{folder}/checklist.chk"] = checklist.encode()
        if corrupt is not None:
            (self.root / folder / corrupt).write_bytes(b"this is not what the checklist expects")
        return files


@pytest.fixture
def remote(tmp_path):
    r = Remote(tmp_path / "remote")
    r.root.mkdir()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def workdir(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    return d


def run_script(workdir: Path, env_extra: dict[str, str], stdin: str = "", path_prefix: Path | None = None):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", "WGET"}
        and not k.lower().endswith("_proxy")
    }
    empty_wgetrc = workdir.parent / "wgetrc"
    empty_wgetrc.write_text("")
    env["WGETRC"] = str(empty_wgetrc)  # ignore any user ~/.wgetrc (e.g. verbose=on)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    env.update(env_extra)
    return subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=workdir,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_no_secret(proc, remote: Remote | None, *dirs: Path):
    output = proc.stdout + proc.stderr
    for needle in (SECRET, "Policy=", "Signature", "s3cr3tSIG", "K2SECRETPAIR"):
        assert needle not in output
    if remote is not None:
        assert remote.host not in output
    # nothing written to disk (e.g. a wget-log) may contain it either
    for d in dirs:
        for f in d.rglob("*"):
            if f.is_file():
                assert b"s3cr3tSIG" not in f.read_bytes(), f


def assert_downloaded(target: Path, files: dict[str, bytes]):
    for rel, data in files.items():
        assert (target / rel).read_bytes() == data, rel


def make_exe(path: Path, body: str):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_download_8b_with_env_vars(remote, workdir, tmp_path):
    files = remote.add_model("Meta-Llama-3-8B")
    target = tmp_path / "out"
    proc = run_script(
        workdir, {"PRESIGNED_URL": remote.url, "MODEL_SIZE": "8B", "TARGET_FOLDER": str(target)}
    )
    assert proc.returncode == 0, proc.stderr
    assert_downloaded(target, files)
    assert sorted(p.name for p in (target / "Meta-Llama-3-8B").iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "params.json", "tokenizer.model",
    ]
    assert "Meta-Llama-3-8B: all checksums OK" in proc.stdout
    # '*' was replaced by the file path and the signed query string was sent along
    assert f"/Meta-Llama-3-8B/params.json?{SECRET}" in remote.requests
    assert f"/LICENSE?{SECRET}" in remote.requests
    assert_no_secret(proc, remote, workdir, target)


def test_download_with_answers_on_stdin(remote, workdir, tmp_path):
    files = remote.add_model("Meta-Llama-3-8B-Instruct")
    # A WGET override that records its argv, then runs the real wget: the URL must
    # reach wget on stdin, never on the command line (visible in `ps`).
    argv_log = tmp_path / "argv.log"
    wrapper = tmp_path / "wget-wrapper"
    make_exe(wrapper, f'printf "%s\\n" "$*" >> "{argv_log}"\nexec wget "$@"\n')
    target = tmp_path / "out"
    proc = run_script(
        workdir,
        {"TARGET_FOLDER": str(target), "WGET": str(wrapper)},
        stdin=f"{remote.url}\n8B-instruct\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert_downloaded(target, files)
    assert "all checksums OK" in proc.stdout
    argv = argv_log.read_text()
    assert argv.count("\n") == 6  # LICENSE, USE_POLICY.md, params, tokenizer, checklist, 1 shard
    assert "s3cr3tSIG" not in argv and remote.host not in argv
    assert_no_secret(proc, remote, workdir, target)


def test_llama31_70b_downloads_eight_shards(remote, workdir, tmp_path):
    files = remote.add_model("Meta-Llama-3.1-70B-Instruct", shards=8)
    target = tmp_path / "out"
    proc = run_script(
        workdir,
        {"PRESIGNED_URL": remote.url, "MODEL_SIZE": " 3.1-70B-Instruct ", "TARGET_FOLDER": str(target)},
    )
    assert proc.returncode == 0, proc.stderr
    assert_downloaded(target, files)
    shards = sorted(p.name for p in (target / "Meta-Llama-3.1-70B-Instruct").glob("consolidated.*.pth"))
    assert shards == [f"consolidated.{s:02d}.pth" for s in range(8)]
    assert_no_secret(proc, remote, workdir, target)


def test_llama32_and_llama33_download_with_their_shard_counts(remote, workdir, tmp_path):
    small, large = remote.add_model("Llama-3.2-1B-Instruct"), remote.add_model("Llama-3.3-70B-Instruct", shards=8)
    remote.add_model("Llama-3.2-3B")
    target = tmp_path / "out"
    proc = run_script(
        workdir,
        {"PRESIGNED_URL": remote.url, "MODEL_SIZE": "3.2-1B-instruct,Llama-3.2-3B,3.3-70B-Instruct", "TARGET_FOLDER": str(target)},
    )
    assert proc.returncode == 0, proc.stderr
    assert_downloaded(target, {**small, **large})
    for folder, shards in (("Llama-3.2-1B-Instruct", 1), ("Llama-3.2-3B", 1), ("Llama-3.3-70B-Instruct", 8)):
        assert len(list((target / folder).glob("consolidated.*.pth"))) == shards, folder
        assert f"{folder}: all checksums OK" in proc.stdout
    assert_no_secret(proc, remote, workdir, target)


def test_checksum_mismatch_fails_and_names_file(remote, workdir, tmp_path):
    remote.add_model("Meta-Llama-3-8B", corrupt="consolidated.00.pth")
    target = tmp_path / "out"
    proc = run_script(
        workdir, {"PRESIGNED_URL": remote.url, "MODEL_SIZE": "8B", "TARGET_FOLDER": str(target)}
    )
    assert proc.returncode != 0
    assert "checksum mismatch" in proc.stderr
    assert "Meta-Llama-3-8B/consolidated.00.pth" in proc.stderr
    assert "params.json" not in proc.stderr  # only the bad file is reported
    assert "re-run" in proc.stderr and "request a new one" in proc.stderr
    assert "all checksums OK" not in proc.stdout
    assert_no_secret(proc, remote, workdir, target)


def test_checksum_mismatch_macos_branch(remote, workdir, tmp_path):
    """On Darwin the script compares `md5 -r` output itself; fake uname and md5 to test that path."""
    remote.add_model("Meta-Llama-3-8B", corrupt="tokenizer.model")
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    make_exe(bin_dir / "uname", 'echo Darwin\n')
    real_md5sum = shutil.which("md5sum")
    make_exe(bin_dir / "md5", f'[ "$1" = "-r" ] || exit 64\nshift\n"{real_md5sum}" "$@" | sed "s/  / /"\n')
    make_exe(bin_dir / "md5sum", 'echo "md5sum must not be used on macOS" >&2; exit 99\n')
    target = tmp_path / "out"
    proc = run_script(
        workdir,
        {"PRESIGNED_URL": remote.url, "MODEL_SIZE": "8b", "TARGET_FOLDER": str(target)},
        path_prefix=bin_dir,
    )
    assert proc.returncode != 0
    assert "Meta-Llama-3-8B/tokenizer.model" in proc.stderr, proc.stderr
    assert "consolidated.00.pth" not in proc.stderr
    assert_no_secret(proc, remote, workdir, target)


def test_unknown_model_name(workdir, tmp_path):
    target = tmp_path / "out"
    proc = run_script(
        workdir,
        {
            "PRESIGNED_URL": f"http://127.0.0.1:9/*?{SECRET}",
            "MODEL_SIZE": "8B,13B",
            "TARGET_FOLDER": str(target),
        },
    )
    assert proc.returncode != 0
    assert "unknown model '13B'" in proc.stderr
    assert "70B-instruct" in proc.stderr  # lists what is supported
    assert not target.exists()  # failed before downloading anything
    assert_no_secret(proc, None, workdir)


def test_failed_download_reports_expired_url(remote, workdir, tmp_path):
    remote.add_model("Meta-Llama-3-8B")
    (remote.root / "Meta-Llama-3-8B" / "params.json").unlink()  # server answers 404
    target = tmp_path / "out"
    proc = run_script(
        workdir, {"PRESIGNED_URL": remote.url, "MODEL_SIZE": "8B", "TARGET_FOLDER": str(target)}
    )
    assert proc.returncode != 0
    assert (
        "download failed for Meta-Llama-3-8B/params.json: the URL may have expired "
        "(they last 24 hours); request a new one" in proc.stderr
    )
    assert not (target / "Meta-Llama-3-8B" / "params.json").exists()  # no empty leftover
    assert_no_secret(proc, remote, workdir, target)
