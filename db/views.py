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


# Views over tables added after 0002 (which creates every view in VIEWS): each is created by the
# migration that adds its table (by name, never by looping over this dict).
LATER_VIEWS: dict[str, str] = {
    # What the served detector said, per day and model: volume, share flagged synthetic, and, where
    # callers knew the answer, how often the decision disagreed with it. Dates are UTC.
    "predictions_daily": """
        SELECT DATE(p.created_at) AS day, p.model_id, m.backbone, m.version,
               COUNT(*) AS predictions,
               SUM(CASE WHEN p.decision = 'synthetic' THEN 1 ELSE 0 END) AS flagged,
               AVG(CASE WHEN p.decision = 'synthetic' THEN 1.0 ELSE 0.0 END) AS flag_rate,
               AVG(p.score) AS mean_score,
               COUNT(p.label) AS labelled,
               SUM(CASE WHEN p.label IS NOT NULL AND p.label <> p.decision THEN 1 ELSE 0 END) AS disagreements
        FROM predictions p JOIN models m ON m.id = p.model_id
        GROUP BY DATE(p.created_at), p.model_id, m.backbone, m.version
    """,
}


def create_view_sql(name: str) -> str:
    return f"CREATE VIEW {name} AS {(VIEWS | LATER_VIEWS)[name].strip()}"


def drop_view_sql(name: str) -> str:
    return f"DROP VIEW IF EXISTS {name}"
