"""Serve every facetrace deployment from one process (a laptop set-up): `facetrace serve`.

For a shared server with work pools and workers, use ``prefect deploy --all`` with
``deployments/prefect.yaml`` instead; both describe the same five deployments.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from facetrace.settings import get_settings

INGESTED_EVENT = "facetrace.faces.ingested"


def inbox_dir() -> Path:
    """Drop new faces under inbox/real/ or inbox/synthetic/; the ingest schedule picks them up and
    moves each file to processed/ or rejected/ beside the inbox once it is recorded."""
    inbox = get_settings().data_dir.resolve() / "inbox"
    for label in ("real", "synthetic"):
        (inbox / label).mkdir(parents=True, exist_ok=True)
    return inbox


def retrain_trigger(events: int = 1, window_s: float = 0, min_new_faces: int = 50):
    """Start retraining on ingest events; the flow itself checks that >= min_new_faces are new."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="retrain-when-faces-arrive",
        expect={INGESTED_EVENT},
        # Only ingests that added faces: a re-scan of an unchanged inbox starts nothing.
        match={"prefect.resource.id": "facetrace.source.*", "facetrace.faces.arrived": "true"},
        posture="Reactive",
        threshold=events,
        within=dt.timedelta(seconds=window_s),
        parameters={"min_new_faces": min_new_faces},
    )


def build_deployments(
    *,
    inbox_interval_s: float | None = None,
    min_new_faces: int | None = None,
    trigger_events: int | None = None,
    trigger_window_s: float | None = None,
    train_epochs: int | None = None,
    train_image_size: int | None = None,
):
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    from facetrace.flows.generate import generate_synthetic_faces
    from facetrace.flows.ingest import ingest_faces
    from facetrace.flows.pipeline import facetrace_pipeline, retrain_on_new_faces
    from facetrace.flows.validate import validate_catalog

    s = get_settings()
    inbox_interval_s = inbox_interval_s or s.inbox_interval_s
    min_new_faces = s.retrain_min_new_faces if min_new_faces is None else min_new_faces
    trigger = retrain_trigger(trigger_events or s.retrain_trigger_events,
                              s.retrain_trigger_window_s if trigger_window_s is None else trigger_window_s,
                              min_new_faces)
    train_params = {"min_new_faces": min_new_faces, "epochs": train_epochs or s.train_epochs,
                    "image_size": train_image_size or s.image_size, "backbones": list(s.train_backbones)}
    return [
        ingest_faces.to_deployment(
            name="ingest-inbox", interval=dt.timedelta(seconds=inbox_interval_s),
            # Each file leaves the inbox once recorded: to processed/ or rejected/ beside it.
            parameters={"kind": "folder", "path": str(inbox_dir()), "archive_dir": str(inbox_dir().parent)},
            tags=["ingest"],
            # One scan of the inbox at a time: a scan still running when the next is due makes it skip.
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy="CANCEL_NEW"),
            description="Ingest new faces dropped into the inbox (inbox/real, inbox/synthetic).",
        ),
        generate_synthetic_faces.to_deployment(
            name="generate", tags=["gpu"], parameters={"n": 16},
            description="Generate synthetic faces (served locally on CPU; a GPU work pool in prefect.yaml).",
        ),
        validate_catalog.to_deployment(
            name="validate-nightly", cron="0 2 * * *", tags=["validate"],
            description="Great Expectations suites over the catalog and its files, nightly.",
        ),
        retrain_on_new_faces.to_deployment(
            name="train", triggers=[trigger], parameters=train_params, concurrency_limit=1, tags=["train"],
            description="Retrain both backbones once enough new faces have arrived; one training at a time.",
        ),
        facetrace_pipeline.to_deployment(
            name="pipeline", tags=["pipeline"],
            description="The whole chain: ingest, prompts, generate, validate, train and register. Manual runs.",
        ),
    ]


def main() -> None:
    from prefect import serve

    serve(*build_deployments(), limit=get_settings().serve_limit)


if __name__ == "__main__":
    main()
