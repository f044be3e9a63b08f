"""Near-duplicate settings measured on real photos: ``qformer photo-corpus`` writes shards prep
reads, ``qformer prep SPEC --calibrate-near-duplicates`` reports and picks a setting on a small
real-image corpus, and ``jobs/prep_web.yaml``'s setting removes copies of real photos and keeps
the photos."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data.dedup import index_shard
from pipeline.data.neardup import find_near_duplicates, load_near_duplicates
from pipeline.data.neardup_calibration import CopyRecipe, make_copy
from pipeline.data.photo_corpus import write_photo_corpus
from pipeline.data.screen import ShardReadInfo, screen_shard
from pipeline.data.shards import near_duplicates_dir, plan_tasks
from pipeline.io.storage import Location, expand_inputs
from pipeline.spec import JobSpec, load_spec
from tests.helpers import REPO, one_error_line, sample_members, write_tar

WEB = REPO / "jobs" / "prep_web.yaml"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The 78 real photos of ``qformer photo-corpus``, as one shard."""
    folder = tmp_path_factory.mktemp("photos")
    assert main(["photo-corpus", str(folder)]) == 0
    return folder


def test_photo_corpus_writes_shards_prep_reads(photos, tmp_path):
    spec = load_spec(WEB, JobSpec).prep
    samples = [s for shard in expand_inputs([str(photos / "*.tar")]) for s in
               screen_shard(shard, spec.filters, ShardReadInfo())]
    assert len(samples) == 78 and all(s.drop is None for s in samples), [s.drop for s in samples if s.drop]
    assert len({s.raw.image for s in samples}) == 78  # distinct files
    assert {s.raw.image_ext for s in samples} == {"jpg", "png"}  # as the packages ship them
    assert all(s.raw.metadata["package"] and s.raw.metadata["licence"] for s in samples)
    assert samples[0].caption == "astronaut from scikit-image"
    clipart = write_photo_corpus(str(tmp_path / "clipart"), "clipart", shard_size=500)
    assert [Path(url).name for url in clipart] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sum(1 for url in clipart for s in screen_shard(Location.of(url), spec.filters, ShardReadInfo())
               if s.drop is None) == 1427


def test_a_copy_is_cropped_on_two_sides_resized_and_re_encoded():
    image = Image.new("RGB", (200, 100), (10, 200, 30))
    data = make_copy(image, random.Random(0))
    copy = Image.open(io.BytesIO(data))
    assert copy.format == "JPEG" and copy.size == (152, 76)  # 95% of each side, then 80%
    mirrored = Image.open(io.BytesIO(make_copy(image, random.Random(0), CopyRecipe(mirror=True))))
    assert mirrored.size == (152, 76)


def test_the_calibration_command_on_real_photos(photos, tmp_path, capsys):
    out = tmp_path / "calibration"
    status = main(["prep", str(WEB), "--set", f"prep.inputs={photos}/*.tar", "--calibrate-near-duplicates",
                   "--calibration-out", str(out), "--calibration-samples", "30"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    rows = list(csv.DictReader((out / "calibration.csv").open()))
    assert {(int(r["bits"]), int(r["threshold"])) for r in rows} == {
        (bits, t) for bits in (64, 128, 256) for t in range(bits // 2)}
    for bits in (64, 128, 256):
        mine = [r for r in rows if int(r["bits"]) == bits]
        for rate in ("recall", "pair_fpr", "originals_lost"):
            values = [float(r[rate]) for r in mine]
            assert values == sorted(values), (bits, rate)  # every rate rises with the threshold
        assert float(mine[0]["recall"]) < 0.5 and float(mine[-1]["recall"]) == 1.0  # the copies are not the photos
        assert float(mine[-1]["originals_lost"]) > 0.5  # nor the photos one another
    report = json.loads((out / "calibration.json").read_text())
    assert report["images"] == 30 and report["pairs"] == 435
    chosen = report["chosen"]
    assert chosen["recall"] >= 0.9 and chosen["originals_lost"] <= 0.01
    row = next(r for r in rows if (int(r["bits"]), int(r["threshold"])) == (chosen["bits"], chosen["threshold"]))
    assert row["meets"] == "True" and float(row["recall"]) == chosen["recall"]
    low, high = chosen["thresholds_meeting"]
    assert low <= chosen["threshold"] <= high
    assert f"bits: {chosen['bits']}, threshold: {chosen['threshold']}" in printed
    assert f"| {chosen['bits']} | {chosen['threshold']} |" in (out / "calibration.md").read_text()
    with Image.open(out / "calibration.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 600 and picture.size[1] > 300
        colours = np.unique(np.asarray(picture.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 50  # curves drawn, not a blank canvas


def test_on_clip_art_no_setting_meets_the_target_and_the_command_says_so(tmp_path, capsys):
    """Emoji: distinct ones lie closer together than a cropped copy to its original (docs/prep.md)."""
    write_photo_corpus(str(tmp_path / "clipart"), "clipart")
    status = main(["prep", str(WEB), "--set", f"prep.inputs={tmp_path}/clipart/*.tar", "--calibrate-near-duplicates",
                   "--calibration-out", str(tmp_path / "out"), "--calibration-samples", "300",
                   "--set", "prep.filters.min_side=32"])  # 72 px emoji, 55 px copies
    printed = capsys.readouterr().out
    assert status == 1 and "no hash length and threshold finds 90% of the copies" in printed, printed
    report = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert report["chosen"] is None and report["images"] == 300
    assert all(row["recall"] < 0.5 for row in report["best_within_loss"].values())


@pytest.mark.parametrize("args, error", [
    (["--target-recall", "1.5", "--calibrate-near-duplicates"], "error: --target-recall: must be between 0 and 1"),
    (["--calibration-samples", "10"], "error: --calibration-samples: only with --calibrate-near-duplicates"),
    (["--set", "prep.inputs=/nonexistent/*.tar", "--calibrate-near-duplicates"], "error: input '/nonexistent/*.tar' matches no file"),
    (["--set", "prep.filters.min_side=2000", "--calibrate-near-duplicates"],
     "error: ['data/photos/raw/*.tar']: 0 usable images of 78 read (78 byte-identical to an earlier one, or they or "
     "their copies fail prep's image checks, e.g. min_side 2000)"),
])
def test_bad_calibration_arguments_are_one_error_line(args, error, photos, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the spec's inputs, data/photos/raw/*.tar, are the photos
    (tmp_path / "data" / "photos").mkdir(parents=True)
    (tmp_path / "data" / "photos" / "raw").symlink_to(photos)
    assert main(["prep", str(WEB), *args]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(error)


def _photos_then_copies(photos: Path, folder: Path, seed: int) -> tuple[list[str], dict[str, str]]:
    """Shard 00000: the photos; shard 00001: a copy of each, in a random order."""
    spec = load_spec(WEB, JobSpec).prep
    samples = [s for s in screen_shard(Location.of(str(photos / "00000.tar")), spec.filters, ShardReadInfo())]
    write_tar(folder / "00000.tar", [m for s in samples for m in sample_members(s.raw.key, s.caption, s.raw.image)])
    rng = random.Random(seed)
    copies = {f"copy-{s.raw.key}": s.raw.key for s in samples}
    members = []
    for s in rng.sample(samples, len(samples)):
        with Image.open(io.BytesIO(s.raw.image)) as image:
            members += sample_members(f"copy-{s.raw.key}", "a copy", make_copy(image, rng))
    write_tar(folder / "01.tar", members)
    return [s.raw.key for s in samples], copies


def test_prep_web_settings_remove_copies_of_real_photos_and_keep_the_photos(photos, tmp_path):
    """prep's index and search phases (in the driver, as prep runs them up to
    ``dedup_driver_max_rows``) with ``jobs/prep_web.yaml``'s settings."""
    spec = load_spec(WEB, JobSpec, [f"prep.inputs={tmp_path}/raw/*.tar", f"prep.output={tmp_path}/out"]).prep
    originals, copies = _photos_then_copies(photos, tmp_path / "raw", seed=1)
    tasks = plan_tasks(expand_inputs(spec.inputs), Location.of(spec.output))
    assert [index_shard(task, spec, late=False) for task in tasks] == [78, 78]
    target = near_duplicates_dir(Location.of(spec.output))
    find_near_duplicates([t.index for t in tasks], [t.name for t in tasks], target, spec.filters.near_duplicates,
                         partitions=1, driver_max_rows=spec.execution.dedup_driver_max_rows)
    photos_dropped = load_near_duplicates(target, tasks[0].name)
    copies_dropped = load_near_duplicates(target, tasks[1].name)
    assert photos_dropped == {}, photos_dropped  # no distinct photo is lost
    assert len(copies_dropped) >= 0.9 * len(copies), f"{len(copies_dropped)} of {len(copies)} copies found"
    assert np.mean([copies_dropped[key] == copies[key] for key in copies_dropped]) >= 0.95  # as their photo's
    assert set(originals) == set(copies.values())


def test_prep_web_job_on_real_photos_and_their_copies(ray_2cpus, photos, tmp_path, capsys):
    """The whole ``qformer prep jobs/prep_web.yaml`` (Ray Data): the copies are dropped as
    ``near_duplicate``, every photo is kept."""
    originals, copies = _photos_then_copies(photos, tmp_path / "raw", seed=2)
    out = tmp_path / "prepared"
    assert main(["prep", str(WEB), "--set", f"prep.inputs={tmp_path}/raw/*.tar", "--set", f"prep.output={out}",
                 "--set", "prep.image.size=32"]) == 0
    assert "prep done" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["samples_in"] == 2 * 78
    assert set(manifest["drops"]) <= {"near_duplicate"}
    assert manifest["drops"].get("near_duplicate", 0) >= 0.9 * len(copies)
    import pyarrow.dataset as pads

    provenance = pads.dataset(str(out / "provenance"), format="parquet").to_table().to_pylist()
    kept = {row["key"] for row in provenance if row["status"] == "kept"}
    assert set(originals) <= kept
