"""Where a stage starts: ``model.qformer.init`` and each stage's ``init_from`` with its opt-ins."""

from __future__ import annotations

import pytest

from pipeline.spec import JobSpec, SpecError
from pipeline.spec.loader import validate_spec
from pipeline.spec.model import QFormerSpec


def _job(*stages: dict) -> dict:
    return {"run": {"name": "r"}, "data": {"prepared": "p"},
            "stages": [{"name": f"s{i}", "losses": {"itc": 1.0}, "steps": 1, "batch_size": 1, **stage}
                       for i, stage in enumerate(stages)]}


@pytest.mark.parametrize("source", ["s0", "runs/r/s0/step-00000001", "Salesforce/blip2-opt-2.7b",
                                    "blip2_pretrained.pth", "s3://bucket/blip2_pretrained.pth"])
def test_init_from_takes_stages_folders_hub_ids_and_pth_files(source):
    job = validate_spec(_job({}, {"init_from": source, "init_from_allow_missing": ["lm_head.*", "temp"]}), JobSpec)
    assert job.stages[1].init_from == source and job.stages[1].init_from_allow_missing == ["lm_head.*", "temp"]


def test_a_bare_name_that_is_no_earlier_stage_is_refused():
    with pytest.raises(SpecError, match=r"stages\.0\.init_from: 's1' is neither an earlier stage nor a path "
                                        r"\(a folder, a hub id or a \.pth file\)"):
        validate_spec(_job({"init_from": "s1"}, {}), JobSpec)


def test_opt_ins_need_something_to_load():
    with pytest.raises(SpecError, match=r"stages\.0\.init_from_allow_missing/unexpected: the first stage "
                                        "loads no weights without init_from"):
        validate_spec(_job({"init_from_allow_unexpected": ["*"]}), JobSpec)
    # A later stage starts from the previous one's result: its opt-ins apply to that.
    validate_spec(_job({}, {"init_from_allow_missing": ["*"]}), JobSpec)


def test_qformer_init_replaces_load_bert_weights():
    assert QFormerSpec().init == "bert"
    assert QFormerSpec.model_validate({"init": "random"}).init == "random"
    with pytest.raises(SpecError, match=r"model\.qformer\.load_bert_weights: unknown field"):
        validate_spec({**_job({}), "model": {"qformer": {"load_bert_weights": False}}}, JobSpec)
    with pytest.raises(SpecError, match=r"model\.qformer\.init: Input should be 'bert' or 'random'"):
        validate_spec({**_job({}), "model": {"qformer": {"init": "Salesforce/blip2-opt-2.7b"}}}, JobSpec)
