"""Generation throughput: batched pipeline calls against one image per call, tiny pipeline on a CPU.

Both sides make the same images (same prompts and per-image seeds) through
``tasks.synthesis.generate_images``, PNG encoding included, with the configured CPU thread count
(``FACETRACE_SYNTHESIS_THREADS``, default 1). Batching shares each step's fixed costs (Python and
scheduler overhead, text encoding, kernel launches) among the batch. Target: batches of 8 give at
least 1.5x the images per second of one-at-a-time calls. A GPU's numbers for a real model come from
``bench/gpu_generate.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

IMAGES = int(os.environ.get("FACETRACE_BENCH_GENERATE_IMAGES", "16"))
SIZE = 64
STEPS = 3
REPEATS = 3
TARGET = 1.5


def best_seconds(work, repeats: int = REPEATS) -> float:
    """The fastest of ``repeats`` runs: the least disturbed by whatever else the machine does."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def rows(workdir: Path) -> list[dict]:
    from facetrace.tasks.synthesis import GenerationItem, ModelChoice, SamplingOptions, generate_images, item_seed
    from facetrace.tasks.synthesis import load_pipeline

    loaded = load_pipeline(ModelChoice(device="cpu", cache_root=str(workdir / "cache")))
    options = SamplingOptions(steps=STEPS, guidance=5.0, width=SIZE, height=SIZE)
    items = [GenerationItem(i, f"a photo of a {20 + i % 50} year old person", None, item_seed(0, i))
             for i in range(IMAGES)]

    def one_at_a_time() -> None:
        for item in items:
            generate_images(loaded, [item], options)

    def batched(size: int):
        def run() -> None:
            for start in range(0, len(items), size):
                generate_images(loaded, items[start:start + size], options)
        return run

    generate_images(loaded, items[:2], options)  # warm-up: lazy imports, allocator, kernels
    single = IMAGES / best_seconds(one_at_a_time)
    result = []
    for size, target in ((4, None), (8, TARGET)):
        rate = IMAGES / best_seconds(batched(size))
        result.append({
            "name": f"generate tiny {SIZE}px/{STEPS} steps, batch {size} vs 1 (CPU)",
            "value": rate, "unit": "images/s", "baseline": single, "ratio": rate / single, "target": target,
        })
    return result


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for row in rows(Path(tmp)):
            print(row)
