"""Face prompts for the synthesis step: written offline from templates, or by an OpenAI chat model.

The original project found that *simple* prompts ("a face of a man", "a photo of a woman's face,
40 years old") gave the most realistic Stable Diffusion faces, and that negative prompts made them
worse; so "simple" is the default style and no negative prompt is set unless one is given.

Every batch is balanced over an attribute space (:data:`ATTRIBUTE_VALUES`): each value of each
attribute the style uses appears ``count // k`` or ``count // k + 1`` times, so a detector is not
trained on, say, three men for every woman. The LLM is told exactly which attribute mix to write;
whatever it returns off that mix, duplicated or malformed is dropped and asked for again.

The OpenAI API key is read from ``OPENAI_API_KEY`` or the Prefect Secret block ``openai-api-key``;
it goes to the client and nowhere else: not to a log line, a :class:`PromptSpec`, a task
parameter, the catalog, or an exception message.

Plain functions do the work (testable without Prefect); :data:`generate_prompts` and
:data:`store_prompts` are their Prefect tasks, with retries declared on the decorator.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the attribute space

Gender = Literal["man", "woman"]
AgeBand = Literal["20s", "30s", "40s", "50s", "60s", "70s"]
Hair = Literal["black", "brown", "blond", "red", "grey", "bald"]
Eyes = Literal["brown", "blue", "green", "hazel", "grey"]
SkinTone = Literal["pale", "light", "medium", "olive", "brown", "dark"]

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "gender": Gender.__args__,
    "age_band": AgeBand.__args__,
    "hair": Hair.__args__,
    "eyes": Eyes.__args__,
    "skin_tone": SkinTone.__args__,
}
# Which attributes a style puts into the text: a simple prompt names only who and how old.
STYLE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "simple": ("gender", "age_band"),
    "descriptive": ("gender", "age_band", "hair", "eyes", "skin_tone"),
}
STYLES = tuple(STYLE_ATTRIBUTES)
# Stable Diffusion's CLIP text encoder reads 77 tokens and silently drops the rest.
MAX_DESCRIPTION_CHARS = 300
SECRET_BLOCK = "openai-api-key"
# Faces asked for in one chat completion: enough to be cheap, few enough to fit the output budget.
FACES_PER_REQUEST = 20


class PromptGenerationError(RuntimeError):
    """Prompts could not be written (malformed LLM output, refused key, bad request...)."""


class LLMUnavailableError(PromptGenerationError):
    """The LLM stayed unreachable (429, 5xx, timeouts) after the client's retries: worth retrying later."""


class FaceAttributes(BaseModel):
    """Who the face is. ``None`` means the prompt does not say (a simple prompt names no hair colour)."""

    # Unknown extra keys are ignored: strict mode never sends them, and JSON mode's extras are harmless.
    model_config = ConfigDict(extra="ignore", frozen=True)

    gender: Gender
    age_band: AgeBand
    hair: Hair | None = None
    eyes: Eyes | None = None
    skin_tone: SkinTone | None = None

    def specified(self) -> dict[str, str]:
        """The attributes the prompt states (a description's text is not an attribute)."""
        return {k: getattr(self, k) for k in FaceAttributes.model_fields if getattr(self, k) is not None}


class FaceDescription(FaceAttributes):
    """One face the LLM wrote: its attributes and the prompt text."""

    description: str

    @field_validator("description")
    @classmethod
    def _one_usable_line(cls, text: str) -> str:
        text = " ".join(text.split())
        if not text:
            raise ValueError("description is empty")
        if len(text) > MAX_DESCRIPTION_CHARS:
            raise ValueError(f"description is {len(text)} characters, over {MAX_DESCRIPTION_CHARS}")
        return text


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and how it was made; becomes one ``prompts`` row."""

    text: str
    negative_text: str | None
    method: str  # "llm" | "template"
    style: str  # "simple" | "descriptive"
    model: str | None
    template: str | None
    seed: int | None
    parameters: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)


def _check_request(count: int, style: str) -> None:
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if style not in STYLE_ATTRIBUTES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {', '.join(STYLES)}")


def balanced_attributes(count: int, style: str = "simple", seed: int = 0) -> list[dict[str, str]]:
    """``count`` attribute sets where each value of each attribute of ``style`` appears
    ``count // k`` or ``count // k + 1`` times; which values get the extra one, and the order,
    follow ``seed``."""
    _check_request(count, style)
    rng = random.Random(f"attributes:{seed}")
    columns: dict[str, list[str]] = {}
    for name in STYLE_ATTRIBUTES[style]:
        values = list(ATTRIBUTE_VALUES[name])
        rng.shuffle(values)  # which values get the remainder
        column = [values[i % len(values)] for i in range(count)]
        rng.shuffle(column)  # independent columns: combinations vary
        columns[name] = column
    return [{name: column[i] for name, column in columns.items()} for i in range(count)]


def normalized_text(text: str) -> str:
    """The form two prompts are compared in: case, spacing and a final full stop do not count."""
    return " ".join(text.casefold().split()).rstrip(".")


# ---------------------------------------------------------------- templates (offline)

SIMPLE_TEMPLATES: tuple[str, ...] = (
    "a face of a {person}, {age} years old",
    "a photo of a {person}'s face, {age} years old",
    "a photo of the face of a {age} year old {person}",
    "a close-up photo of a {person}'s face, {age} years old",
    "a portrait photo of a {age} year old {person}",
)
DESCRIPTIVE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {age} year old {person} with {hair}, {eyes} eyes and {skin_tone} skin",
    "a photo of a {person}'s face, {age} years old, {hair}, {eyes} eyes, {skin_tone} skin",
    "a close-up portrait of a {person} with {skin_tone} skin, {eyes} eyes and {hair}, {age} years old",
)
TEMPLATES = {"simple": SIMPLE_TEMPLATES, "descriptive": DESCRIPTIVE_TEMPLATES}


def _render(template: str, attributes: dict[str, str], age: int) -> str:
    hair = attributes.get("hair")
    return template.format(
        person=attributes["gender"], age=age,
        hair="a bald head" if hair == "bald" else f"{hair} hair",
        eyes=attributes.get("eyes"), skin_tone=attributes.get("skin_tone"),
    )


def template_prompts(count: int, style: str = "simple", seed: int = 0, *,
                     negative_text: str | None = None) -> list[PromptSpec]:
    """``count`` distinct prompts from templates, balanced over the style's attributes; the same
    ``seed`` gives the same prompts. Raises ``ValueError`` when the templates cannot make that many
    distinct texts for the balanced attribute mix."""
    wanted = balanced_attributes(count, style, seed)
    templates = TEMPLATES[style]
    rng = random.Random(f"template:{style}:{seed}")
    seen: set[str] = set()
    specs: list[PromptSpec] = []
    for index, attributes in enumerate(wanted):
        decade = int(attributes["age_band"][:2])
        # Each face's variants (exact age x template) in a seeded order: the first unused one wins.
        variants = [(age, t) for age in range(decade, decade + 10) for t in range(len(templates))]
        rng.shuffle(variants)
        for age, t in variants:
            text = _render(templates[t], attributes, age)
            if normalized_text(text) not in seen:
                break
        else:
            raise ValueError(
                f"the {style} templates cannot write {count} distinct prompts: every variant for "
                f"{attributes} is used; ask for fewer or use the descriptive style"
            )
        seen.add(normalized_text(text))
        specs.append(PromptSpec(
            text=text, negative_text=negative_text, method="template", style=style, model=None,
            template=templates[t], seed=seed, parameters={"index": index, "age": age, "template_index": t},
            attributes={**attributes, "age": age},
        ))
    return specs


# ---------------------------------------------------------------- the OpenAI API key

def _prefect_api_reachable() -> bool:
    """Only look up blocks where an API already is: otherwise Prefect would start a local server."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url or FlowRunContext.get() or TaskRunContext.get())


def openai_api_key() -> str | None:
    """``OPENAI_API_KEY``, else the Prefect Secret block ``openai-api-key``, else None."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if key:
        return key
    if not _prefect_api_reachable():
        return None
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(SECRET_BLOCK).get()
    except Exception as exc:  # noqa: BLE001 - no block, no server, wrong type: all mean "no key"
        log.debug("no usable Prefect Secret block %r (%s)", SECRET_BLOCK, type(exc).__name__)
        return None
    return str(value).strip() or None


_KEY_PATTERN = re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}")


def _redact(text: str, api_key: str | None) -> str:
    """A server message with the key (or anything shaped like one) blanked out."""
    if api_key:
        text = text.replace(api_key, "***")
    return _KEY_PATTERN.sub("sk-***", text)


def _public_endpoint(url: str) -> str:
    """The API base without credentials or query: safe to record as provenance."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


# ---------------------------------------------------------------- the LLM

SYSTEM_PROMPT = """You write text prompts for Stable Diffusion that produce realistic photos of \
human faces, used to train a detector of AI-generated faces. Photographers found that short, \
plain prompts give the most realistic faces, e.g. "a face of a man" or "a photo of a woman's face, \
40 years old"; do not add artistic styles, camera brands, quality tags or negative prompts.
Answer with JSON only, matching this JSON schema: {schema}"""

STYLE_INSTRUCTIONS = {
    "simple": "Each description is one short phrase (at most 12 words) naming only the gender and "
              "an age inside the face's age band, like \"a photo of a woman's face, 43 years old\".",
    "descriptive": "Each description is one sentence (at most 30 words) naming the gender, an age "
                   "inside the face's age band, the hair, the eye colour and the skin tone, like "
                   "\"a photo of a 52 year old man with grey hair, blue eyes and olive skin\".",
}


def face_list_schema(style: str) -> dict[str, Any]:
    """The strict JSON schema of an answer, ``{"faces": [...]}``, for ``style``'s attributes.

    Written out rather than derived from the pydantic models: OpenAI's strict mode wants every
    property required and ``additionalProperties: false``, and ignores length limits (pydantic
    checks those afterwards)."""
    properties: dict[str, Any] = {name: {"type": "string", "enum": list(ATTRIBUTE_VALUES[name])}
                                  for name in STYLE_ATTRIBUTES[style]}
    properties["description"] = {"type": "string", "description": "the Stable Diffusion prompt"}
    face = {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}
    return {"type": "object", "properties": {"faces": {"type": "array", "items": face}},
            "required": ["faces"], "additionalProperties": False}


def _request_message(wanted: Sequence[dict[str, str]], style: str) -> str:
    return (f"Write {len(wanted)} different face descriptions, one for each entry of faces_wanted, "
            f"in the same order and with exactly those attribute values. {STYLE_INSTRUCTIONS[style]} "
            f"No two descriptions may be the same.\n"
            + json.dumps({"faces_wanted": list(wanted)}))


def parse_faces(content: str | None) -> tuple[list[FaceDescription], list[str]]:
    """The valid faces in an answer and the problems with the rest.

    Raises ``ValueError`` when the answer as a whole is unusable (not JSON, no ``faces`` list, or
    no valid face at all): that is a malformed answer, worth asking again."""
    if not content or not content.strip():
        raise ValueError("empty answer")
    try:
        document = json.loads(content)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("faces"), list):
        raise ValueError('JSON is not an object with a "faces" list')
    faces, problems = [], []
    for i, item in enumerate(document["faces"]):
        try:
            faces.append(FaceDescription.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            problems.append(f"face {i}: {'.'.join(map(str, first['loc'])) or 'item'}: {first['msg']}")
    if not faces:
        raise ValueError("schema violation: " + ("; ".join(problems[:3]) if problems else "no faces"))
    return faces, problems


@dataclass
class _Conversation:
    """One OpenAI client and what a request needs; the key stays inside ``client``."""

    client: Any
    model: str
    style: str
    seed: int
    temperature: float
    response_format: str = "json_schema"
    requests: int = 0

    def ask(self, wanted: Sequence[dict[str, str]], feedback: tuple[str, str] | None) -> Any:
        """One chat completion for ``wanted`` faces; ``feedback`` = (bad answer, what was wrong)."""
        import openai

        schema = face_list_schema(self.style)
        messages: list[dict[str, str]] = [
            {"role": "system", "content": SYSTEM_PROMPT.format(schema=json.dumps(schema))},
            {"role": "user", "content": _request_message(wanted, self.style)},
        ]
        if feedback:
            bad, problem = feedback
            messages += [{"role": "assistant", "content": bad[:2000]},
                         {"role": "user", "content": f"That answer was unusable ({problem}). "
                                                     "Answer again with JSON only, matching the schema."}]
        while True:
            fmt: dict[str, Any] = (
                {"type": "json_schema", "json_schema": {"name": "face_list", "strict": True, "schema": schema}}
                if self.response_format == "json_schema" else {"type": "json_object"}
            )
            self.requests += 1
            try:
                return self.client.chat.completions.create(
                    model=self.model, messages=messages, response_format=fmt,
                    temperature=self.temperature, seed=self.seed + self.requests - 1,
                )
            except openai.BadRequestError as exc:
                # Older models (gpt-3.5-turbo among them) have JSON mode but no structured outputs.
                if self.response_format == "json_schema" and "response_format" in str(exc.message):
                    log.info("%s has no structured outputs; asking in JSON mode", self.model)
                    self.response_format = "json_object"
                    continue
                raise


def _api_failure(exc: Exception, model: str, max_retries: int, api_key: str) -> PromptGenerationError:
    """The openai exception as one of ours, with a message that cannot carry the key."""
    import openai

    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return PromptGenerationError(
            f"OpenAI refused the API key (HTTP {exc.status_code}); check OPENAI_API_KEY or the "
            f"Prefect Secret block {SECRET_BLOCK!r}")
    if isinstance(exc, openai.RateLimitError) and getattr(exc, "code", None) == "insufficient_quota":
        return PromptGenerationError("OpenAI quota exhausted (HTTP 429 insufficient_quota); check billing")
    message = _redact(getattr(exc, "message", None) or str(exc), api_key)
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                        openai.InternalServerError)):
        return LLMUnavailableError(
            f"OpenAI {model} still unavailable after {max_retries} retries: {type(exc).__name__}: {message}")
    status = getattr(exc, "status_code", "?")
    return PromptGenerationError(f"OpenAI {model} answered HTTP {status}: {message}")


def openai_prompts(
    count: int,
    style: str = "simple",
    model: str = "gpt-3.5-turbo",
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    seed: int = 0,
    max_malformed: int = 3,
    max_retries: int = 4,
    timeout: float = 30.0,
    temperature: float = 1.0,
    negative_text: str | None = None,
) -> list[PromptSpec]:
    """``count`` distinct prompts written by an OpenAI chat model, balanced like the templates.

    429, 5xx and timeouts are retried by the openai client (``max_retries``, exponential backoff
    from 0.5 s, honouring ``Retry-After``). A malformed answer (not JSON, off the schema, or with
    nothing usable) is asked again with the problem pointed out, at most ``max_malformed`` times;
    then :class:`PromptGenerationError`. Off-mix and duplicate faces are dropped and the missing
    ones asked for again.
    """
    import openai

    _check_request(count, style)
    api_key = api_key or openai_api_key()
    if not api_key:
        raise PromptGenerationError(
            f"no OpenAI API key: set OPENAI_API_KEY or the Prefect Secret block {SECRET_BLOCK!r}")
    wanted = balanced_attributes(count, style, seed)
    keys = STYLE_ATTRIBUTES[style]
    slots: list[FaceDescription | None] = [None] * count
    provenance: list[dict[str, Any]] = [{} for _ in range(count)]
    seen: set[str] = set()
    malformed = 0
    feedback: tuple[str, str] | None = None

    with openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout) as client:
        endpoint = _public_endpoint(str(client.base_url))
        talk = _Conversation(client, model, style, seed, temperature)
        while None in slots:
            missing = [i for i, face in enumerate(slots) if face is None][:FACES_PER_REQUEST]
            try:
                completion = talk.ask([wanted[i] for i in missing], feedback)
            except openai.OpenAIError as exc:
                raise _api_failure(exc, model, max_retries, api_key) from None
            choice = completion.choices[0] if completion.choices else None
            content = choice.message.content if choice else None
            try:
                if choice is not None and choice.message.refusal:
                    raise ValueError(f"the model refused: {choice.message.refusal}")
                if choice is not None and choice.finish_reason == "length":
                    raise ValueError("the answer was cut off at the token limit")
                faces, problems = parse_faces(content)
                placed = 0
                for face in faces:
                    attrs = face.specified()
                    slot = next((i for i in missing if slots[i] is None
                                 and all(attrs.get(k) == wanted[i][k] for k in keys)), None)
                    text_key = normalized_text(face.description)
                    if slot is None or text_key in seen:
                        problems.append("duplicate" if text_key in seen else f"off the asked mix: {attrs}")
                        continue
                    seen.add(text_key)
                    slots[slot] = face
                    provenance[slot] = {"response_id": completion.id, "request": talk.requests,
                                 "system_fingerprint": getattr(completion, "system_fingerprint", None)}
                    placed += 1
                if not placed:
                    raise ValueError("no usable face: " + "; ".join(problems[:3]))
            except ValueError as exc:
                malformed += 1
                log.warning("malformed answer %d from %s: %s", malformed, model, exc)
                if malformed > max_malformed:
                    got = sum(face is not None for face in slots)
                    raise PromptGenerationError(
                        f"OpenAI {model} gave malformed output {malformed} times "
                        f"(max_malformed={max_malformed}); last problem: {_redact(str(exc), api_key)}; "
                        f"got {got} of {count} faces") from None
                feedback = (content or "", str(exc))
                continue
            feedback = None
            if problems:
                log.info("dropped %d of %d faces from %s (%s); asking again for the missing",
                         len(problems), len(faces) + len(problems), model, "; ".join(problems[:3]))

    return [
        PromptSpec(
            text=face.description, negative_text=negative_text, method="llm", style=style, model=model,
            template=None, seed=seed, attributes=dict(wanted[i]),
            parameters={"temperature": temperature, "response_format": talk.response_format,
                        "api_base": endpoint, "index": i, **provenance[i]},
        )
        for i, face in enumerate(slots)
        if face is not None
    ]


# ---------------------------------------------------------------- choosing, storing

def make_prompts(count: int, style: str = "simple", llm: str = "auto", seed: int = 0,
                 model: str | None = None, base_url: str | None = None, *,
                 negative_text: str | None = None) -> list[PromptSpec]:
    """Prompts from ``llm``: "openai", "template", or "auto" (OpenAI when a key is configured)."""
    if llm not in ("auto", "openai", "template"):
        raise ValueError(f"unknown prompt writer {llm!r}; expected auto, openai or template")
    _check_request(count, style)
    api_key = openai_api_key() if llm != "template" else None
    if llm == "openai" or (llm == "auto" and api_key):
        from facetrace.settings import get_settings

        return openai_prompts(count, style, model or get_settings().openai_model, api_key=api_key,
                              base_url=base_url, seed=seed, negative_text=negative_text)
    return template_prompts(count, style, seed, negative_text=negative_text)


def save_prompts(session: Session, specs: Sequence[PromptSpec], flow_run_id: str | None = None) -> list[int]:
    """One ``prompts`` row per spec; their ids, in order.

    Template prompts are pure functions of (template, seed), so an identical row is reused: writing
    the same template prompts again (a re-run of a flow) adds nothing. LLM answers are always new rows.
    """
    from sqlalchemy import select

    from facetrace.db.models import Prompt

    ids: list[int] = []
    for s in specs:
        if s.method == "template":
            same = session.scalars(select(Prompt).where(
                Prompt.method == s.method, Prompt.text == s.text, Prompt.seed == s.seed, Prompt.style == s.style))
            match = next((row for row in same if (row.negative_text, row.template, row.model, row.parameters,
                          row.attributes) == (s.negative_text, s.template, s.model, dict(s.parameters),
                                              dict(s.attributes))), None)
            if match is not None:
                ids.append(match.id)
                continue
        row = Prompt(text=s.text, negative_text=s.negative_text, method=s.method, style=s.style, model=s.model,
                     template=s.template, seed=s.seed, parameters=dict(s.parameters), attributes=dict(s.attributes),
                     flow_run_id=flow_run_id)
        session.add(row)
        session.flush()
        ids.append(row.id)
    return ids


def load_prompts(session: Session, ids: Sequence[int]) -> dict[int, PromptSpec]:
    """Stored prompts by id, as specs (for generating from prompts written earlier)."""
    from sqlalchemy import select

    from facetrace.db.models import Prompt

    rows = {row.id: row for row in session.scalars(select(Prompt).where(Prompt.id.in_(list(ids))))}
    missing = sorted(set(ids) - set(rows))
    if missing:
        raise ValueError(f"prompt id(s) {missing} not in the catalog")
    return {i: PromptSpec(text=r.text, negative_text=r.negative_text, method=r.method, style=r.style or "simple",
                          model=r.model, template=r.template, seed=r.seed, parameters=dict(r.parameters or {}),
                          attributes=dict(r.attributes or {})) for i, r in rows.items()}


# ---------------------------------------------------------------- Prefect tasks

def _llm_outage(task: Any, task_run: Any, state: Any) -> bool:
    """Retry the task only when the LLM stayed unreachable through the client's own retries."""
    try:
        outcome = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable result is no reason to retry
        return False
    return isinstance(outcome, LLMUnavailableError)


# The openai client already retries each request with backoff; one more try a minute later rides
# out a longer outage without multiplying requests. The key is looked up inside, never a parameter.
generate_prompts = task(
    make_prompts, name="generate-prompts", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=60,
    retry_condition_fn=_llm_outage, timeout_seconds=900,
)


@task(name="store-prompts", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def store_prompts(specs: list[PromptSpec], catalog_url: str, flow_run_id: str | None = None) -> list[int]:
    """Write ``specs`` to the catalog at ``catalog_url`` in one transaction."""
    from facetrace.db.engine import get_engine, session_scope

    with session_scope(get_engine(catalog_url)) as session:
        return save_prompts(session, specs, flow_run_id)
