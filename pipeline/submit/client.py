"""The Ray Jobs client of ``qformer submit`` and ``qformer jobs``, and its one-line errors.

:func:`connect` checks that the address answers as a Ray dashboard before the Job Submission
SDK is built; :func:`sdk_errors` turns the SDK's exceptions (whose text can hold a server
traceback) into a :class:`SubmitError`.

Token authentication: a Ray cluster with ``RAY_AUTH_MODE=token`` on its nodes answers every
dashboard request without its token with HTTP 401, and one with a wrong token with 403. The
token is found where Ray's own clients look, by Ray's own loader (the one ``ray
get-auth-token`` uses), first set first: ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``
names, ``~/.ray/auth_token``. It is sent, in the header Ray's clients send (``Authorization:
Bearer ...``), only to a dashboard that asks for it, whatever ``RAY_AUTH_MODE`` says here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Iterator

from pipeline.errors import EXIT_FAILED, EXIT_USAGE, QformerError

if TYPE_CHECKING:
    import requests
    from ray.job_submission import JobSubmissionClient

ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
"""Read when no address is given; Ray's own ``ray job`` command reads it too. (``RAY_ADDRESS``
is not read: in this project it names the GCS address that ``ray.init`` joins.)"""
CONNECT_TIMEOUT_S = 10.0
TOKEN_SOURCES = "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH naming a file that holds it, or ~/.ray/auth_token"
"""Where Ray's clients look for the token, first set first (for messages)."""


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
    """A Job Submission client for the dashboard at ``address``, checked to answer; it sends
    this machine's Ray token if the dashboard asks for one.

    Raises:
        SubmitError: nothing answers there, it is not a Ray dashboard, or it wants a token
            that is missing here or that it refuses (exit status 2).
    """
    url = dashboard_url(address)
    headers: dict[str, str] = {}
    reply = _get_version(url, headers)
    if reply.status_code == 401:
        headers = token_headers() or {}
        if not headers:
            raise SubmitError(f"the Ray dashboard at {url} has token authentication and no Ray "
                              f"token was found here: set {TOKEN_SOURCES} (`ray get-auth-token` "
                              "on the head prints it)")
        reply = _get_version(url, headers)
        if reply.status_code in (401, 403):
            raise SubmitError(f"the Ray dashboard at {url} refused the Ray token found here "
                              f"(HTTP {reply.status_code}): it is not this cluster's token "
                              f"(looked in {TOKEN_SOURCES})")
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
        return JobSubmissionClient(url, headers=headers)


def _get_version(url: str, headers: dict[str, str]) -> "requests.Response":
    import requests

    try:
        return requests.get(f"{url}/api/version", headers=headers, timeout=CONNECT_TIMEOUT_S)
    except requests.exceptions.Timeout:
        raise SubmitError(f"no answer from the Ray dashboard at {url} within "
                          f"{CONNECT_TIMEOUT_S:.0f} s") from None
    except requests.exceptions.RequestException as error:
        raise SubmitError(f"cannot reach the Ray dashboard at {url}: {_reason(error)}") from None


def token_headers() -> dict[str, str] | None:
    """The HTTP headers that carry this machine's Ray token; None when it has none.

    Raises:
        SubmitError: ``$RAY_AUTH_TOKEN_PATH`` names a file that cannot be read or is empty
            (Ray treats that as an error, not as "no token").
    """
    from ray._private.authentication.authentication_constants import (
        AUTHORIZATION_BEARER_PREFIX, AUTHORIZATION_HEADER_NAME,
    )
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # it caches per process, and this process's environment may have changed
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None
        token = loader.get_raw_token(ignore_auth_mode=True)
    except AuthenticationError as error:
        raise SubmitError(f"cannot read the Ray token: {error.message.split('. ')[0]}") from None
    return {AUTHORIZATION_HEADER_NAME: AUTHORIZATION_BEARER_PREFIX + token}


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
    from ray.exceptions import AuthenticationError

    where = client if isinstance(client, str) else client.get_address()
    try:
        yield
    except SubmitError:
        raise
    except AuthenticationError as error:  # a dashboard that let connect() in, then did not
        raise SubmitError(f"the Ray dashboard at {where} refused the request: "
                          f"{error.message.splitlines()[0]}") from None
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
