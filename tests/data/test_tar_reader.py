"""Reading samples from tar shards: grouping, unordered members, truncation, duplicates."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data.drops import Drop
from pipeline.data.tar_reader import read_samples, scan_layout, split_member_name
from tests.helpers import write_tar


def _read(path):
    data = path.read_bytes()
    layout = scan_layout(io.BytesIO(data), len(data))
    return layout, list(read_samples(io.BytesIO(data), layout))


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
