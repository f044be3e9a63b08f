"""TensorBoard event files in a local or ``s3://`` folder, so that ``tensorboard --logdir``
shows a run while it trains.

Locally the writer writes into the folder itself. Object stores have no append, so there the
event file is written in a local temporary folder and uploaded whole (one PUT, which replaces
the object at once) every ``upload_every_s`` seconds and at :meth:`EventLog.flush` and
:meth:`EventLog.close`; TensorBoard reads ``s3://`` log dirs itself (``S3_ENDPOINT`` for an
S3-compatible endpoint).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time

from pipeline.io.storage import Location, storage_errors


class EventLog:
    """One TensorBoard writer for a folder.

    Args:
        folder: Where the event files go (local or ``s3://``).
        purge_step: Hide events of this step and later that earlier writers left in the folder
            (a run resumed from a checkpoint logs those steps again).
        upload_every_s: For object storage: seconds between uploads while logging.
    """

    def __init__(self, folder: Location, *, purge_step: int | None = None, upload_every_s: float = 30.0):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self._temporary = None if folder.is_local else tempfile.mkdtemp(prefix="qformer-tensorboard-")
        local = folder.filesystem()[1] if folder.is_local else self._temporary
        self._writer = SummaryWriter(log_dir=local, purge_step=purge_step, flush_secs=5)
        self._upload_every_s = upload_every_s
        self._uploaded_at = time.monotonic()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log ``values`` (tag: number) at ``step``."""
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)
        if self._temporary and time.monotonic() - self._uploaded_at >= self._upload_every_s:
            self.flush()

    def image(self, tag: str, png: bytes, step: int) -> None:
        """Log a PNG image at ``step``."""
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))  # (H, W, 3) uint8
        self._writer.add_image(tag, pixels, step, dataformats="HWC")

    def flush(self) -> None:
        """Write out what is logged (uploaded, for object storage)."""
        self._writer.flush()
        if self._temporary:
            self._upload()

    def close(self) -> None:
        self._writer.close()
        if self._temporary:
            self._upload()
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None

    def _upload(self) -> None:
        fs, path = self.folder.filesystem()
        with storage_errors(self.folder.url):
            for name in os.listdir(self._temporary):
                fs.put_file(os.path.join(self._temporary, name), f"{path}/{name}")
        self._uploaded_at = time.monotonic()
