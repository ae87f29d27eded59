"""One settings object for every layer, read from ``FACETRACE_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


# What a network sees (TrainConfig.input_filter); defined here so the settings need no training import.
TrainInput = Literal["pixels", "residual", "both"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACETRACE_", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="Data root: images, caches, reports.")
    db_url: str | None = Field(default=None, description="Catalog URL; default SQLite under data_dir.")
    # The artifact store (tasks/store.py): images, models, model cards, reports, data docs. None = the
    # data root itself; else an fsspec URL such as s3://bucket/prefix (AWS_* variables for S3).
    store_url: str | None = None
    store_options: str | None = None  # JSON of fsspec storage options, or "block:NAME" (a Prefect Secret)
    cache_max_bytes: int = 10 * 1024**3  # the read-through cache of store objects under data_dir/cache/objects

    # Ingestion limits: anything outside them is quarantined with a reason.
    max_file_bytes: int = 25 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    min_image_side: int = 16
    batch_size: int = 64
    workers: int = 2

    # Synthesis and prompts.
    diffusion_model: str = "SG161222/Realistic_Vision_V1.4"
    # CPU threads for generation: recorded with each image, because CPU results depend on it.
    # One by default: on a shared CPU, more threads than free cores make OpenMP many times slower.
    synthesis_threads: int = 1
    # gpt-3.5-turbo (the original) lacks structured outputs; prompts fall back to JSON mode for it.
    openai_model: str = "gpt-4o-mini"

    # Flow commands without PREFECT_API_URL: one background Prefect server per data root, started on
    # first use and reused (facetrace/local_server.py); false = Prefect's temporary server per call.
    local_server: bool = True

    # Deployments (`facetrace serve`).
    inbox_interval_s: float = 300.0
    retrain_min_new_faces: int = 50
    retrain_trigger_events: int = 1
    retrain_trigger_window_s: float = 0.0
    train_epochs: int = 3
    train_backbones: list[str] = ["mobilenet_v2", "xception"]  # env as JSON, e.g. '["mobilenet_v2"]'
    serve_limit: int = 2

    # The HTTP API (`facetrace api`): the champion served with micro-batching and hot swap.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_max_batch: int = 32  # images per forward pass
    api_max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    api_queue_size: int = 256  # images waiting for the model; a request that does not fit gets 503
    api_request_timeout_s: float = 30.0  # a request not answered by then gets 504
    api_max_request_bytes: int = 32 * 1024 * 1024  # whole request body; each image also obeys max_file_bytes
    api_max_images: int = 32  # images per request
    api_poll_s: float = 2.0  # how often the catalog is asked for a new champion
    api_record_predictions: bool = True  # write every answer to the predictions table (batched)
    api_keep_labelled: bool = False  # opt-in: uploads sent with a label are kept in <data_dir>/inbox/<label>/
    # Nightly validation of what the API answered: the share flagged synthetic over the last
    # prediction_window_days must stay within this band around the model's rate on its test split.
    prediction_flag_band: float = 0.15
    prediction_window_days: int = 7

    # Scale-out: the task runner of fan-out steps (ingest batches, generation batches).
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = None  # a running Dask scheduler (tcp://host:8786); None = a local cluster
    dask_workers: int = 2  # worker processes of that local cluster

    # Training.
    image_size: int = 96
    near_duplicate_distance: int = 6
    # Format-neutral inputs: every image centre-cropped and re-encoded alike (no PNG-vs-JPEG or aspect cue).
    format_neutral: bool = True
    reencode_quality: int = 90  # JPEG quality of that shared re-encoding
    reencode_size: int | None = None  # re-encode at this size, then resize to the input (None: at the input size)
    # Train on random crops of this many pixels of each FACETRACE_IMAGE_SIZE input and score whole images
    # (the networks are fully convolutional): finer texture at the cost of a crop-sized step. None: whole images.
    train_crop_size: int | None = None
    # What the networks see: pixels (the picture), residual (a fixed high-pass of it) or both (6 channels).
    train_input: TrainInput = "pixels"
    train_threads: int = 2  # TensorFlow intra-op threads per process (the CPU is shared)
    # Backbones trained at once (separate Prefect tasks). Side by side on 2 cores did more work in the
    # same 660 s than one after the other (measured on 840 images: MobileNetV2 18 vs 19 epochs,
    # Xception 7 vs 4): one fit alone leaves part of the CPU idle (input pipeline, callbacks).
    train_parallel: int = 2
    # Compute precision of the fits: auto (bfloat16 for Xception only on a CPU with native bfloat16 where
    # `make bench` measured it >= 1.05x float32 on this machine, cached in <data>/cache/precision-probe.json;
    # else float32), float32, or mixed_bfloat16 for every backbone.
    train_precision: Literal["auto", "float32", "mixed_bfloat16"] = "auto"
    train_ensemble: bool = True  # the backbones' mean is a candidate too (when they share an input size)
    # Wall-clock seconds for all fits of one run (schedules adapt to it). 600 s of fits kept a whole
    # `facetrace train` on 1,200 images under 15 minutes on 2 cores (see README).
    train_time_budget_s: float = 600.0
    weights_dir: Path | None = None  # a folder of Keras no-top ImageNet .h5 files used as they are (no fetch)
    # Where ImageNet weights are fetched from: None = Keras' own origin; or a folder / an http(s) base URL
    # holding Keras' file names (air-gapped sites). Cached under <data_dir>/cache/keras/models.
    weights_mirror: str | None = None
    weights_timeout_s: float = 10.0  # network timeout of a fetch; then random initialisation (with a warning)
    target_fpr: float = 0.05  # the FPR the decision threshold is chosen for
    # upper_bound: the exact 95% upper confidence bound of the FPR on the validation reals <= target_fpr
    # (holds on new faces); empirical: the validation FPR itself <= target_fpr (noisy on ~100 reals).
    threshold_rule: Literal["upper_bound", "empirical"] = "upper_bound"
    bootstrap_resamples: int = 1000  # stratified, seeded bootstrap for every metric's 95% interval and the gate
    champion_metric: str = "roc_auc"  # ties broken by TPR at 1% FPR
    champion_margin: float = 0.005  # a candidate must beat the champion by this much to replace it
    # Models kept on disk besides the champion (the most recent); older artifacts are deleted after each
    # training run and their catalog rows marked pruned (metrics JSON), never removed.
    keep_candidates: int = 6
    robustness_images: int = 300  # test images (stratified sample) for the robustness table

    # Validation (expectations/): what a healthy catalog looks like; critical failures block training.
    max_image_side: int = 16_384
    allowed_formats: list[str] = ["JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"]
    class_balance_band: float = 0.3  # synthetic share of usable images within 0.5 +/- band
    max_rejection_rate: float = 0.25  # refused files / files offered
    min_provenance_coverage: float = 0.0  # imported synthetic images with a known prompt (reported)
    validation_file_sample: int = 10_000  # files checked on disk per run; 0 = every file

    @property
    def catalog_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.data_dir / 'catalog.sqlite').resolve()}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"


@lru_cache(maxsize=1)
def _cached() -> Settings:
    return Settings()


def get_settings(fresh: bool = False) -> Settings:
    """The process-wide settings; ``fresh=True`` re-reads the environment (tests, CLI)."""
    if fresh:
        _cached.cache_clear()
    return _cached()
