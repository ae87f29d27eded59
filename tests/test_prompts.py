"""Face prompts: balanced templates offline, and the real openai client against a local stand-in
of the Chat Completions API (rate limits, server errors, timeouts, malformed answers), with the API
key kept out of logs, prompts, the catalog, artifacts and error messages."""

from __future__ import annotations

import json
import logging
import traceback
from collections import Counter

import pytest
from sqlalchemy import select

from facetrace.tasks.prompts import (
    ATTRIBUTE_VALUES,
    MAX_DESCRIPTION_CHARS,
    STYLE_ATTRIBUTES,
    FaceDescription,
    LLMUnavailableError,
    PromptGenerationError,
    PromptSpec,
    balanced_attributes,
    make_prompts,
    openai_prompts,
    save_prompts,
    template_prompts,
)

try:  # pytest puts tests/ on sys.path (no __init__.py there); as a package it is tests.openai_standin
    from openai_standin import OpenAIStandIn, RecordedRequest, Reply
except ImportError:  # pragma: no cover
    from tests.openai_standin import OpenAIStandIn, RecordedRequest, Reply

API_KEY = "sk-test-SECRET-4f1c9a7e2b"
TRANSPORT_LOGGERS = ("openai", "httpx2", "httpx", "httpcore", "httpcore2", "facetrace", "prefect", "")


@pytest.fixture(autouse=True)
def no_openai_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test says itself whether a key or base URL is configured."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_LOG"):
        monkeypatch.delenv(name, raising=False)


def wanted_faces(request: RecordedRequest) -> list[dict[str, str]]:
    """The attribute mix the client asked for (the JSON after the instructions of the user message)."""
    user = next(m["content"] for m in request.messages if m["role"] == "user")
    return json.loads(user[user.index("{"):])["faces_wanted"]


def good_answer(request: RecordedRequest, tag: str = "") -> Reply:
    """What a well-behaved model answers: one face per wanted entry, with exactly its attributes."""
    faces = []
    for i, want in enumerate(wanted_faces(request)):
        age = int(want["age_band"][:2]) + i % 10
        extra = f" with {want['hair']} hair" if "hair" in want else ""
        faces.append({**want, "description": f"a photo of a {want['gender']}'s face{extra}, {age} years old{tag}"})
    return Reply.chat(json.dumps({"faces": faces}))


@pytest.fixture
def api():
    with OpenAIStandIn(responder=good_answer) as server:
        yield server


def ask(api: OpenAIStandIn, count: int = 6, **kwargs) -> list[PromptSpec]:
    options = {"api_key": API_KEY, "base_url": api.base_url, "timeout": 5.0} | kwargs
    return openai_prompts(count, **options)


def assert_balanced(specs: list[PromptSpec], style: str) -> None:
    for name in STYLE_ATTRIBUTES[style]:
        counts = Counter(s.attributes[name] for s in specs)
        per_value = [counts.get(v, 0) for v in ATTRIBUTE_VALUES[name]]
        assert max(per_value) - min(per_value) <= 1, (name, counts)


# ---------------------------------------------------------------- templates

@pytest.mark.parametrize("style", ["simple", "descriptive"])
def test_template_prompts_are_deterministic_balanced_and_distinct(style: str) -> None:
    specs = template_prompts(40, style, seed=7)
    assert specs == template_prompts(40, style, seed=7)
    assert [s.text for s in specs] != [s.text for s in template_prompts(40, style, seed=8)]
    assert len({s.text for s in specs}) == 40
    assert_balanced(specs, style)
    for spec in specs:
        assert spec.method == "template" and spec.style == style and spec.seed == 7
        assert spec.negative_text is None  # negative prompts made the original faces worse
        assert spec.template and spec.model is None
        assert spec.attributes["gender"] in spec.text and str(spec.attributes["age"]) in spec.text
        assert spec.attributes["age_band"] == f"{spec.attributes['age'] // 10 * 10}s"
        if style == "descriptive":
            assert spec.attributes["eyes"] in spec.text and spec.attributes["skin_tone"] in spec.text
        else:
            assert "hair" not in spec.attributes and "hair" not in spec.text


def test_simple_templates_read_like_the_prompts_that_worked() -> None:
    texts = {s.text for s in template_prompts(60, "simple", seed=0)}
    assert any(t.startswith("a face of a man") or t.startswith("a face of a woman") for t in texts)
    assert any("'s face, " in t and t.endswith("years old") for t in texts)
    assert all(len(t.split()) <= 12 for t in texts)


def test_template_prompts_take_a_negative_prompt_and_refuse_impossible_counts() -> None:
    assert {s.negative_text for s in template_prompts(3, negative_text="cartoon")} == {"cartoon"}
    with pytest.raises(ValueError, match="distinct prompts"):
        template_prompts(2 * 6 * 10 * 5 + 1, "simple")
    with pytest.raises(ValueError, match="style"):
        template_prompts(3, "baroque")
    with pytest.raises(ValueError, match="count"):
        template_prompts(0)


def test_balanced_attributes_spread_every_value_evenly() -> None:
    faces = balanced_attributes(15, "descriptive", seed=3)
    for name, values in ATTRIBUTE_VALUES.items():
        counts = Counter(f[name] for f in faces)
        assert set(counts) <= set(values)
        assert max(counts.values()) - min(counts.get(v, 0) for v in values) <= 1


def test_face_description_rejects_empty_long_and_unknown_values() -> None:
    ok = FaceDescription(gender="man", age_band="40s", description="  a face of a man,\n 41 years old ")
    assert ok.description == "a face of a man, 41 years old"
    for bad in ({"description": "   "}, {"description": "x" * (MAX_DESCRIPTION_CHARS + 1)},
                {"description": "a face", "gender": "robot"}, {"description": "a face", "hair": "purple"}):
        with pytest.raises(ValueError):
            FaceDescription.model_validate({"gender": "man", "age_band": "40s", **bad})


# ---------------------------------------------------------------- OpenAI through the stand-in

def test_openai_prompts_ask_for_a_balanced_mix_with_a_strict_schema(api: OpenAIStandIn) -> None:
    specs = ask(api, 6, style="descriptive", model="gpt-4o-mini", seed=5)

    assert len(api.requests) == 1
    sent = api.requests[0]
    assert sent.path == "/v1/chat/completions" and sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.body["model"] == "gpt-4o-mini" and sent.body["seed"] == 5
    fmt = sent.body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    item = fmt["json_schema"]["schema"]["properties"]["faces"]["items"]
    assert set(item["required"]) == {*STYLE_ATTRIBUTES["descriptive"], "description"}
    assert item["additionalProperties"] is False
    assert wanted_faces(sent) == balanced_attributes(6, "descriptive", seed=5)

    assert [s.attributes for s in specs] == balanced_attributes(6, "descriptive", seed=5)
    assert_balanced(specs, "descriptive")
    assert len({s.text for s in specs}) == 6
    assert {(s.method, s.style, s.model, s.seed, s.template, s.negative_text) for s in specs} == {
        ("llm", "descriptive", "gpt-4o-mini", 5, None, None)}
    assert specs[0].parameters["api_base"] == api.base_url
    assert specs[0].parameters["response_id"].startswith("chatcmpl-")


@pytest.mark.parametrize("failure", [Reply.error(429, "Rate limit reached"), Reply.error(500), Reply.error(503)])
def test_rate_limits_and_server_errors_are_retried(api: OpenAIStandIn, failure: Reply) -> None:
    specs = ask(api, 4)
    assert len(specs) == 4
    api.requests.clear()
    api.script(failure)
    specs = ask(api, 4, seed=1)
    assert len(specs) == 4
    assert [r.headers["x-stainless-retry-count"] for r in api.requests] == ["0", "1"]
    # The retry reuses the request: same idempotency key, same body.
    assert api.requests[0].body == api.requests[1].body


def test_a_timeout_is_retried(api: OpenAIStandIn) -> None:
    api.script(Reply.chat('{"faces": []}', delay=1.5))
    specs = ask(api, 3, timeout=0.4)
    assert len(specs) == 3 and len(api.requests) == 2


def test_retries_give_up_with_a_retryable_error(api: OpenAIStandIn) -> None:
    api.script(*[Reply.error(500)] * 3)
    with pytest.raises(LLMUnavailableError, match="after 2 retries.*InternalServerError"):
        ask(api, 3, max_retries=2)
    assert len(api.requests) == 3


def test_a_malformed_answer_is_asked_again_with_the_problem(api: OpenAIStandIn) -> None:
    api.script(Reply.chat("Sure! Here are your faces: {faces: ...}"))
    specs = ask(api, 4)
    assert len(specs) == 4 and len(api.requests) == 2
    retry = api.requests[1].messages
    assert retry[-2] == {"role": "assistant", "content": "Sure! Here are your faces: {faces: ...}"}
    assert "invalid JSON" in retry[-1]["content"]


@pytest.mark.parametrize("bad", [
    "not json at all",
    '{"faces": "none"}',
    '{"faces": [{"gender": "robot", "age_band": "40s", "description": "a robot"}]}',
    '{"faces": [{"gender": "man", "age_band": "40s", "description": ""}]}',
])
def test_always_malformed_output_fails_clearly(api: OpenAIStandIn, bad: str) -> None:
    api.responder = lambda request: Reply.chat(bad)
    with pytest.raises(PromptGenerationError) as caught:
        ask(api, 3, max_malformed=2)
    assert len(api.requests) == 3  # the first answer and two re-asks
    message = str(caught.value)
    assert "malformed output 3 times" in message and "max_malformed=2" in message and "got 0 of 3" in message


def test_refusals_and_cut_off_answers_count_as_malformed(api: OpenAIStandIn) -> None:
    api.script(Reply.chat(None, refusal="I can't help with that"), Reply.chat('{"faces": [', finish_reason="length"))
    assert len(ask(api, 2)) == 2
    assert len(api.requests) == 3


def test_duplicates_and_faces_off_the_mix_are_asked_for_again(api: OpenAIStandIn) -> None:
    def sloppy_then_good(request: RecordedRequest) -> Reply:
        if len(api.requests) > 1:
            return good_answer(request)
        # Every face a 20-year-old man with the same text: one fits the mix, the rest are dropped.
        faces = [{"gender": "man", "age_band": "20s", "description": "A face of a man, 25 years old."}
                 for _ in wanted_faces(request)]
        return Reply.chat(json.dumps({"faces": faces}))

    api.responder = sloppy_then_good
    specs = ask(api, 6)
    assert len(api.requests) == 2
    assert len(wanted_faces(api.requests[1])) == 5  # only the missing ones
    assert [s.attributes for s in specs] == balanced_attributes(6, "simple", 0)
    assert len({s.text.casefold().rstrip(".") for s in specs}) == 6


def test_large_counts_are_asked_in_batches(api: OpenAIStandIn) -> None:
    from facetrace.tasks.prompts import FACES_PER_REQUEST

    specs = ask(api, FACES_PER_REQUEST + 3, style="descriptive")
    assert [len(wanted_faces(r)) for r in api.requests] == [FACES_PER_REQUEST, 3]
    assert_balanced(specs, "descriptive")


def test_models_without_structured_outputs_fall_back_to_json_mode(api: OpenAIStandIn) -> None:
    api.script(Reply.error(400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported "
                                "with this model.", param="response_format"))
    specs = ask(api, 2, model="gpt-3.5-turbo")
    assert [r.body["response_format"]["type"] for r in api.requests] == ["json_schema", "json_object"]
    assert specs[0].parameters["response_format"] == "json_object"


def test_the_api_key_never_leaves_the_client(api: OpenAIStandIn, caplog: pytest.LogCaptureFixture,
                                             catalog_url: str) -> None:
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import Prompt

    for name in TRANSPORT_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    api.script(Reply.error(429), Reply.chat("{oops"), Reply.chat('{"faces": [], "key": "x"}', delay=1.0))
    specs = ask(api, 4, timeout=0.5)
    assert all(r.headers["authorization"] == f"Bearer {API_KEY}" for r in api.requests)  # it did reach the API

    # A rejected key, echoed back by the server the way OpenAI does, and a server error quoting it.
    api.script(Reply.error(401, f"Incorrect API key provided: {API_KEY}.", code="invalid_api_key"))
    with pytest.raises(PromptGenerationError) as refused:
        ask(api, 2)
    api.script(*[Reply.error(500, f"upstream rejected {API_KEY}")] * 2)
    with pytest.raises(LLMUnavailableError) as unavailable:
        ask(api, 2, max_retries=1)

    with session_scope(get_engine(catalog_url)) as session:
        save_prompts(session, specs)
    with session_scope(get_engine(catalog_url)) as session:
        rows = session.execute(select(Prompt.__table__)).all()

    assert any("Retrying request" in r.getMessage() for r in caplog.records)  # the loggers were listening
    places = {
        "logs": caplog.text + "".join(repr(r.args) for r in caplog.records),
        "prompt specs": repr(specs),
        "catalog rows": repr(rows),
        "errors": "".join(traceback.format_exception(refused.value) + traceback.format_exception(unavailable.value)),
    }
    for place, text in places.items():
        assert API_KEY not in text, f"the API key leaked into {place}"
    assert "refused the API key" in str(refused.value) and "***" in str(unavailable.value)


def test_no_key_means_a_clear_error_for_openai_and_templates_for_auto(api: OpenAIStandIn,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PromptGenerationError, match="no OpenAI API key"):
        make_prompts(2, llm="openai", base_url=api.base_url)
    assert {s.method for s in make_prompts(3, llm="auto")} == {"template"}
    assert not api.requests

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    specs = make_prompts(3, llm="auto", base_url=api.base_url, model="gpt-4o-mini")
    assert {(s.method, s.model) for s in specs} == {("llm", "gpt-4o-mini")}
    assert {s.method for s in make_prompts(3, llm="template")} == {"template"}
    assert len(api.requests) == 1
    with pytest.raises(ValueError, match="prompt writer"):
        make_prompts(1, llm="claude")


def test_only_an_llm_outage_retries_the_task() -> None:
    from prefect.states import Failed

    from facetrace.tasks.prompts import _llm_outage

    assert _llm_outage(None, None, Failed(data=LLMUnavailableError("down")))
    assert not _llm_outage(None, None, Failed(data=PromptGenerationError("malformed")))


# ---------------------------------------------------------------- catalog, flow, CLI

def test_save_prompts_round_trips(catalog_url: str) -> None:
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import Prompt

    specs = template_prompts(3, "descriptive", seed=2) + template_prompts(1, negative_text="blurry")
    with session_scope(get_engine(catalog_url)) as session:
        ids = save_prompts(session, specs, flow_run_id="run-1")
    assert len(set(ids)) == 4
    with session_scope(get_engine(catalog_url)) as session:
        rows = {p.id: p for p in session.scalars(select(Prompt))}
        for prompt_id, spec in zip(ids, specs):
            row = rows[prompt_id]
            assert (row.text, row.negative_text, row.method, row.style, row.model, row.template, row.seed) == (
                spec.text, spec.negative_text, spec.method, spec.style, spec.model, spec.template, spec.seed)
            assert row.parameters == spec.parameters and row.attributes == spec.attributes
            assert row.flow_run_id == "run-1" and row.created_at is not None


def test_write_prompts_flow_stores_prompts_and_an_artifact(prefect_harness, settings_env) -> None:
    from prefect.artifacts import Artifact

    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import Prompt
    from facetrace.flows.prompts import write_prompts

    ids = write_prompts(count=4, style="descriptive", llm="auto", seed=3)
    with session_scope(get_engine(settings_env.catalog_url)) as session:
        rows = session.scalars(select(Prompt).where(Prompt.id.in_(ids)).order_by(Prompt.id)).all()
    assert [r.text for r in rows] == [s.text for s in template_prompts(4, "descriptive", seed=3)]
    assert len({r.flow_run_id for r in rows}) == 1 and rows[0].flow_run_id
    artifact = Artifact.get("face-prompts")
    assert artifact is not None and rows[0].text in artifact.data


def test_write_prompts_flow_with_the_key_in_a_secret_block(prefect_harness, sqlite_settings_env, api,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.artifacts import Artifact
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from facetrace.flows.prompts import write_prompts

    monkeypatch.setenv("OPENAI_BASE_URL", api.base_url)  # the openai client's own setting
    Secret(value=API_KEY).save("openai-api-key", overwrite=True)
    try:
        state = write_prompts(count=3, llm="auto", model="gpt-4o-mini", return_state=True)
    finally:
        Secret.delete("openai-api-key")
    assert len(state.result()) == 3
    assert api.requests[0].headers["authorization"] == f"Bearer {API_KEY}"
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert API_KEY not in json.dumps(flow_run.parameters) + Artifact.get("face-prompts").data


def test_cli_prompts_prints_the_stored_prompts(prefect_harness, sqlite_settings_env, capsys) -> None:
    from facetrace.cli.app import main

    assert main(["prompts", "--count", "3", "--llm", "template", "--style", "simple", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "3 prompts stored" in out
    for spec in template_prompts(3, "simple", seed=4):
        assert spec.text in out

    assert main(["prompts", "--count", "2", "--llm", "openai"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("facetrace prompts: no OpenAI API key")
