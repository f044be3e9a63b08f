"""Reading samples from tar shards: grouping, unordered members, truncation, duplicates."""

from __future__ import annotations

import gzip
import io
import lzma
import random
import tarfile

import pytest

from pipeline.data.drops import Drop
from pipeline.data.tar_reader import open_shard, read_samples, scan_layout, split_member_name
from pipeline.io.storage import Location
from pipeline.spec.prep import FilterSpec
from tests.helpers import write_tar


def _read(path, limits: FilterSpec | None = None):
    data = path.read_bytes()
    layout = scan_layout(io.BytesIO(data), len(data))
    return layout, list(read_samples(io.BytesIO(data), layout, limits or FilterSpec()))


def test_member_names_split_at_the_first_dot():
    assert split_member_name("dir/000001.jpg") == ("dir/000001", "jpg")
    assert split_member_name("a/b.c/k.seg.PNG") == ("a/b.c/k", "seg.png")


def test_unordered_members_still_form_whole_samples(tmp_path):
    path = write_tar(tmp_path / "u.tar", [("b.jpg", b"B"), ("a.jpg", b"A"), ("a.txt", b"cap a"),
                                          ("b.txt", b"cap b"), ("b.json", b'{"k": 1}')])
    layout, samples = _read(path)
    assert layout.unordered and not layout.truncated
    assert [(s.key, s.image, s.caption_text(), s.metadata, s.drop) for s in samples] == [
        ("b", b"B", "cap b", {"k": 1}, None),
        ("a", b"A", "cap a", {}, None),
    ]


def test_truncation_anywhere_drops_only_the_cut_sample(tmp_path):
    members = [("a.jpg", b"x" * 700), ("a.txt", b"cap"), ("b.jpg", b"y" * 900), ("b.txt", b"cap")]
    full = write_tar(tmp_path / "full.tar", members).read_bytes()
    b_header = full.index(b"b.jpg")
    for cut in (b_header + 100, b_header + 512 + 400, full.index(b"b.txt") + 600):
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(full[:cut])
        layout, samples = _read(path)
        assert layout.truncated
        drops = {s.key: s.drop for s in samples}
        assert drops.get("b", Drop.TRUNCATED_TAR) == Drop.TRUNCATED_TAR
        assert Drop.TRUNCATED_TAR in drops.values()
    _, complete = _read(tmp_path / "full.tar")
    assert [s.drop for s in complete] == [None, None]


def test_missing_end_marker_counts_as_truncated(tmp_path):
    full = write_tar(tmp_path / "t.tar", [("a.jpg", b"x" * 512), ("a.txt", b"c")]).read_bytes()
    end_of_members = full.index(b"a.txt") + 1024
    path = tmp_path / "no-marker.tar"
    path.write_bytes(full[:end_of_members])
    layout, samples = _read(path)
    assert layout.truncated and samples[-1].drop == Drop.TRUNCATED_TAR


@pytest.mark.parametrize(
    "members, reason",
    [
        ([("k.jpg", b"A"), ("k.txt", b"c"), ("k.txt", b"d")], Drop.DUPLICATE_MEMBER),
        ([("k.txt", b"caption only")], Drop.MISSING_IMAGE),
        ([("k.jpg", b"A")], Drop.MISSING_CAPTION),
        ([("k.jpg", b"A"), ("k.txt", b"\xff\xfe")], Drop.CAPTION_NOT_UTF8),
        ([("k.jpg", b"A"), ("k.txt", b"c"), ("k.json", b"[1, 2]")], Drop.METADATA_INVALID),
    ],
)
def test_structural_drop_reasons(tmp_path, members, reason):
    _, samples = _read(write_tar(tmp_path / "s.tar", members))
    assert [s.drop for s in samples] == [reason]


def test_not_a_tar_raises_read_error(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(tarfile.ReadError):
        _read(path)


@pytest.mark.parametrize(
    "metadata",
    [b"[" * 100_000 + b"]" * 100_000,  # RecursionError inside json
     b'{"a": ' + b"9" * 5000 + b"}"],  # ValueError: integer string too long to convert
)
def test_metadata_that_breaks_the_json_parser_is_a_counted_drop(tmp_path, metadata):
    members = [("k.jpg", b"A"), ("k.txt", b"c"), ("k.json", metadata), ("m.jpg", b"B"), ("m.txt", b"d")]
    _, samples = _read(write_tar(tmp_path / "s.tar", members))
    assert [(s.key, s.drop) for s in samples] == [("k", Drop.METADATA_INVALID), ("m", None)]


class _ReadSizes(io.BytesIO):
    """A shard handle that remembers how much was read at once."""

    largest = 0

    def read(self, size=-1):
        data = super().read(size)
        self.largest = max(self.largest, len(data))
        return data


def test_oversized_members_are_dropped_without_being_read(tmp_path):
    big = b"x" * 200_000
    members = [
        ("img.jpg", big), ("img.txt", b"caption"),
        ("cap.jpg", b"A"), ("cap.txt", big),
        ("meta.jpg", b"A"), ("meta.txt", b"caption"), ("meta.json", b'{"k": "' + big + b'"}'),
        ("ok.jpg", b"A"), ("ok.txt", b"caption"), ("ok.json", b"{}"),
    ]
    data = write_tar(tmp_path / "s.tar", members).read_bytes()
    limits = FilterSpec(max_image_bytes=100_000, max_caption_bytes=100_000, max_metadata_bytes=100_000)
    handle = _ReadSizes(data)
    layout = scan_layout(handle, len(data))
    handle.largest = 0
    samples = list(read_samples(handle, layout, limits))
    assert [(s.key, s.drop) for s in samples] == [
        ("img", Drop.IMAGE_FILE_TOO_LARGE),
        ("cap", Drop.CAPTION_FILE_TOO_LARGE),
        ("meta", Drop.METADATA_FILE_TOO_LARGE),
        ("ok", None),
    ]
    assert handle.largest < 1000  # none of the big members was read


@pytest.mark.parametrize("mode, name", [("w:gz", "s.tar.gz"), ("w:bz2", "s.tbz2"), ("w:xz", "s.tar.xz"),
                                        ("w:gz", "gzip-named-plain.tar")])
def test_compressed_tars_read_like_plain_ones(tmp_path, mode, name):
    members = [("b.jpg", b"B" * 3000), ("a.jpg", b"A"), ("a.txt", b"cap a"), ("b.txt", b"cap b")]
    plain = write_tar(tmp_path / "plain.tar", members)
    compressed = tmp_path / name
    with tarfile.open(compressed, mode) as archive:
        for member in tarfile.open(plain):
            archive.addfile(member, tarfile.open(plain).extractfile(member))
    with open_shard(Location.of(str(compressed))) as (handle, size):
        layout = scan_layout(handle, size)
        samples = [(s.key, s.image, s.caption_text(), s.drop) for s in read_samples(handle, layout, FilterSpec())]
    assert not layout.truncated and layout.unordered
    assert samples == [("b", b"B" * 3000, "cap b", None), ("a", b"A", "cap a", None)]


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress], ids=["gzip", "xz"])
def test_cut_compressed_tar_drops_only_the_cut_sample(tmp_path, compress):
    noise = random.Random(0).randbytes(40_000)  # incompressible: the cut lands inside b's image
    members = [("a.jpg", b"A"), ("a.txt", b"cap a"), ("b.jpg", noise), ("b.txt", b"cap b")]
    data = compress(write_tar(tmp_path / "plain.tar", members).read_bytes())
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(data[: len(data) // 2])
    with open_shard(Location.of(str(path))) as (handle, size):
        layout = scan_layout(handle, size)
        samples = [(s.key, s.drop) for s in read_samples(handle, layout, FilterSpec())]
    assert layout.truncated
    assert samples == [("a", None), ("b", Drop.TRUNCATED_TAR)]


def test_compressed_shards_are_named_without_their_suffix():
    from pipeline.data.shards import plan_tasks

    sources = [Location.of(f"/raw/{name}") for name in ("a.tar.gz", "b.tgz", "c.tar.xz", "d.tar")]
    assert [t.name for t in plan_tasks(sources, Location.of("/out"))] == ["a", "b", "c", "d"]
