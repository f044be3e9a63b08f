"""Prep's provenance tables (every input sample: kept, or why not) and its near-duplicate removal
beside the exact dedup, run as README shows (``qformer prep jobs/prep_neardup.yaml``)."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from pipeline.cli import main
from pipeline.data.phash import ImageHasher, as_words, earliest_near
from pipeline.spec import JobSpec, load_spec
from tests.data.corpus import EXPECTED_DROPS, EXPECTED_KEPT
from tests.data.helpers import demo_images, variants
from tests.helpers import REPO, sample_members, write_tar


def provenance(out) -> list[dict]:
    return pads.dataset(str(out / "provenance"), format="parquet").to_table().to_pylist()


def test_every_input_sample_has_a_provenance_row_with_its_status(prepared_bad_corpus):
    _, manifest, out = prepared_bad_corpus
    rows = provenance(out)
    assert len(rows) == manifest["totals"]["samples_in"]
    assert Counter(row["status"] for row in rows) == Counter({**EXPECTED_DROPS, "kept": len(EXPECTED_KEPT)})
    kept = {row["key"]: row for row in rows if row["status"] == "kept"}
    assert set(kept) == set(EXPECTED_KEPT)
    assert all(row["captions"] == [{"text": EXPECTED_KEPT[key], "origin": "web", "score": None, "kept": True}]
               for key, row in kept.items())
    duplicates = [row for row in rows if row["status"] == "duplicate"]
    kept_hashes = {row["content_hash"] for row in kept.values()}
    assert all(row["content_hash"] in kept_hashes for row in duplicates)  # the copy of a kept sample
    for stats in manifest["shards"]:
        shard_rows = [row for row in rows if row["source"] == json.loads(
            (out / f"{stats['name']}.stats.json").read_text())["input"]]
        assert len(shard_rows) == json.loads((out / f"{stats['name']}.stats.json").read_text())["samples_in"]


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def test_prep_neardup_job_drops_resized_and_reencoded_copies(ray_2cpus, tmp_path, capsys):
    spec = load_spec(REPO / "jobs" / "prep_neardup.yaml", JobSpec).prep
    images, labels = demo_images(160)
    hasher = ImageHasher(spec.filters.near_duplicates)
    # Originals with no near duplicate among the others, so that each copy's original is known.
    pairs = [hasher.hash_pair(Image.open(io.BytesIO(jpeg(image))).convert("RGB")) for image in images]
    alone = earliest_near(np.arange(len(images)), as_words([h for h, _ in pairs]), None,
                          spec.filters.near_duplicates.threshold, spec.filters.near_duplicates.band_count)
    originals = [i for i in range(len(images)) if alone[i] < 0][:60]
    write_tar(tmp_path / "raw" / "00000.tar", [m for i in originals for m in sample_members(
        f"o{i:03d}", f"a {labels[i][0]} {labels[i][1]}", jpeg(images[i]))])
    copies = {}
    members = []
    for i in originals[:20]:
        for kind in ("resized", "jpeg60"):
            key = f"c{i:03d}{kind}"
            copies[key] = f"o{i:03d}"
            members += sample_members(key, "a copy", jpeg(variants(images[i])[kind]))
    members += sample_members("exact", "an exact copy", jpeg(images[originals[0]]))
    write_tar(tmp_path / "raw" / "00001.tar", members)

    out = tmp_path / "prepared"
    assert main(["prep", str(REPO / "jobs" / "prep_neardup.yaml"), "--set", f"prep.inputs={tmp_path}/raw/*.tar",
                 "--set", f"prep.output={out}", "--set", "prep.image.size=32"]) == 0
    assert "prep done" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["drops"] == {"duplicate": 1, "near_duplicate": len(copies)}
    rows = {row["key"]: row for row in provenance(out)}
    assert len(rows) == len(originals) + len(copies) + 1
    for key, original in copies.items():
        assert rows[key]["status"] == "near_duplicate" and rows[key]["duplicate_of"] == original, rows[key]
        assert len(rows[key]["image_hash"]) == 16
    assert rows["exact"]["status"] == "duplicate"
    kept = {key for shard in out.glob("*.parquet") for key in pq.read_table(shard).column("key").to_pylist()}
    assert kept == {f"o{i:03d}" for i in originals}
