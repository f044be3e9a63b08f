"""End-to-end runs of the prep job on a real local Ray."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.prep import PrepError, run_prep
from pipeline.data.tokenize import CaptionTokenizer
from pipeline.spec import JobSpec
from pipeline.spec.loader import validate_spec
from tests.helpers import jpeg_bytes, sample_members, write_tar
from tests.data.corpus import EXPECTED_DROPS, EXPECTED_KEPT, bad_corpus_spec


def _prep_spec(raw: dict):
    return validate_spec(raw, JobSpec).prep


@pytest.fixture
def prepared(prepared_bad_corpus):
    """The bad corpus, prepared once for the session (tests/conftest.py)."""
    return prepared_bad_corpus


def test_every_drop_reason_is_counted(prepared):
    _, manifest, _ = prepared
    assert manifest["drops"] == EXPECTED_DROPS
    totals = manifest["totals"]
    assert totals["samples_out"] == len(EXPECTED_KEPT)
    assert totals["samples_in"] == totals["samples_out"] + sum(EXPECTED_DROPS.values())
    assert manifest["truncated_shards"] == ["00002"]
    assert manifest["failed_shards"] == []


def test_per_shard_stats_beside_the_shards(prepared):
    _, manifest, out = prepared
    for shard in manifest["shards"]:
        stats = json.loads((out / f"{shard['name']}.stats.json").read_text())
        assert stats["samples_out"] == shard["samples"] == pq.read_metadata(out / f"{shard['name']}.parquet").num_rows
        assert stats["samples_in"] == stats["samples_out"] + sum(stats["drops"].values())
    unordered = json.loads((out / "00001.stats.json").read_text())
    assert unordered["unordered"] is True and unordered["drops"] == {"duplicate": 1}


def test_output_reads_back_with_pyarrow_and_tokens_decode_to_caption(prepared):
    spec, manifest, out = prepared
    table = pq.ParquetDataset([shard["output"] for shard in manifest["shards"]]).read()
    rows = {row["key"]: row for row in table.to_pylist()}
    assert {key: row["caption"] for key, row in rows.items()} == EXPECTED_KEPT
    qformer = CaptionTokenizer(spec.tokenizers.qformer, append_eos=False)
    llm = CaptionTokenizer(spec.tokenizers.llm, append_eos=True)
    for row in rows.values():
        image = Image.open(io.BytesIO(row["image"]))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))
        assert qformer.decode(row["qformer_input_ids"], row["qformer_attention_mask"]) == row["caption"]
        assert llm.decode(row["llm_input_ids"], row["llm_attention_mask"]) == row["caption"]
        last = sum(row["llm_attention_mask"]) - 1
        assert row["llm_input_ids"][last] == llm.tokenizer.eos_token_id
        assert row["qformer_input_ids"][0] == qformer.tokenizer.cls_token_id
    assert json.loads(rows["s15"]["metadata"]) == {"url": "http://example.invalid/15.jpg"}


def test_manifest_describes_the_run(prepared):
    spec, manifest, out = prepared
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["totals"] == manifest["totals"]
    assert on_disk["spec"] == spec.model_dump(mode="json")
    assert on_disk["tokenizers"]["qformer"]["vocab_size"] == 30522
    assert on_disk["tokenizers"]["llm"]["vocab_size"] == 49152
    assert on_disk["run"]["samples_per_s"] > 0 and on_disk["run"]["wall_time_s"] > 0
    assert [s["name"] for s in on_disk["shards"]] == ["00000", "00001", "00002"]


def test_rerun_skips_complete_shards_and_keeps_output(prepared):
    spec, manifest, out = prepared
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    again = run_prep(spec)
    assert again["run"]["shards_processed"] == 0 and again["run"]["shards_skipped"] == 3
    assert again["totals"] == manifest["totals"] and again["drops"] == manifest["drops"]
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before


def test_output_of_a_different_spec_is_refused(prepared):
    spec, _, _ = prepared
    changed = spec.model_copy(update={"image": spec.image.model_copy(update={"size": 48})})
    with pytest.raises(PrepError, match="different prep spec"):
        run_prep(changed)


def test_image_caption_dedup_keeps_copies_with_other_captions(ray_2cpus, tmp_path):
    image = jpeg_bytes(seed=3)
    write_tar(tmp_path / "raw" / "a.tar", [*sample_members("a0", "the same caption", image),
                                           *sample_members("a1", "another caption", image)])
    write_tar(tmp_path / "raw" / "b.tar", sample_members("b0", "the same   caption", image))
    raw = bad_corpus_spec([str(tmp_path / "raw" / "*.tar")], str(tmp_path / "out"))
    raw["prep"]["filters"]["dedup"] = "image_caption"
    raw["prep"]["tokenizers"].pop("llm")
    manifest = run_prep(_prep_spec(raw))
    assert manifest["drops"] == {"duplicate": 1}
    kept = pq.read_table(tmp_path / "out" / "a.parquet").column("key").to_pylist()
    assert kept == ["a0", "a1"] and pq.read_metadata(tmp_path / "out" / "b.parquet").num_rows == 0


def test_shard_is_durable_before_its_stats_file_marks_it_complete(tmp_path, monkeypatch):
    import os

    from pipeline.data.processor import ShardProcessor
    from pipeline.data.shards import plan_tasks
    from pipeline.io import storage
    from pipeline.io.storage import Location

    write_tar(tmp_path / "raw" / "a.tar", sample_members("a0", "a red square", jpeg_bytes(seed=1)))
    raw = bad_corpus_spec([str(tmp_path / "raw" / "a.tar")], str(tmp_path / "out"))
    raw["prep"]["filters"]["dedup"] = "none"
    raw["prep"]["tokenizers"].pop("llm")
    spec = _prep_spec(raw)
    [task] = plan_tasks([Location.of(str(tmp_path / "raw" / "a.tar"))], Location.of(spec.output))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    ShardProcessor(spec).process(task)
    data, marker = events.index(("replace", "a.parquet")), events.index(("replace", "a.stats.json"))
    assert events[data - 1][0] == "fsync" and events[data - 1][1].startswith("a.parquet.tmp-")
    assert events[data + 1] == ("fsync", "out")  # the rename itself is durable ...
    assert data + 1 < marker  # ... before the marker is written
    assert events[marker - 1][1].startswith("a.stats.json.tmp-") and events[marker + 1] == ("fsync", "out")
    provenance = events.index(("replace", "a.parquet"), data + 1)  # provenance/a.parquet
    assert events[provenance + 1] == ("fsync", "provenance") and provenance < marker
