"""`facetrace generate` and `facetrace reproduce`: synthetic faces into the catalog, and proof that
each can be made again from its catalog rows.

Imports stay light: the flows (and Prefect, torch, diffusers) load inside the verbs.
"""

from __future__ import annotations

import argparse
import sys

from facetrace.cli.app import CLIError, print_json, print_table, verb


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate synthetic faces with a diffusion model into the catalog")
    p.add_argument("--count", type=int, required=True, metavar="N",
                   help="items 0..N-1 of this request; those already in the catalog are skipped")
    p.add_argument("--model", default="tiny", metavar="tiny|HUB_ID|PATH",
                   help="tiny (offline test pipeline, default), a Hugging Face hub id (e.g. "
                   "SG161222/Realistic_Vision_V1.4; 'default' = FACETRACE_DIFFUSION_MODEL), a diffusers folder "
                   "or a .safetensors/.ckpt checkpoint")
    p.add_argument("--revision", help="hub revision (branch, tag or commit; default main)")
    p.add_argument("--steps", type=int, metavar="S", help="denoising steps (default 3 for tiny, 25 otherwise)")
    p.add_argument("--size", type=int, metavar="PX", help="image side in pixels, a multiple of 8 "
                   "(default 64 for tiny, 512 otherwise)")
    p.add_argument("--batch-size", type=int, metavar="B", help="images per pipeline call (default 4; "
                   "halved automatically on CUDA out-of-memory)")
    p.add_argument("--seed", type=int, default=0, help="run seed: each image's seed derives from it and its index")
    p.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance (default 5 tiny, 7 otherwise)")
    p.add_argument("--style", choices=["simple", "descriptive"], default="simple", help="prompt style")
    p.add_argument("--llm", choices=["template", "openai", "auto"], default="template",
                   help="prompt writer (template: offline and reproducible)")
    p.add_argument("--negative-prompt", metavar="TEXT", help="negative prompt for every image (default none)")
    p.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best available)")

    p = sub.add_parser("reproduce", help="regenerate a synthetic image from its catalog rows and compare")
    p.add_argument("sha256", metavar="SHA256")
    p.add_argument("--device", help="regenerate on this device instead of the original one")
    p.add_argument("--format", choices=["table", "json"], default="table")


@verb("generate", runs_flows=True)
def cmd_generate(args: argparse.Namespace) -> int:
    from facetrace.flows.generate import generate_synthetic_faces
    from facetrace.tasks.prompts import PromptGenerationError
    from facetrace.tasks.synthesis import ModelUnavailable

    if args.count < 0:
        raise CLIError(f"--count must be zero or more, got {args.count}")
    try:
        result = generate_synthetic_faces(
            n=args.count, model=args.model, steps=args.steps, guidance=args.guidance, size=args.size,
            batch_size=args.batch_size, prompt_style=args.style, seed=args.seed, llm=args.llm,
            negative_prompt=args.negative_prompt, device=args.device, revision=args.revision,
        )
    except (ModelUnavailable, PromptGenerationError) as exc:
        raise CLIError(str(exc)) from None
    rows = [(k, result[k]) for k in ("requested", "skipped", "new", "duplicate", "flagged", "quarantined")]
    print_table(["outcome", "images"], rows, title=f"generate with {result['model']} "
                f"(request {result['request_key'][:12]})")
    if result["grid"]:
        print(f"contact sheet: {result['grid']}")
    return 0


@verb("reproduce", runs_flows=True)
def cmd_reproduce(args: argparse.Namespace) -> int:
    from facetrace.flows.reproduce import NotGenerated, reproduce_image
    from facetrace.tasks.synthesis import ModelUnavailable

    args.sha256 = args.sha256.strip().lower()  # pasted from a CSV or a terminal
    if len(args.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in args.sha256):
        raise CLIError(f"{args.sha256!r} is not a sha256 (64 hex digits)")
    try:
        result = reproduce_image(args.sha256, device=args.device)
    except (NotGenerated, ModelUnavailable) as exc:
        raise CLIError(str(exc)) from None
    if args.format == "json":
        print_json(result)
    else:
        print_table(["field", "value"], list(result.items()), title=f"reproduce {result['sha256'][:16]}")
    if result["match"]:
        print("reproduced exactly: same sha256")
    elif result["exact_expected"]:
        print(f"facetrace reproduce: not reproduced: the tiny pipeline on a CPU must give the same bytes "
              f"(max pixel difference {result['max_pixel_difference']})", file=sys.stderr)
        return 1
    else:
        print(f"reproduced approximately: max pixel difference {result['max_pixel_difference']}, "
              f"mean {result['mean_pixel_difference']}")
    return 0
