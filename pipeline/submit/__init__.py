"""``qformer submit`` and ``qformer jobs``: job specs as Ray Jobs on a (remote) Ray cluster.

``submit`` validates the spec here, with the loader every command uses, before the cluster is
contacted. It then copies the working dir (by default this repository) without data, runs, VCS
and caches into a staging folder, writes the resolved spec (overrides applied) into it as
``_qformer_submit/<submission id>.yaml``, and submits ``python -m pipeline train|prep <that
relative path>`` with the staging folder as the job's ``runtime_env`` ``working_dir``; Ray
uploads it to the cluster, so a remote cluster needs nothing from this machine's disk.

Credentials are best the cluster's own (instance roles, Kubernetes Secrets, service accounts):
nothing then travels with the job. ``--env`` values go into the job's ``runtime_env``: never
into the spec, never printed (only their names are), but the Jobs API and the dashboard show
``runtime_env`` to whoever can reach the cluster, and ``submit`` says so when they are used.
The uploaded working dir never holds ``.env`` files, keys, credential folders, or the contents
of links that point out of it.

Exit status (see ``pipeline.cli``): 0 success; 1 the job FAILED or was STOPPED, or the
submission was refused (a job of the run is active, or finished and ``--resume`` not given);
2 bad spec or arguments, unreachable or non-Ray address, unknown job id.

Modules: ``client`` (the connection to the dashboard, its token and its errors), ``staging`` (the uploaded
working dir), ``jobs`` (following, listing, stopping jobs), ``submission`` (``submit``).
"""

from pipeline.submit.client import SubmitError, connect
from pipeline.submit.jobs import follow, job_logs, job_status, list_jobs, stop_job, wait_until_finished
from pipeline.submit.submission import SubmitRequest, choose_submission_id, run_name, submit

__all__ = [
    "SubmitError", "SubmitRequest", "choose_submission_id", "connect", "follow", "job_logs",
    "job_status", "list_jobs", "run_name", "stop_job", "submit", "wait_until_finished",
]
