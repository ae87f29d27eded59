"""`facetrace prompts`: write balanced face prompts (OpenAI or templates) into the catalog.

Imports stay light: the flow (and Prefect, openai) load inside the verb.
"""

from __future__ import annotations

import argparse

from facetrace.cli.app import CLIError, print_table, verb


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prompts", help="write face prompts for synthesis (OpenAI or offline templates)")
    p.add_argument("--count", type=int, required=True, metavar="N", help="how many prompts")
    p.add_argument("--style", choices=["simple", "descriptive"], default="simple",
                   help="simple: gender and age only (most realistic); descriptive: adds hair, eyes, skin tone")
    p.add_argument("--llm", choices=["openai", "template", "auto"], default="auto",
                   help="auto: OpenAI when OPENAI_API_KEY (or the Prefect Secret block openai-api-key) is set")
    p.add_argument("--seed", type=int, default=0, help="seed of the attribute mix and templates")
    p.add_argument("--model", metavar="M", help="OpenAI model (default FACETRACE_OPENAI_MODEL)")
    p.add_argument("--negative", metavar="TEXT", help="negative prompt for every face (default none)")


@verb("prompts", runs_flows=True)
def cmd_prompts(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import Prompt
    from facetrace.flows.prompts import write_prompts
    from facetrace.settings import get_settings
    from facetrace.tasks.prompts import PromptGenerationError

    if args.count < 1:
        raise CLIError(f"--count must be at least 1, got {args.count}")
    try:
        ids = write_prompts(count=args.count, style=args.style, llm=args.llm, seed=args.seed, model=args.model,
                            negative_text=args.negative)
    except PromptGenerationError as exc:
        raise CLIError(str(exc)) from None
    with session_scope(get_engine(get_settings().catalog_url)) as session:
        rows = session.scalars(select(Prompt).where(Prompt.id.in_(ids)).order_by(Prompt.id)).all()
        table = [(p.id, p.method, p.model or "", p.style, p.text) for p in rows]
    print_table(["id", "method", "model", "style", "prompt"], table, title=f"{len(table)} prompts stored")
    return 0
