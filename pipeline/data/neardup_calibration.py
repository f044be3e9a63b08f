"""``qformer prep SPEC --calibrate-near-duplicates``: which hash length and threshold suit a corpus.

Samples images from the spec's own inputs (shards in a seeded random order, a seeded random
subset of each shard read), reads them with prep's reader and image checks, makes one copy of
each the way copies appear on the web (:func:`make_copy`: 5% cropped off two sides, resized to
80%, re-encoded at JPEG quality 60, optionally mirrored) and hashes originals and copies with
prep's hasher (``pipeline.data.phash``) at every hash length. For each length and threshold:

- ``recall``: the share of copies within the threshold of their original (prep drops them);
- ``pair_fpr``: the share of pairs of distinct originals within the threshold;
- ``originals_lost``: the share of originals within the threshold of an earlier original in the
  sample, which prep would drop as near duplicates of each other. Copies already in the corpus
  count here too, so this is an upper bound on what a setting loses.

The setting chosen meets both targets (recall, originals lost) in the middle of the widest
range of thresholds, relative to the hash length, that meets them: the farthest from both edges.
The search compares every pair, as prep does with ``bands: null``.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from pipeline.console import console
from pipeline.data.images import ImageTransform, to_rgb
from pipeline.data.phash import ImageHasher, as_words, decode_for_hash, hamming
from pipeline.data.screen import ShardReadInfo, content_hash, screen_shard
from pipeline.errors import UsageError
from pipeline.io.pictures import write_png
from pipeline.io.storage import Location, expand_inputs, storage_errors, write_bytes_atomic
from pipeline.spec.prep import NearDupSpec, PrepSpec


@dataclass(frozen=True)
class CopyRecipe:
    """How a copy of an image is made: the edits images pick up as they are re-posted."""

    crop: float = 0.05
    """Share of the width cut off the left or the right, and of the height off the top or the
    bottom (each side picked at random)."""
    scale: float = 0.8
    """The cropped image's sides are resized to this share."""
    jpeg_quality: int = 60
    """Quality of the JPEG the copy is encoded as."""
    mirror: bool = False
    """Mirror the copy left to right."""


def make_copy(image: Image.Image, rng: random.Random, recipe: CopyRecipe = CopyRecipe()) -> bytes:
    """A copy of a decoded image as JPEG bytes (``recipe``; the cut sides are drawn from ``rng``)."""
    image = to_rgb(image)
    width, height = image.size
    cut_w, cut_h = round(width * recipe.crop), round(height * recipe.crop)
    left = cut_w if rng.random() < 0.5 else 0
    top = cut_h if rng.random() < 0.5 else 0
    image = image.crop((left, top, left + width - cut_w, top + height - cut_h))
    image = image.resize((max(1, round(image.width * recipe.scale)), max(1, round(image.height * recipe.scale))),
                         Image.Resampling.BICUBIC)
    if recipe.mirror:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=recipe.jpeg_quality)
    return encoded.getvalue()


@dataclass(frozen=True)
class CalibrationRequest:
    """What to measure and what to aim for."""

    samples: int = 500
    """Images sampled from the corpus (each gets one copy)."""
    seed: int = 0
    """Seeds the shard order, the images sampled and the sides the copies are cut on."""
    recipe: CopyRecipe = CopyRecipe()
    """How the copies are made."""
    target_recall: float = 0.9
    """Least share of the copies found."""
    max_originals_lost: float = 0.01
    """Most share of distinct originals dropped as near duplicates of each other."""
    bits: tuple[int, ...] | None = None
    """Hash lengths measured; None: every length the spec's algorithm makes."""


@dataclass
class Calibration:
    """The measured rates, and the setting chosen."""

    algorithm: str
    flips: bool
    images: int
    """Originals sampled (each with one copy)."""
    skipped: int
    """Images passed over: byte-identical to an earlier one, or an original or copy that prep's
    image checks drop (too small, undecodable)."""
    rows: list[dict] = field(default_factory=list)
    """Per hash length and threshold: ``bits``, ``threshold``, ``recall``, ``pair_fpr``,
    ``originals_lost``, ``meets``."""
    chosen: dict | None = None
    """``bits``, ``threshold``, the range of thresholds meeting the targets, and the rates; None
    when no setting meets them."""
    best: dict | None = None
    """Per hash length, the row of highest recall with at most the allowed originals lost."""


def lengths_of(algorithm: str) -> tuple[int, ...]:
    """The hash lengths ``algorithm`` makes (``NearDupSpec.bits``)."""
    return (64,) if algorithm == "phash" else (64, 128, 256)


def calibrate(spec: PrepSpec, request: CalibrationRequest) -> Calibration:
    """Sample, copy, hash and measure (see the module docstring).

    Raises:
        UsageError: the inputs match nothing, or fewer than two usable images were found.
        StorageError: the storage cannot be reached.
    """
    near = spec.filters.near_duplicates
    flips = near.flips or request.recipe.mirror  # a mirrored copy is found only with flips on
    lengths = request.bits or lengths_of(near.algorithm)
    hashers = {bits: ImageHasher(NearDupSpec(enabled=True, algorithm=near.algorithm, bits=bits, threshold=0,
                                             flips=flips), spec.filters.image_formats) for bits in lengths}
    originals: dict[int, list] = {bits: [] for bits in lengths}
    copies: dict[int, list] = {bits: [] for bits in lengths}
    rng = random.Random(request.seed)
    images = ImageTransform(spec.filters, spec.image)
    seen: set[str] = set()
    skipped = 0
    progress = console().progress("calibrate: images", request.samples)
    for data in _sampled_images(spec, request.samples, rng):
        digest = content_hash(data, "", "image")
        pair = None if digest in seen else _hashed_with_copy(data, images, hashers, rng, request.recipe)
        seen.add(digest)
        if pair is None:
            skipped += 1
            continue
        for bits, (original, copy) in pair.items():
            originals[bits].append(original)
            copies[bits].append(copy)
        progress.update(len(originals[lengths[0]]), f"{skipped} skipped")
    progress.close()
    count = len(originals[lengths[0]])
    if count < 2:
        raise UsageError(f"{spec.inputs}: {count} usable images of {count + skipped} read ({skipped} byte-identical "
                         "to an earlier one, or they or their copies fail prep's image checks, e.g. "
                         f"min_side {spec.filters.min_side}); the calibration needs at least 2")
    result = Calibration(near.algorithm, flips, count, skipped)
    for bits in lengths:
        result.rows += _rates(bits, originals[bits], copies[bits], flips)
    for row in result.rows:
        row["meets"] = row["recall"] >= request.target_recall and row["originals_lost"] <= request.max_originals_lost
    result.chosen, result.best = _choose(result.rows, lengths, request.max_originals_lost)
    return result


def _sampled_images(spec: PrepSpec, count: int, rng: random.Random):
    """Encoded images of samples that pass prep's structural and caption checks: the shards in a
    random order, from each a random subset of what is still needed."""
    try:
        shards = expand_inputs(spec.inputs, spec.storage)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    rng.shuffle(shards)
    needed = count
    for shard in shards:
        if needed <= 0:
            return
        chosen: list[bytes] = []  # a reservoir of `needed` images of this shard
        with storage_errors(shard.url):
            for seen, sample in enumerate(s for s in screen_shard(shard, spec.filters, ShardReadInfo()) if s.drop is None):
                if len(chosen) < needed:
                    chosen.append(sample.raw.image)
                elif (slot := rng.randrange(seen + 1)) < needed:
                    chosen[slot] = sample.raw.image
        yield from chosen
        needed -= len(chosen)


def _hashed_with_copy(data: bytes, images: ImageTransform, hashers: dict[int, ImageHasher],
                      rng: random.Random, recipe: CopyRecipe) -> dict[int, tuple] | None:
    """Per hash length, the (hash, mirror hash) pairs of the image and of a copy of it, both as
    prep hashes them (through its image checks), or None when prep would not hash either."""
    decoded = []
    for make in (lambda: data, lambda: _copy_of(data, rng, recipe)):  # no copy of an image prep drops
        encoded = make()
        image = images.open(encoded) if encoded is not None else None
        if not isinstance(image, Image.Image):  # a drop reason: prep never hashes it
            return None
        with image:
            try:
                decoded.append(decode_for_hash(image))
            except Exception:  # whatever a decoder raises: prep drops the image as image_corrupt
                return None
    return {bits: (hasher.hash_pair(decoded[0]), hasher.hash_pair(decoded[1])) for bits, hasher in hashers.items()}


def _copy_of(data: bytes, rng: random.Random, recipe: CopyRecipe) -> bytes | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return make_copy(image, rng, recipe)
    except Exception:  # whatever a decoder raises
        return None


def _distances(a: list[tuple], b: list[tuple], flips: bool) -> np.ndarray:
    """(len(a), len(b)) Hamming distances; with flips, the least over the mirror hashes too (as
    prep compares an image's two hashes with another's two)."""
    first = [as_words([pair[0] for pair in a])] + ([as_words([pair[1] for pair in a])] if flips else [])
    second = [as_words([pair[0] for pair in b])] + ([as_words([pair[1] for pair in b])] if flips else [])
    least = np.full((len(a), len(b)), np.iinfo(np.int64).max, np.int64)
    for low in range(0, len(a), 256):  # rows in blocks: (256, len(b), words) at a time
        for x in first:
            for y in second:
                least[low : low + 256] = np.minimum(least[low : low + 256],
                                                    hamming(x[low : low + 256, None, :], y[None, :, :]))
    return least


def _rates(bits: int, originals: list[tuple], copies: list[tuple], flips: bool) -> list[dict]:
    count = len(originals)
    to_copy = np.array([_distances([o], [c], flips)[0, 0] for o, c in zip(originals, copies)])  # (N,)
    between = _distances(originals, originals, flips)  # (N, N)
    earlier = np.tril(np.ones((count, count), bool), k=-1)  # [i, j]: j before i
    pairs = between[earlier]  # (N (N - 1) / 2,)
    nearest_earlier = np.where(earlier, between, np.iinfo(np.int64).max).min(axis=1)[1:]  # (N - 1,)

    def share_within(distances: np.ndarray, total: int) -> np.ndarray:
        """(bits // 2,) share of ``total`` at distance <= each threshold."""
        counts = np.bincount(np.minimum(distances, bits), minlength=bits + 1)[: bits // 2]
        return np.cumsum(counts) / total

    recall = share_within(to_copy, count)
    pair_fpr = share_within(pairs, len(pairs))
    lost = share_within(nearest_earlier, count)
    return [{"bits": bits, "threshold": t, "recall": round(float(recall[t]), 4),
             "pair_fpr": round(float(pair_fpr[t]), 6), "originals_lost": round(float(lost[t]), 4)}
            for t in range(bits // 2)]


def _choose(rows: list[dict], lengths: tuple[int, ...], max_lost: float) -> tuple[dict | None, dict]:
    """The setting in the middle of the widest range (relative to the hash length) of thresholds
    that meet the targets, and per length the row of best recall within the loss allowed."""
    chosen, widest, best = None, -1.0, {}
    for bits in lengths:
        mine = [row for row in rows if row["bits"] == bits]
        allowed = [row for row in mine if row["originals_lost"] <= max_lost]
        if allowed:
            best[bits] = max(allowed, key=lambda row: (row["recall"], -row["threshold"]))
        meeting = [row["threshold"] for row in mine if row["meets"]]  # contiguous: both rates rise with it
        if meeting and (width := (meeting[-1] - meeting[0] + 1) / bits) > widest:
            middle = next(row for row in mine if row["threshold"] == (meeting[0] + meeting[-1]) // 2)
            chosen, widest = {**middle, "thresholds_meeting": [meeting[0], meeting[-1]]}, width
    return chosen, best


def output_folder(spec: PrepSpec, out: str | None) -> Location:
    """Where the report goes: ``out``, else ``neardup-calibration`` in the prep output folder."""
    return Location.of(out, spec.storage) if out else Location.of(spec.output, spec.storage).child("neardup-calibration")


def write_report(result: Calibration, request: CalibrationRequest, source: str, folder: Location) -> dict[str, str]:
    """``calibration.csv`` (every row), ``calibration.md`` (per length: the best recall within
    the loss allowed, the thresholds that meet the targets, then every ``bits // 16``-th
    threshold), ``calibration.json`` (request, counts, choice) and ``calibration.png`` (the
    curves); returns their URLs by kind."""
    columns = ["bits", "threshold", "recall", "pair_fpr", "originals_lost", "meets"]
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    targets = f"recall >= {request.target_recall}, originals lost <= {request.max_originals_lost}"
    summary = {"source": source, "request": asdict(request), "algorithm": result.algorithm,
               "flips": result.flips, "images": result.images, "skipped": result.skipped,
               "pairs": result.images * (result.images - 1) // 2, "targets": targets,
               "chosen": result.chosen, "best_within_loss": result.best}
    files = {"csv": folder.child("calibration.csv"), "md": folder.child("calibration.md"),
             "json": folder.child("calibration.json"), "png": folder.child("calibration.png")}
    write_bytes_atomic(files["csv"], table.getvalue().encode())
    write_bytes_atomic(files["md"], _markdown(result, summary).encode())
    write_bytes_atomic(files["json"], json.dumps(summary, indent=1).encode())
    _plot(result, request, source, files["png"])
    return {kind: location.url for kind, location in files.items()}


def describe_choice(result: Calibration, request: CalibrationRequest) -> str:
    """The chosen setting in one line, or why there is none."""
    if result.chosen is None:
        best = "; ".join(f"{bits} bits: {row['recall']:.3f} at threshold {row['threshold']}"
                         for bits, row in result.best.items())
        return (f"no hash length and threshold finds {request.target_recall:.0%} of the copies with at most "
                f"{request.max_originals_lost:.0%} of the originals lost (best recall within that loss: "
                f"{best or 'none'})")
    chosen = result.chosen
    low, high = chosen["thresholds_meeting"]
    return (f"bits: {chosen['bits']}, threshold: {chosen['threshold']} (thresholds {low}-{high} meet the targets), "
            f"flips: {str(result.flips).lower()}: recall {chosen['recall']:.3f}, originals lost "
            f"{chosen['originals_lost']:.3f}, distinct pairs within the threshold {chosen['pair_fpr']:.5f}")


def _markdown(result: Calibration, summary: dict) -> str:
    lines = [f"Near-duplicate calibration of `{summary['source']}`: {result.images} images, each with one copy "
             f"({_recipe_text(summary['request']['recipe'])}), {summary['pairs']} distinct pairs; "
             f"{result.algorithm}, flips {str(result.flips).lower()}, seed {summary['request']['seed']}; "
             f"{result.skipped} images skipped. Targets: {summary['targets']}.", "",
             "| bits | best recall with at most the loss allowed (threshold) | thresholds meeting the targets |",
             "|---:|---|---|"]
    for bits in sorted({row["bits"] for row in result.rows}):
        best = summary["best_within_loss"].get(bits)
        meeting = [row["threshold"] for row in result.rows if row["bits"] == bits and row["meets"]]
        best_text = f"{best['recall']:.3f} ({best['threshold']})" if best else "none"
        meeting_text = f"{meeting[0]}-{meeting[-1]}" if meeting else "none"
        lines.append(f"| {bits} | {best_text} | {meeting_text} |")
    chosen = result.chosen
    chosen_at = (chosen["bits"], chosen["threshold"]) if chosen else None
    lines += ["", f"Chosen: bits {chosen_at[0]}, threshold {chosen_at[1]}." if chosen else "Chosen: none.", "",
              "| bits | threshold | recall on copies | distinct pairs within | originals lost | meets |",
              "|---:|---:|---:|---:|---:|---|"]
    for row in result.rows:
        if row["threshold"] % max(1, row["bits"] // 16) == 0 or (row["bits"], row["threshold"]) == chosen_at:
            lines.append(f"| {row['bits']} | {row['threshold']} | {row['recall']:.3f} | {row['pair_fpr']:.5f} | "
                         f"{row['originals_lost']:.3f} | {'yes' if row['meets'] else ''} |")
    return "\n".join(lines) + "\n"


def _recipe_text(recipe: dict) -> str:
    return (f"{recipe['crop']:.0%} cropped off two sides, resized to {recipe['scale']:.0%}, JPEG quality "
            f"{recipe['jpeg_quality']}{', mirrored' if recipe['mirror'] else ''}")


def _plot(result: Calibration, request: CalibrationRequest, source: str, target: Location) -> None:
    """Left: recall on the copies (solid) and originals lost (dashed) against the threshold as a
    share of the hash length; right: recall against originals lost (the trade-off), with the
    corner that meets the targets shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates, tradeoff) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100)
    for bits in sorted({row["bits"] for row in result.rows}):
        mine = [row for row in result.rows if row["bits"] == bits]
        share = [row["threshold"] / bits for row in mine]
        line, = rates.plot(share, [row["recall"] for row in mine], label=f"{bits} bits: recall on copies")
        rates.plot(share, [row["originals_lost"] for row in mine], linestyle="--", color=line.get_color(),
                   label=f"{bits} bits: originals lost")
        tradeoff.plot([row["originals_lost"] for row in mine], [row["recall"] for row in mine],
                      color=line.get_color(), marker=".", markersize=3, label=f"{bits} bits")
    rates.axhline(request.target_recall, color="grey", linewidth=0.8)
    rates.axhline(request.max_originals_lost, color="grey", linewidth=0.8, linestyle="--")
    if result.chosen:
        chosen = result.chosen
        rates.plot([chosen["threshold"] / chosen["bits"]], [chosen["recall"]], "k*", markersize=12,
                   label=f"chosen: {chosen['bits']} bits, threshold {chosen['threshold']}")
        tradeoff.plot([chosen["originals_lost"]], [chosen["recall"]], "k*", markersize=12)
    rates.set_xlabel("threshold / hash bits")
    rates.set_ylabel("share")
    rates.set_title(f"{result.images} images of {source} and a copy of each")
    rates.grid(alpha=0.3)
    rates.legend(fontsize=7)
    tradeoff.fill_between([-0.01, request.max_originals_lost], request.target_recall, 1.02, color="green",
                          alpha=0.2, label="meets the targets")
    tradeoff.set_xlim(-0.01, 0.5)
    tradeoff.set_ylim(-0.02, 1.02)
    tradeoff.set_xlabel("originals lost")
    tradeoff.set_ylabel("recall on copies")
    tradeoff.set_title(f"{result.algorithm}, copies: {_recipe_text(asdict(request.recipe))}", fontsize=9)
    tradeoff.grid(alpha=0.3)
    tradeoff.legend(fontsize=7)
    figure.tight_layout()
    write_png(figure, target)
