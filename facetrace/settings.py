"""One settings object for every layer, read from ``FACETRACE_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACETRACE_", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="Data root: images, caches, reports.")
    db_url: str | None = Field(default=None, description="Catalog URL; default SQLite under data_dir.")

    # Ingestion limits: anything outside them is quarantined with a reason.
    max_file_bytes: int = 25 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    min_image_side: int = 16
    batch_size: int = 64
    workers: int = 2

    # Synthesis and prompts.
    diffusion_model: str = "SG161222/Realistic_Vision_V1.4"
    openai_model: str = "gpt-3.5-turbo"

    # Deployments (`facetrace serve`).
    inbox_interval_s: float = 300.0
    retrain_min_new_faces: int = 50
    retrain_trigger_events: int = 1
    retrain_trigger_window_s: float = 0.0
    train_epochs: int = 3
    serve_limit: int = 2

    # Training.
    image_size: int = 96
    near_duplicate_distance: int = 6

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
