"""Write face prompts (OpenAI or templates), store them in the catalog, and show them as an artifact."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from facetrace.flows.common import current_flow_run_id
from facetrace.settings import get_settings
from facetrace.tasks.prompts import PromptSpec, generate_prompts, store_prompts


def prompts_markdown(ids: list[int], specs: list[PromptSpec]) -> str:
    """A table of the stored prompts; how they were made, never with what key."""
    def cell(value: object) -> str:
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = [f"# {len(specs)} face prompts", "", "| id | method | model | style | attributes | prompt |",
             "|---:|---|---|---|---|---|"]
    for prompt_id, spec in zip(ids, specs):
        attrs = ", ".join(f"{k}={v}" for k, v in spec.attributes.items())
        lines.append(f"| {prompt_id} | {spec.method} | {cell(spec.model)} | {spec.style} | {cell(attrs)} "
                     f"| {cell(spec.text)} |")
    return "\n".join(lines)


@flow(name="write-prompts")
def write_prompts(count: int = 8, style: str = "simple", llm: str = "auto", seed: int = 0,
                  model: str | None = None, negative_text: str | None = None) -> list[int]:
    """Write ``count`` balanced face prompts and store them; their catalog ids.

    ``llm``: "openai", "template", or "auto" (OpenAI when OPENAI_API_KEY or the Prefect Secret
    block ``openai-api-key`` is set). The key is read inside the task, so it is never a flow or
    task parameter that Prefect would record.
    """
    logger = get_run_logger()
    settings = get_settings()
    specs = generate_prompts(count, style=style, llm=llm, seed=seed, model=model, negative_text=negative_text)
    ids = store_prompts(specs, settings.catalog_url, current_flow_run_id())
    methods = sorted({f"{s.method}:{s.model}" if s.model else s.method for s in specs})
    logger.info("stored %d %s prompts (%s)", len(ids), style, ", ".join(methods))
    create_markdown_artifact(prompts_markdown(ids, specs), key="face-prompts",
                             description=f"{len(ids)} {style} face prompts")
    return ids
