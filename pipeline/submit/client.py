"""The Ray Jobs client of ``qformer submit`` and ``qformer jobs``, and its one-line errors.

:func:`connect` checks that the address answers as a Ray dashboard before the Job Submission
SDK is built; :func:`sdk_errors` turns the SDK's exceptions (whose text can hold a server
traceback) into a :class:`SubmitError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Iterator

from pipeline.errors import EXIT_FAILED, EXIT_USAGE, QformerError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
"""Read when no address is given; Ray's own ``ray job`` command reads it too. (``RAY_ADDRESS``
is not read: in this project it names the GCS address that ``ray.init`` joins.)"""
CONNECT_TIMEOUT_S = 10.0


class SubmitError(QformerError):
    """A submission or job request that cannot be done; exit status 2 (bad arguments,
    unreachable or non-Ray address, unknown job) unless the error says 1 (a refused
    submission, a job that did not finish)."""

    exit_status = EXIT_USAGE


def dashboard_url(address: str | None) -> str:
    """``http://HOST:PORT`` of the Ray dashboard from ``address`` or ``$RAY_API_SERVER_ADDRESS``."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise SubmitError(f"no cluster address: give --address http://HEAD:8265 (the Ray "
                          f"dashboard) or set {ADDRESS_ENV}")
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"--address {address}: expected the Ray dashboard's http(s)://HOST:PORT")
    return address


def connect(address: str | None) -> "JobSubmissionClient":
    """A Job Submission client for the dashboard at ``address``, checked to answer.

    Raises:
        SubmitError: nothing answers there, it is not a Ray dashboard (exit status 2).
    """
    import requests

    url = dashboard_url(address)
    try:
        reply = requests.get(f"{url}/api/version", timeout=CONNECT_TIMEOUT_S)
    except requests.exceptions.Timeout:
        raise SubmitError(f"no answer from the Ray dashboard at {url} within "
                          f"{CONNECT_TIMEOUT_S:.0f} s") from None
    except requests.exceptions.RequestException as error:
        raise SubmitError(f"cannot reach the Ray dashboard at {url}: {_reason(error)}") from None
    try:
        version = reply.json()["ray_version"] if reply.ok else None
    except (ValueError, KeyError, TypeError):
        version = None
    if version is None:
        raise SubmitError(f"{url} is not a Ray dashboard (GET /api/version: HTTP "
                          f"{reply.status_code}); give the dashboard's address, port 8265 by default")
    from ray.job_submission import JobSubmissionClient

    # Our own lines say what is uploaded and when the log stream ends; the SDK's INFO lines
    # (and its DEBUG lines, which would show runtime_env values) stay quiet.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The SDK lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override an explicit address; the
    # address given here must win.
    with _without_env("RAY_ADDRESS", ADDRESS_ENV), sdk_errors(url):
        return JobSubmissionClient(url)


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def sdk_errors(client: "JobSubmissionClient | str", job_id: str | None = None) -> Iterator[None]:
    """Turn the Job Submission SDK's exceptions inside the block into one-line SubmitErrors.

    Args:
        client: the client (or the dashboard URL) the block talks to, named in the message.
        job_id: the job the block asks about: a 404 then means no such job.
    """
    import requests

    where = client if isinstance(client, str) else client.get_address()
    try:
        yield
    except SubmitError:
        raise
    except (requests.exceptions.RequestException, ConnectionError) as error:
        raise SubmitError(f"lost the Ray dashboard at {where}: {_reason(error)}") from None
    except RuntimeError as error:
        text = str(error)
        if job_id is not None and "status code 404" in text:
            raise SubmitError(f"no job {job_id} on the cluster at {where} "
                              "(qformer jobs list shows them)") from None
        if "already exists" in text:
            raise SubmitError(f"a job {job_id} already exists on the cluster at {where}; "
                              "submit again to get the next id", exit_status=EXIT_FAILED) from None
        raise SubmitError(f"the cluster at {where} refused the request: {_last_line(text)}",
                          exit_status=EXIT_FAILED) from None
    except (ValueError, TypeError) as error:  # the SDK checks runtime_env (pip, sizes) locally
        raise SubmitError(f"cannot submit to {where}: {_last_line(str(error))}") from None


def _reason(error: Exception) -> str:
    text = str(error)
    for hint in ("Connection refused", "Name or service not known", "No route to host",
                 "timed out", "Temporary failure in name resolution"):
        if hint in text:
            return hint.lower()
    return _last_line(text)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip(" .")]
    return (lines[-1] if lines else text.strip())[:300]
