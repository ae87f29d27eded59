"""Train, evaluate and register detectors.

    validation gate -> snapshot + grouped split -> decoded tensors (cached) -> one fit per backbone
    (separate tasks, in parallel) -> confound audit -> evaluation of each -> registry: candidates,
    champion gate, model cards -> `facetrace.model.registered` events.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from facetrace.db.engine import get_engine, session_scope
from facetrace.flows.common import current_flow_run_id, emit
from facetrace.settings import get_settings
from facetrace.tasks import registry
from facetrace.tasks.evaluation import audit_confounds, evaluate_model, score_against_champion
from facetrace.tasks.splits import (
    SnapshotSplit,
    demo_data_note,
    read_snapshot,
    snapshot_catalog,
    snapshot_summary,
)
from facetrace.tasks.store import ArtifactStore, ObjectCache, Staging
from facetrace.tasks.training import ENSEMBLE, TrainedModel, default_config, fit_backbone, prepare_tensors, save_ensemble

REGISTERED_EVENT = "facetrace.model.registered"
DEFAULT_BACKBONES = ("mobilenet_v2", "xception")


# ---------------------------------------------------------------- the validation gate


def require_valid_catalog(catalog_url: str) -> None:
    """Refuse a catalog whose latest validation failed critically (when the validation layer exists)."""
    logger = get_run_logger()
    try:
        from facetrace.expectations.gate import ensure_catalog_valid
    except ImportError:
        try:
            from facetrace.expectations import ensure_catalog_valid  # type: ignore[attr-defined]
        except ImportError:
            logger.warning("catalog validation gate unavailable (facetrace.expectations has no "
                           "ensure_catalog_valid): training without checking the latest validation run")
            return
    with session_scope(get_engine(catalog_url)) as session:
        ensure_catalog_valid(session)


# ---------------------------------------------------------------- the flow


def fit_deadlines(backbones: tuple[str, ...], total_s: float | None, settings,
                  start: float | None = None) -> dict[str, float | None]:
    """Each fit's deadline (epoch seconds) within the run's wall-clock budget.

    Fits run in waves of ``train_parallel``, in the order given; wave k must end by
    ``start + total * (k + 1) / waves``. The deadlines are absolute, so a wave that finishes early
    (a short schedule, early stopping) leaves its time to the next instead of losing it.
    """
    total_s = settings.train_time_budget_s if total_s is None else total_s
    if not total_s or total_s <= 0:
        return {b: None for b in backbones}
    start = time.time() if start is None else start
    parallel = max(1, settings.train_parallel)
    waves = -(-len(backbones) // parallel)  # ceil: rounds of parallel fits
    return {b: start + total_s * (i // parallel + 1) / waves for i, b in enumerate(backbones)}


@task(name="build-ensemble", cache_policy=NO_CACHE)
def build_ensemble_candidate(trained: list[TrainedModel], out_dir: Path) -> TrainedModel | None:
    """The backbones' mean as one saved model (None when they were prepared differently)."""
    combined = save_ensemble(trained, out_dir)
    if combined is None:
        get_run_logger().info("no ensemble candidate: the backbones do not share one input size")
    return combined


def publish_model(trained: TrainedModel, model_stage: Staging, report_stage: Staging) -> TrainedModel:
    """A model saved in its local folder -> the artifact store; returns it with store keys for paths.

    This machine's cache adopts the file (evaluation and the ensemble read it without a download).
    """
    local = Path(trained.path)
    model_stage.publish()
    key = model_stage.key(local)
    ObjectCache.from_settings(model_stage.store).adopt(key, local, trained.sha256)
    model_stage.discard()
    tensorboard = report_stage.key(trained.tensorboard) if trained.tensorboard else None
    return dataclasses.replace(trained, path=key, tensorboard=tensorboard)


def publish_reports(evaluation: dict[str, Any], report_stage: Staging) -> dict[str, Any]:
    """An evaluation's report folder (plots, scores, TensorBoard logs) -> the store; its files become keys."""
    report_stage.publish()
    report_stage.discard()
    return {**evaluation, "files": {name: report_stage.key(path) for name, path in evaluation["files"].items()}}


def _run_token() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


@flow(name="train-and-evaluate", log_prints=True,
      task_runner=ThreadPoolTaskRunner(max_workers=max(1, get_settings().train_parallel)))
def train_and_evaluate(
    backbones: tuple[str, ...] | list[str] = DEFAULT_BACKBONES,
    epochs: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    time_budget_s: float | None = None,
    target_fpr: float | None = None,
    primary_metric: str | None = None,
    margin: float | None = None,
    ensemble: bool | None = None,
) -> dict[str, Any]:
    """Train each backbone on one leakage-safe snapshot, evaluate on its test split, register the best.

    With two or more backbones sharing an input size, their mean is a further candidate (``ensemble``,
    default ``FACETRACE_TRAIN_ENSEMBLE``), evaluated and gated like the others.

    ``epochs`` and ``image_size`` override each backbone's tuned defaults. ``time_budget_s`` is the
    wall-clock budget of all fits (default ``FACETRACE_TRAIN_TIME_BUDGET_S``; 0 = none): each fit fits its
    learning-rate schedule to the time left before its deadline (:func:`fit_deadlines`) and stops in
    time, keeping its best weights.
    """
    logger = get_run_logger()
    settings = get_settings()
    run_id = current_flow_run_id()
    url, data_dir = settings.catalog_url, settings.data_dir
    target_fpr = settings.target_fpr if target_fpr is None else target_fpr
    primary_metric = primary_metric or settings.champion_metric
    margin = settings.champion_margin if margin is None else margin
    if primary_metric not in registry.PRIMARY_METRICS:
        raise ValueError(f"primary metric must be one of {registry.PRIMARY_METRICS}, got {primary_metric!r}")
    backbones = tuple(backbones)
    configs = {b: default_config(b, image_size=image_size, epochs=epochs, seed=seed)
               for b in backbones}  # validates the names before any work

    require_valid_catalog(url)
    snapshot_id = snapshot_catalog(url, seed=seed, flow_run_id=run_id)
    split = read_snapshot(url, snapshot_id)
    logger.info("snapshot %d: %s", snapshot_id, split.counts())

    tensor_files = {}
    for config in configs.values():
        key = config.preprocess
        if key not in tensor_files:
            tensor_files[key] = prepare_tensors(split, key, data_dir, settings.train_threads)

    # Models and reports are built in local folders (on a local store: the store's own folders) and
    # published to the artifact store; the catalog gets their keys, never this machine's paths.
    store = ArtifactStore.from_settings(settings)
    tokens = {b: _run_token() for b in backbones}
    model_stages = {b: Staging(store, f"models/{b}/{tokens[b]}", data_dir) for b in backbones}
    report_stages = {b: Staging(store, f"reports/{b}/{tokens[b]}", data_dir) for b in backbones}
    deadlines = fit_deadlines(backbones, time_budget_s, settings)
    futures = {b: fit_backbone.submit(split, configs[b], tensor_files[configs[b].preprocess], model_stages[b].dir,
                                      report_stages[b].dir / "tensorboard", settings.weights_dir,
                                      settings.train_threads, deadlines[b])
               for b in backbones}
    confound = audit_confounds(split)
    trained = {b: publish_model(future.result(), model_stages[b], report_stages[b]) for b, future in futures.items()}
    preprocess = {b: configs[b].preprocess for b in backbones}
    if settings.train_ensemble if ensemble is None else ensemble:
        token = _run_token()
        model_stages[ENSEMBLE] = Staging(store, f"models/{ENSEMBLE}/{token}", data_dir)
        combined = build_ensemble_candidate(list(trained.values()), model_stages[ENSEMBLE].dir)
        if combined is not None:
            report_stages[ENSEMBLE] = Staging(store, f"reports/{ENSEMBLE}/{token}", data_dir)
            trained[ENSEMBLE] = publish_model(combined, model_stages[ENSEMBLE], report_stages[ENSEMBLE])
            preprocess[ENSEMBLE] = configs[backbones[0]].preprocess

    evaluations = {b: publish_reports(evaluate_model(trained[b], split, tensor_files[preprocess[b]],
                                                     report_stages[b].dir, data_dir, target_fpr,
                                                     settings.robustness_images, settings.threshold_rule,
                                                     settings.bootstrap_resamples), report_stages[b])
                   for b in trained}
    summary = snapshot_summary(url, split)
    summary["demo_data"] = demo_data_note(url, split)
    return register_run(trained, evaluations, confound, summary, split, primary_metric, margin, target_fpr, run_id)


def register_run(trained: dict[str, TrainedModel], evaluations: dict[str, dict[str, Any]], confound: dict[str, Any],
                 summary: dict[str, Any], split: SnapshotSplit, primary_metric: str, margin: float,
                 target_fpr: float, run_id: str | None) -> dict[str, Any]:
    """Candidates in, champion gate, model cards, events and artifacts."""
    from facetrace.tasks.evaluation import report_markdown

    logger = get_run_logger()
    settings = get_settings()
    store = ArtifactStore.from_settings(settings)
    url = settings.catalog_url
    ids: dict[str, int] = {}
    with session_scope(get_engine(url)) as session:
        for b, model in trained.items():
            e = evaluations[b]
            metrics = {"test": e["test"], "validation": e["validation"], "operating_point": e.get("operating_point"),
                       "per_source": e["per_source"],
                       "robustness": e["robustness"], "confound_audit": confound, "reports": e["files"],
                       "demo_data": summary.get("demo_data"),  # a toy's reason (predict and the card warn)
                       "training": {"weights": model.weights, "weights_source": model.weights_source,
                                    "epochs_run": model.epochs_run,
                                    "best_epoch": model.best_epoch, "seconds": round(model.seconds, 1),
                                    "history": model.history, "tensorboard": model.tensorboard}}
            row = registry.add_candidate(
                session, backbone=b, path=model.path, sha256=model.sha256, snapshot_id=split.snapshot_id,
                image_size=model.hyperparameters["preprocess"]["image_size"], hyperparameters=model.hyperparameters,
                metrics=metrics, threshold=e["threshold"], flow_run_id=run_id)
            ids[b] = row.id
        best_backbone = next(b for b in trained if ids[b] == registry.best_candidate(
            [(ids[b], evaluations[b]["test"]) for b in trained], primary_metric))
        champion = registry.current_champion(session)
        champion_info = None if champion is None else {
            "id": champion.id, "path": champion.path, "sha256": champion.sha256, "snapshot_id": champion.snapshot_id,
            "hyperparameters": champion.hyperparameters, "threshold": champion.threshold,
            "test": (champion.metrics or {}).get("test", {})}

    best = trained[best_backbone]
    paired = None
    if champion_info is None:
        decision = registry.gate(evaluations[best_backbone]["test"], None, primary_metric, margin)
        compared_on = 0
    else:
        # Both scored on the same test images (the champion's own snapshot included), so the gate can
        # judge the difference with a paired bootstrap rather than two separately noisy figures.
        try:
            champion_metrics, candidate_metrics, compared_on, paired = score_against_champion(
                champion_info, {"path": best.path, "sha256": best.sha256, "hyperparameters": best.hyperparameters,
                                "threshold": evaluations[best_backbone]["threshold"]},
                split, settings.data_dir, url, primary_metric, settings.bootstrap_resamples)
        except (FileNotFoundError, ValueError) as exc:
            # A champion whose artifact is gone or altered cannot defend its place.
            logger.warning("champion %d cannot be scored (%s); it is replaced", champion_info["id"], exc)
            champion_metrics, candidate_metrics, compared_on = None, evaluations[best_backbone]["test"], 0
        decision = registry.gate(candidate_metrics, champion_metrics, primary_metric, margin, paired=paired)
        if champion_metrics is None:
            decision = registry.GateDecision(True, f"champion {champion_info['id']} unavailable: replaced")
    logger.info("registry: best candidate %s (model %d): %s", best_backbone, ids[best_backbone], decision.reason)

    with session_scope(get_engine(url)) as session:
        archived = registry.promote(session, ids[best_backbone]) if decision.promote else None
        pruned = registry.prune_models(session, settings.keep_candidates)
        if pruned:
            logger.info("retention: artifacts of models %s deleted (FACETRACE_KEEP_CANDIDATES=%d)",
                        ", ".join(map(str, pruned)), settings.keep_candidates)
        rows = {b: session.get(registry.Model, ids[b]) for b in trained}
        for b, row in rows.items():
            card = registry.model_card_markdown(
                backbone=b, version=row.version, stage=row.stage, sha256=row.sha256, path=row.path, snapshot=summary,
                hyperparameters=row.hyperparameters, metrics=row.metrics, threshold=row.threshold,
                target_fpr=target_fpr, decision=decision.reason if b == best_backbone else
                f"not the best candidate of this run ({primary_metric})")
            row.model_card = store.put_bytes(f"{PurePosixPath(row.path).parent}/model_card.md", card.encode())
        stages = {b: row.stage for b, row in rows.items()}
        versions = {b: row.version for b, row in rows.items()}
        columns, table = registry.registry_rows(session)

    for b in trained:
        e = evaluations[b]
        title = f"{b} v{versions[b]} ({stages[b]})"
        store.put_bytes(f"{PurePosixPath(e['files']['roc']).parent}/report.md",
                        report_markdown(title, e, confound, embed=False).encode())
        create_markdown_artifact(report_markdown(title, e, confound), key=f"model-report-{b.replace('_', '-')}",
                                 description=f"evaluation of {title}")
        emit(REGISTERED_EVENT, f"facetrace.model.{ids[b]}",
             {"model_id": ids[b], "backbone": b, "version": versions[b], "stage": stages[b],
              "snapshot_id": split.snapshot_id, "roc_auc": e["test"].get("roc_auc"),
              "tpr_at_5pct_fpr": e["test"].get("tpr_at_5pct_fpr"), "threshold": e["threshold"],
              "promoted": stages[b] == "champion" and decision.promote, "archived_model_id": archived
              if b == best_backbone else None},
             **{"facetrace.model.backbone": b, "facetrace.model.stage": stages[b]})
    create_table_artifact([dict(zip(columns, row)) for row in table], key="model-registry",
                          description="the model registry after this run")
    models = {b: {"id": ids[b], "version": versions[b], "stage": stages[b], "path": trained[b].path,
                  "seconds": round(trained[b].seconds, 1), "threshold": evaluations[b]["threshold"],
                  "test": evaluations[b]["test"], "robustness": evaluations[b]["robustness"]}
              for b in trained}
    return {"snapshot_id": split.snapshot_id, "models": models,
            "best": best_backbone, "promoted": decision.promote, "decision": decision.reason,
            "compared_on": compared_on, "archived": archived, "pruned": pruned, "paired": paired,
            "confound_audit": confound}
