"""Views for the questions users ask the catalog most; plain SQL that runs on SQLite and PostgreSQL."""

from __future__ import annotations

VIEWS: dict[str, str] = {
    # How many usable images each source gave, per label.
    "images_by_source": """
        SELECT s.kind AS source_kind, s.reference AS source, i.label, i.status,
               COUNT(*) AS images, SUM(i.bytes) AS bytes
        FROM images i JOIN sources s ON s.id = i.source_id
        GROUP BY s.kind, s.reference, i.label, i.status
    """,
    # Synthetic images with the prompt and the generation parameters that made them.
    "synthetic_images": """
        SELECT i.sha256, i.path, i.provenance, i.width, i.height, i.format,
               p.text AS prompt, p.negative_text AS negative_prompt, p.method AS prompt_method,
               g.model_id, g.model_revision, g.model_hash, g.pipeline_class, g.scheduler_class,
               g.steps, g.guidance, g.seed, g.dtype, g.device, g.duration_s, g.flow_run_id
        FROM images i
        LEFT JOIN generations g ON g.image_id = i.id
        LEFT JOIN prompts p ON p.id = COALESCE(g.prompt_id, i.prompt_id)
        WHERE i.label = 'synthetic'
    """,
    # Synthetic images we cannot fully regenerate or explain.
    "incomplete_provenance": """
        SELECT i.sha256, i.path, i.original_name, s.kind AS source_kind, s.reference AS source,
               CASE WHEN i.prompt_id IS NULL AND g.id IS NULL THEN 'no prompt'
                    WHEN g.id IS NULL THEN 'prompt only'
                    ELSE 'generation incomplete' END AS missing
        FROM images i
        JOIN sources s ON s.id = i.source_id
        LEFT JOIN generations g ON g.image_id = i.id
        WHERE i.label = 'synthetic' AND (g.id IS NULL OR COALESCE(i.provenance, '') <> 'complete')
    """,
    # Quarantine records grouped by reason.
    "rejections_by_reason": """
        SELECT s.kind AS source_kind, s.reference AS source, r.reason, COUNT(*) AS files
        FROM rejections r JOIN sources s ON s.id = r.source_id
        GROUP BY s.kind, s.reference, r.reason
    """,
}


def create_view_sql(name: str) -> str:
    return f"CREATE VIEW {name} AS {VIEWS[name].strip()}"


def drop_view_sql(name: str) -> str:
    return f"DROP VIEW IF EXISTS {name}"
