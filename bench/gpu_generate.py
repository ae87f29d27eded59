"""Images per second of a real-size text-to-image pipeline on a GPU, by batch size (not run in CI).

    .venv/bin/python bench/gpu_generate.py --model SG161222/Realistic_Vision_V1.4
    .venv/bin/python bench/gpu_generate.py --model /models/my-sd15-folder --batch-sizes 1,4,8,16
    .venv/bin/python bench/gpu_generate.py --random-sd15      # no download: SD 1.5's shapes, random weights

Every image goes through ``tasks.synthesis.generate_images`` (the flow's own path: per-image
generators, PNG encoding, out-of-memory halving), so the numbers are what `facetrace generate`
gets. Throughput depends on the architecture, not the weights, which is why ``--random-sd15``
(Stable Diffusion 1.5's UNet, VAE and text encoder with random weights, built on the device) gives
representative timings where the hub cannot be reached. Prints a table; ratios are against batch 1
measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

# Stable Diffusion 1.x component shapes (the published configs), for --random-sd15.
SD15 = {
    "unet": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
        "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
    },
}


def random_sd15(device: str, dtype: str) -> Any:
    """A LoadedPipeline with SD 1.5's architecture and random weights, initialised on ``device``."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from facetrace.tasks.synthesis import TINY_ARCHITECTURE, LoadedPipeline, ModelRef, build_tiny_pipeline

    tokenizer = build_tiny_pipeline(Path(tempfile.mkdtemp())).tokenizer  # ids < 49408: any vocabulary will do
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15["unet"])
        vae = AutoencoderKL(**SD15["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                                    **SD15["text_encoder"]))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**TINY_ARCHITECTURE["scheduler"]), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(device, getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(pipe, ModelRef("random", "random-sd15", None), None, None, device, dtype, "none")


def measure(loaded: Any, batch_size: int, images: int, size: int, steps: int, guidance: float) -> dict[str, Any]:
    import torch

    from facetrace.tasks.synthesis import GenerationItem, SamplingOptions, generate_images, item_seed

    options = SamplingOptions(steps=steps, guidance=guidance, width=size, height=size)
    items = [GenerationItem(i, f"a photo of the face of a {20 + i % 50} year old person", None, item_seed(0, i))
             for i in range(images)]
    generate_images(loaded, items[:batch_size], options)  # warm-up: kernels, allocator, autotuning
    cuda = loaded.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    made = []
    for start in range(0, images, batch_size):
        made += generate_images(loaded, items[start:start + batch_size], options)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    executed = {len(g.provenance["execution"]["batch_items"]) for g in made}
    return {"batch": batch_size, "images": len(made), "seconds": elapsed, "images_per_s": len(made) / elapsed,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "executed_batches": sorted(executed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default",
                        help="hub id, diffusers folder, .safetensors/.ckpt, tiny, or default (FACETRACE_DIFFUSION_MODEL)")
    parser.add_argument("--revision")
    parser.add_argument("--random-sd15", action="store_true", help="SD 1.5 shapes with random weights (offline)")
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--images", type=int, default=16, help="images per batch size")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--device", default=None, help="default: the best available (cuda first)")
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 elsewhere")
    args = parser.parse_args(argv)

    from facetrace.tasks.synthesis import ModelChoice, choose_device, get_pipeline, library_versions

    device, dtype = choose_device(args.device, args.dtype)
    started = time.perf_counter()
    if args.random_sd15:
        loaded = random_sd15(device, dtype)
    else:
        loaded = get_pipeline(ModelChoice(args.model, args.revision, device, dtype, safety_checker=False))
    load_s = time.perf_counter() - started
    versions = library_versions(device)
    print(f"model {loaded.ref.model_id} ({type(loaded.pipe).__name__}, {type(loaded.pipe.scheduler).__name__}) "
          f"on {device} {dtype}, loaded in {load_s:.1f} s; {args.size}x{args.size}, {args.steps} steps, "
          f"guidance {args.guidance}; {versions.get('gpu', versions['platform'])}, torch {versions['torch']}, "
          f"diffusers {versions['diffusers']}")
    results = [measure(loaded, int(b), args.images, args.size, args.steps, args.guidance)
               for b in args.batch_sizes.split(",")]
    base = results[0]["images_per_s"]
    print(f"{'batch':>5} {'images':>6} {'seconds':>8} {'images/s':>9} {'ratio':>6} {'peak GiB':>8}  executed as")
    for r in results:
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"{r['batch']:>5} {r['images']:>6} {r['seconds']:>8.2f} {r['images_per_s']:>9.3f} "
              f"{r['images_per_s'] / base:>6.2f} {peak:>8}  {r['executed_batches']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
