"""TensorBoard event files, read back with TensorBoard's own reader, locally and from S3."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from pipeline.io.storage import Location
from pipeline.io.tensorboard import EventLog
from tests.helpers import REPO, tensorboard_images, tensorboard_scalars


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def test_scalars_and_images_are_read_back_and_a_resume_hides_the_steps_it_repeats(tmp_path):
    first = EventLog(Location.of(str(tmp_path)))
    for step in range(1, 6):
        first.scalars(step, {"loss/total": 10.0 - step, "optim/lr": 1e-3})
    first.image("eval/sheet", _png(), 5)
    first.close()
    # Resumed from the checkpoint of step 3: steps 4 and 5 are trained (and logged) again.
    second = EventLog(Location.of(str(tmp_path)), purge_step=4)
    for step in (4, 5, 6):
        second.scalars(step, {"loss/total": 100.0 + step})
    second.close()

    scalars = tensorboard_scalars(str(tmp_path))
    assert scalars["loss/total"] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0), (6, 106.0)]
    assert [step for step, _ in scalars["optim/lr"]] == [1, 2, 3]
    assert tensorboard_images(str(tmp_path)) == {"eval/sheet": []}  # the image was at step 5: purged


@pytest.mark.slow  # TensorBoard reads S3 in a process of its own
def test_event_files_on_s3_are_uploaded_and_tensorboard_reads_them_there(s3_endpoint):
    import s3fs

    from pipeline.spec.storage import StorageSpec

    folder = Location.of("s3://test-bucket/tb/run/stage1", StorageSpec(endpoint_url=s3_endpoint))
    events = EventLog(folder, upload_every_s=0.0)
    events.scalars(1, {"loss/total": 3.0})
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    uploaded = fs.ls("test-bucket/tb/run/stage1")
    assert len(uploaded) == 1 and "events.out.tfevents" in uploaded[0], "uploaded while logging"
    events.scalars(2, {"loss/total": 2.0})
    events.image("eval/sheet", _png(), 2)
    events.close()

    # TensorBoard reads S3_ENDPOINT when it is imported, as `tensorboard --logdir s3://...` does.
    read = subprocess.run(
        [sys.executable, "-c", "import json, sys; from tests.helpers import tensorboard_scalars, "
         "tensorboard_images as images; url = sys.argv[1]; "
         "print(json.dumps([tensorboard_scalars(url), images(url)]))", "s3://test-bucket/tb/run/stage1"],
        env={**os.environ, "S3_ENDPOINT": s3_endpoint}, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr
    scalars, images = json.loads(read.stdout.splitlines()[-1])
    assert scalars == {"loss/total": [[1, 3.0], [2, 2.0]]} and images == {"eval/sheet": [2]}
