"""Synthetic faces from a diffusers text-to-image pipeline, with everything needed to make them again.

A pipeline comes from one of three places, all loaded with ``from_pretrained``/``from_single_file``:

* a Hugging Face hub id and revision (default ``SG161222/Realistic_Vision_V1.4``), from the local
  cache when ``HF_HUB_OFFLINE=1``;
* a local diffusers folder, or a single ``.safetensors``/``.ckpt`` checkpoint;
* ``tiny``: a small Stable Diffusion built here from random weights (fixed seed) and an invented
  tokenizer vocabulary, saved once under ``<data root>/cache/pipelines/tiny-<config hash>``. It makes
  noise, not faces, but runs every code path offline in a fraction of a second on a CPU.

Each image gets its own seed, derived from the run seed and the item's index, and its own
``torch.Generator`` (on the CPU, so the starting noise is the same on every device). On a CPU a
pipeline is deterministic for a given batch (same members, same order, same thread count), but not
across batch shapes: float sums are grouped differently and a pixel may round the other way. So each
image records its batch (``execution``), and :func:`generate_images` replays that batch to regenerate
it byte for byte.

Plain functions do the work; :data:`generate_batch`, :data:`load_model` and
:data:`catalogue_generated` are their Prefect tasks, with retries declared on the decorator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import platform
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from facetrace.db.catalog import AcceptedImage, add_image, add_rejection
from facetrace.db.engine import get_engine, session_scope
from facetrace.db.generations import add_generation
from facetrace.tasks.storage import Limits, Quarantine, file_sha256, inspect_image, store_bytes

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from facetrace.tasks.prompts import PromptSpec

TINY = "tiny"
DEFAULT_MODEL_ALIAS = "default"  # the configured hub model (FACETRACE_DIFFUSION_MODEL)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelUnavailable(FileNotFoundError):
    """A pipeline whose files are not here (offline hub cache miss, missing path)."""


# ---------------------------------------------------------------- the tiny pipeline

# Words the tiny tokenizer knows whole; anything else is spelled out byte by byte.
TINY_WORDS = (
    "a an the of with and photo portrait close-up face faces person man woman boy girl young old "
    "year years smiling hair eyes skin light dark brown blue green grey black blond red bald "
    "realistic studio natural"
).split()

# Everything that determines the tiny pipeline's files: its hash names the cache folder.
TINY_ARCHITECTURE: dict[str, Any] = {
    "format": 1,
    "weights_seed": 0,
    "words": TINY_WORDS,
    "unet": {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 64], "norm_num_groups": 8, "cross_attention_dim": 32, "attention_head_dim": 8,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    },
    # Four blocks: the same 8x spatial compression as Stable Diffusion's VAE, with few channels.
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
        "block_out_channels": [8, 16, 32, 32], "sample_size": 64,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
        "max_position_embeddings": 77, "projection_dim": 32,
    },
    "scheduler": {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
        "set_alpha_to_one": False, "steps_offset": 1,
    },
}


def tiny_config_hash() -> str:
    return hashlib.sha256(json.dumps(TINY_ARCHITECTURE, sort_keys=True).encode()).hexdigest()[:12]


def tiny_revision() -> str:
    """The tiny pipeline's "revision": it changes whenever its architecture or vocabulary does."""
    return f"tiny-{tiny_config_hash()}"


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes (what ByteLevel pre-tokenizing emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_vocabulary(words: Sequence[str] = TINY_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style byte-level BPE vocabulary and merge list: every byte, alone and word-final, plus
    merges that build each of ``words`` left to right."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    symbols = _byte_symbols()
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab.setdefault(symbol + suffix, len(vocab))
    merges: list[str] = []
    for word in words:
        chars = [symbols[b] for b in word.encode()]
        chars[-1] += "</w>"
        merged = chars[0]
        for char in chars[1:]:
            rule = f"{merged} {char}"
            merged += char
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append(rule)
    return vocab, merges


def build_tiny_pipeline(work_dir: Path) -> Any:
    """A randomly initialised StableDiffusionPipeline; the same on every call (fixed weight seed)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    arch = TINY_ARCHITECTURE
    vocab, merges = tiny_vocabulary(arch["words"])
    tokenizer_dir = work_dir / "tokenizer-source"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)

    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(arch["weights_seed"])
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"], **arch["text_encoder"]))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**arch["scheduler"]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_pipeline_dir(cache_root: Path) -> Path:
    """The tiny pipeline's saved folder under ``cache_root``, built on first use.

    Built in a temporary folder and renamed into place, so a crash or a concurrent build never
    leaves a half-written pipeline under the real name."""
    target = Path(cache_root) / "pipelines" / tiny_revision()
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        pipe = build_tiny_pipeline(staging)
        out = staging / "pipeline"
        pipe.save_pretrained(out, safe_serialization=True)
        # Keep the vocabulary files the tokenizer was made from beside its tokenizer.json.
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(staging / "tokenizer-source" / name, out / "tokenizer" / name)
        (out / "facetrace-tiny.json").write_text(json.dumps(TINY_ARCHITECTURE, indent=1, sort_keys=True))
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "model_index.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------- which model, where

@dataclass(frozen=True)
class ModelRef:
    """A model as the catalog names it: ``model_id`` is what reproduce resolves again."""

    kind: str  # tiny | hub | directory | single_file
    model_id: str
    revision: str | None
    path: Path | None = None


def resolve_model(model: str = TINY, revision: str | None = None) -> ModelRef:
    """Classify ``model`` ("tiny", "default", a path, or a hub id ``owner/name``) without loading it."""
    if model == TINY:
        return ModelRef(TINY, TINY, tiny_revision())
    if model == DEFAULT_MODEL_ALIAS:
        from facetrace.settings import get_settings

        model = get_settings().diffusion_model
    path = Path(model).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
            return ModelRef("directory", str(path), revision, path)
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            return ModelRef("single_file", str(path), revision, path)
        raise ValueError(f"{path}: a single-file checkpoint must end in {' or '.join(SINGLE_FILE_SUFFIXES)}")
    if model.startswith(("/", ".", "~")) or model.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise ModelUnavailable(f"model path {model} does not exist")
    if HUB_ID.fullmatch(model):
        return ModelRef("hub", model, revision or "main")
    raise ValueError(f"model {model!r} is neither 'tiny', an existing folder or checkpoint, nor a hub id (owner/name)")


@dataclass(frozen=True)
class Defaults:
    steps: int
    guidance: float
    size: int


TINY_DEFAULTS = Defaults(steps=3, guidance=5.0, size=64)
MODEL_DEFAULTS = Defaults(steps=25, guidance=7.0, size=512)


def defaults_for(ref: ModelRef) -> Defaults:
    return TINY_DEFAULTS if ref.kind == TINY else MODEL_DEFAULTS


def choose_device(device: str | None = None, dtype: str | None = None) -> tuple[str, str]:
    """``device`` or the best one here (CUDA, then Apple MPS, then CPU), and its dtype: float16 on
    CUDA, float32 elsewhere (half precision on a CPU is slow and imprecise)."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if dtype is None:
        dtype = "float16" if device.startswith("cuda") else "float32"
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"unsupported dtype {dtype!r}; expected float16, bfloat16 or float32")
    return device, dtype


def directory_hash(path: Path, *, contents: bool = False) -> str:
    """A fingerprint of a pipeline folder: every config and index file's content, and for weight
    files their content (``contents=True``), the blob hash a hub cache links them to, or their size.
    Hashing gigabytes of weights on every run would cost more than the change it could detect."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")):
        relative = file.relative_to(path).as_posix()
        if contents or file.suffix in (".json", ".txt"):
            fingerprint = file_sha256(file)
        else:
            blob = Path(os.readlink(file)).name if file.is_symlink() else ""
            fingerprint = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else f"size={file.stat().st_size}"
        digest.update(f"{relative}\0{fingerprint}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelChoice:
    """What to load, where: hashable, so a process loads each pipeline once."""

    model: str = TINY
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    safety_checker: bool = True  # only for models that ship one; tiny never has one
    cache_root: str | None = None  # tiny's cache (data root / cache); hub cache for hub models
    hub_cache_dir: str | None = None


@dataclass
class LoadedPipeline:
    pipe: Any
    ref: ModelRef
    revision: str | None  # the resolved revision (hub commit) where known
    model_hash: str | None
    device: str
    dtype: str
    safety_checker: str  # "none", or the checker's class name

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(dict(self.pipe.scheduler.config), default=str))

    def describe(self) -> dict[str, Any]:
        return {"model_id": self.ref.model_id, "kind": self.ref.kind, "revision": self.revision,
                "model_hash": self.model_hash, "device": self.device, "dtype": self.dtype,
                "pipeline_class": type(self.pipe).__name__, "safety_checker": self.safety_checker}


def _offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE only when first imported.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_snapshot(model_id: str, revision: str, cache_dir: str | None) -> Path | None:
    """The cached snapshot folder of a hub model (its name is the commit hash), if resolvable offline."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # noqa: BLE001 - provenance then records the requested revision only
        return None


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No per-component progress bars or advice (e.g. "install accelerate") while a pipeline loads
    or saves: the flow reports progress itself; errors still surface as exceptions."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity(lib.ERROR if hasattr(lib, "ERROR") else 40)
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # diffusers still passes an argument huggingface_hub ignores; nothing a user can act on.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _dtype_argument(torch_dtype: Any) -> dict[str, Any]:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns); pass whichever it reads."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype": torch_dtype} if renamed else {"torch_dtype": torch_dtype}


def load_pipeline(choice: ModelChoice) -> LoadedPipeline:
    """Load the text-to-image pipeline ``choice`` names onto its device (see the module docstring)."""
    import torch

    ref = resolve_model(choice.model, choice.revision)
    device, dtype = choose_device(choice.device, choice.dtype)
    extra: dict[str, Any] = _dtype_argument(getattr(torch, dtype))
    if ref.kind == TINY or not choice.safety_checker:
        extra.update(safety_checker=None, requires_safety_checker=False)
    with _quiet_loading():
        return _load(ref, choice, device, dtype, extra)


def _load(ref: ModelRef, choice: ModelChoice, device: str, dtype: str, extra: dict[str, Any]) -> LoadedPipeline:
    revision, model_hash = ref.revision, None
    try:
        if ref.kind == TINY:
            from diffusers import StableDiffusionPipeline

            from facetrace.settings import get_settings

            folder = tiny_pipeline_dir(Path(choice.cache_root or get_settings().data_dir / "cache"))
            pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **extra)
            model_hash = directory_hash(folder, contents=True)
        elif ref.kind == "single_file":
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_single_file(str(ref.path), local_files_only=_offline(), **extra)
            model_hash = file_sha256(ref.path)
        elif ref.kind == "directory":
            from diffusers import AutoPipelineForText2Image

            pipe = AutoPipelineForText2Image.from_pretrained(ref.path, local_files_only=True, **extra)
            model_hash = directory_hash(ref.path)
        else:
            from diffusers import AutoPipelineForText2Image

            pipe = AutoPipelineForText2Image.from_pretrained(
                ref.model_id, revision=ref.revision, cache_dir=choice.hub_cache_dir,
                local_files_only=_offline(), **extra)
            snapshot = _hub_snapshot(ref.model_id, ref.revision, choice.hub_cache_dir)
            if snapshot is not None:
                revision, model_hash = snapshot.name, directory_hash(snapshot)
    except OSError as exc:
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if ref.kind == "hub" and _offline() else ref.model_id
        raise ModelUnavailable(
            f"cannot load model {ref.model_id}" + (f"@{ref.revision}" if ref.kind == "hub" else "")
            + f" from {where}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            + (f" (fetch it first with `hf download {ref.model_id}`, or unset HF_HUB_OFFLINE)"
               if ref.kind == "hub" and _offline() else "")
        ) from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    checker = getattr(pipe, "safety_checker", None)
    return LoadedPipeline(pipe, ref, revision, model_hash, device, dtype,
                          "none" if checker is None else type(checker).__name__)


_PIPELINES: OrderedDict[ModelChoice, LoadedPipeline] = OrderedDict()
_PIPELINES_LOCK = threading.Lock()
_KEEP_PIPELINES = 2


def get_pipeline(choice: ModelChoice) -> LoadedPipeline:
    """The loaded pipeline for ``choice``, loaded once per process (task retries reuse it)."""
    with _PIPELINES_LOCK:
        if choice in _PIPELINES:
            _PIPELINES.move_to_end(choice)
            return _PIPELINES[choice]
        loaded = load_pipeline(choice)
        _PIPELINES[choice] = loaded
        while len(_PIPELINES) > _KEEP_PIPELINES:
            _PIPELINES.popitem(last=False)
        return loaded


def release_pipelines() -> None:
    """Forget every loaded pipeline (frees their memory once nothing else holds them)."""
    with _PIPELINES_LOCK:
        _PIPELINES.clear()


# ---------------------------------------------------------------- seeds, requests, items

def derive_seed(run_seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and ``parts`` (e.g. an item index): stable across processes
    and platforms, and independent of which other items are generated with it."""
    text = ":".join(str(p) for p in (run_seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def item_seed(run_seed: int, index: int) -> int:
    return derive_seed(run_seed, "image", index)


@dataclass(frozen=True)
class GenerationItem:
    index: int
    prompt: str
    negative_prompt: str | None
    seed: int


@dataclass(frozen=True)
class SamplingOptions:
    steps: int
    guidance: float
    width: int
    height: int
    threads: int | None = None  # CPU threads while generating (None: the configured number)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.width % 8 or self.height % 8 or self.width < 8 or self.height < 8:
            raise ValueError(f"image size must be a positive multiple of 8, got {self.width}x{self.height}")


# Template prompts are planned in blocks of this many items: balanced within a block, and the same
# for item i whatever the request's count, so a resumed or extended request writes the same prompts.
PROMPT_BLOCK = 16


@dataclass(frozen=True)
class GenerationRequest:
    """What determines a request's images. Its key (with the item index) identifies each image:
    the count and the batch size do not belong to it, so asking for more extends a request."""

    model: ModelRef
    steps: int
    guidance: float
    width: int
    height: int
    prompt_style: str = "simple"
    llm: str = "template"
    seed: int = 0
    negative_prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None  # stored prompts to use, item i taking prompt_ids[i % len]

    @property
    def key(self) -> str:
        identity = {
            "format": 1, "model": self.model.model_id, "revision": self.model.revision, "steps": self.steps,
            "guidance": float(self.guidance), "width": self.width, "height": self.height,
            "prompt_style": self.prompt_style, "llm": self.llm, "seed": self.seed,
            "negative_prompt": self.negative_prompt, "prompt_block": PROMPT_BLOCK,
        }
        if self.prompt_ids:
            identity["prompt_ids"] = list(self.prompt_ids)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def options(self, threads: int | None = None) -> SamplingOptions:
        return SamplingOptions(self.steps, self.guidance, self.width, self.height, threads)


def plan_prompts(request: GenerationRequest, indices: Sequence[int]) -> dict[int, PromptSpec]:
    """The prompt of each item in ``indices``. Template prompts are a pure function of (seed, item);
    an LLM writes the missing ones in one request (its answers cannot be replayed anyway)."""
    from facetrace.tasks.prompts import make_prompts

    if not indices:
        return {}
    if request.prompt_ids:
        from facetrace.settings import get_settings
        from facetrace.tasks.prompts import load_prompts

        with session_scope(get_engine(get_settings().catalog_url)) as session:
            stored = load_prompts(session, request.prompt_ids)
        return {i: stored[request.prompt_ids[i % len(request.prompt_ids)]] for i in indices}
    if request.llm != "template":
        specs = make_prompts(len(indices), style=request.prompt_style, llm=request.llm,
                             seed=derive_seed(request.seed, "prompts", *indices[:1]),
                             negative_text=request.negative_prompt)
        if len(specs) < len(indices):
            raise RuntimeError(f"the prompt writer returned {len(specs)} of {len(indices)} prompts")
        return dict(zip(indices, specs))
    planned: dict[int, PromptSpec] = {}
    for block in sorted({i // PROMPT_BLOCK for i in indices}):
        specs = make_prompts(PROMPT_BLOCK, style=request.prompt_style, llm="template",
                             seed=derive_seed(request.seed, "prompts", block), negative_text=request.negative_prompt)
        for offset, spec in enumerate(specs):
            index = block * PROMPT_BLOCK + offset
            if index in indices:
                planned[index] = dataclasses.replace(spec, parameters={**spec.parameters, "item_index": index})
    return planned


# ---------------------------------------------------------------- generating

@dataclass
class GeneratedImage:
    item: GenerationItem
    png: bytes
    provenance: dict[str, Any]
    flagged: bool = False  # the model's safety checker blanked it: never catalogued as a face


_GENERATE_LOCK = threading.Lock()  # one pipeline call at a time per process (pipelines are not re-entrant)


@contextlib.contextmanager
def cpu_determinism(device: str, threads: int) -> Iterator[None]:
    """On a CPU: a fixed thread count and deterministic algorithms for the duration, then restored.
    Thread count matters: it changes how float sums are split, hence the last bit, hence a pixel."""
    import torch

    if not device.startswith("cpu"):
        yield
        return
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


def png_bytes(image: PILImage) -> bytes:
    """Lossless, metadata-free PNG: the same pixels always give the same bytes (same Pillow and zlib)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


_VERSIONS: dict[str, Any] | None = None


def library_versions(device: str = "cpu") -> dict[str, Any]:
    """Versions that change the output: the libraries, and zlib (PNG bytes); CUDA's on a GPU."""
    global _VERSIONS
    if _VERSIONS is None:
        import diffusers
        import numpy
        import PIL
        import torch
        import transformers
        from PIL import features

        _VERSIONS = {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "numpy": numpy.__version__, "pillow": PIL.__version__, "zlib": features.version("zlib"),
                     "platform": platform.machine()}
    versions = dict(_VERSIONS)
    if device.startswith("cuda"):
        import torch

        versions.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                        gpu=torch.cuda.get_device_name(torch.device(device)))
    return versions


def run_pipeline(loaded: LoadedPipeline, items: Sequence[GenerationItem],
                 options: SamplingOptions) -> tuple[list[PILImage], list[bool]]:
    """One pipeline call for ``items``: one CPU generator per image, so an image's starting noise
    depends on its own seed only."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
    output = loaded.pipe(
        prompt=[item.prompt for item in items],
        negative_prompt=[item.negative_prompt or "" for item in items],
        height=options.height, width=options.width, num_inference_steps=options.steps,
        guidance_scale=options.guidance, generator=generators, output_type="pil",
    )
    flagged = getattr(output, "nsfw_content_detected", None) or [False] * len(items)
    return list(output.images), [bool(f) for f in flagged]


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def _provenance(loaded: LoadedPipeline, options: SamplingOptions, item: GenerationItem, duration_s: float,
                execution: dict[str, Any], flow_run_id: str | None) -> dict[str, Any]:
    return {
        "model_id": loaded.ref.model_id, "model_revision": loaded.revision, "model_hash": loaded.model_hash,
        "pipeline_class": type(loaded.pipe).__name__, "scheduler_class": type(loaded.pipe.scheduler).__name__,
        "scheduler_config": loaded.scheduler_config, "steps": options.steps, "guidance": float(options.guidance),
        "seed": item.seed, "width": options.width, "height": options.height, "dtype": loaded.dtype,
        "device": loaded.device, "safety_checker": loaded.safety_checker,
        "library_versions": library_versions(loaded.device), "duration_s": duration_s,
        "flow_run_id": flow_run_id, "execution": execution, "item_index": item.index,
    }


def _generate_halving(loaded: LoadedPipeline, items: list[GenerationItem], options: SamplingOptions,
                      threads: int | None, flow_run_id: str | None) -> list[GeneratedImage]:
    import torch

    started = time.perf_counter()
    try:
        images, flagged = run_pipeline(loaded, items, options)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory on a GPU is handled here
        if not (loaded.device.startswith("cuda") and len(items) > 1 and _is_out_of_memory(exc)):
            raise
        torch.cuda.empty_cache()
        half = len(items) // 2
        return (_generate_halving(loaded, items[:half], options, threads, flow_run_id)
                + _generate_halving(loaded, items[half:], options, threads, flow_run_id))
    duration = (time.perf_counter() - started) / len(items)
    batch = {"batch_items": [i.index for i in items], "batch_seeds": [i.seed for i in items],
             "torch_threads": threads, "deterministic": loaded.device.startswith("cpu")}
    if loaded.device.startswith("cuda"):
        batch["gpu"] = torch.cuda.get_device_name(torch.device(loaded.device))
    return [
        GeneratedImage(item, png_bytes(image),
                       _provenance(loaded, options, item, duration, {**batch, "batch_position": position}, flow_run_id),
                       flag)
        for position, (item, image, flag) in enumerate(zip(items, images, flagged))
    ]


def generate_images(loaded: LoadedPipeline, items: Sequence[GenerationItem], options: SamplingOptions,
                    flow_run_id: str | None = None) -> list[GeneratedImage]:
    """Generate ``items`` in one batch (halved and retried on CUDA out-of-memory), as PNG bytes with
    their provenance. Same items, options and pipeline on a CPU: byte-identical PNGs."""
    if not items:
        return []
    threads = None
    if loaded.device.startswith("cpu"):
        from facetrace.settings import get_settings

        threads = options.threads or get_settings().synthesis_threads
    with _GENERATE_LOCK, cpu_determinism(loaded.device, threads or 1):
        return _generate_halving(loaded, list(items), options, threads, flow_run_id)


# ---------------------------------------------------------------- Prefect tasks

def _retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures (a busy GPU, a flaky disk); a missing model or a bad argument stays."""
    try:
        state.result(raise_on_failure=True)
    except (ModelUnavailable, ValueError, TypeError):
        return False
    except BaseException:  # noqa: BLE001
        return True
    return False


# The OpenAI client retries each request itself; templates cannot fail transiently.
plan_item_prompts = task(plan_prompts, name="plan-prompts", cache_policy=NO_CACHE, timeout_seconds=900)


@task(name="load-diffusion-model", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10,
      retry_condition_fn=_retry_unless_permanent)
def load_model(choice: ModelChoice) -> dict[str, Any]:
    """Load the pipeline into this process (once) and describe it."""
    return get_pipeline(choice).describe()


@task(name="generate-faces", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=_retry_unless_permanent, timeout_seconds=3600)
def generate_batch(choice: ModelChoice, items: list[GenerationItem], options: SamplingOptions,
                   flow_run_id: str | None = None) -> list[GeneratedImage]:
    """One batch of images from the (cached) pipeline ``choice`` names."""
    return generate_images(get_pipeline(choice), items, options, flow_run_id)


# A Prefect tag concurrency limit named `gpu` (`prefect concurrency-limit create gpu 1`) caps how many
# batches share the accelerators. The tag costs an API round trip per task run (slots are leased
# even where no limit exists: about a quarter of a second each, measured), so batches on the CPU,
# which no GPU limit concerns, go without it.
GPU_TAG = "gpu"


def batch_task(model: dict[str, Any]):
    """The generation task for a loaded pipeline described by ``model``: tagged `gpu` on an accelerator."""
    device = str(model.get("device", "cpu"))
    return generate_batch.with_options(tags=[GPU_TAG]) if device.split(":")[0] in ("cuda", "mps") else generate_batch


@dataclass
class GenerationCounts:
    new: int = 0
    duplicate: int = 0  # the same bytes were already catalogued (another request made them)
    flagged: int = 0  # blanked by the model's safety checker
    quarantined: int = 0
    new_image_ids: list[int] = field(default_factory=list)
    new_sha256: list[str] = field(default_factory=list)

    def add(self, other: GenerationCounts) -> None:
        self.new += other.new
        self.duplicate += other.duplicate
        self.flagged += other.flagged
        self.quarantined += other.quarantined
        self.new_image_ids.extend(other.new_image_ids)
        self.new_sha256.extend(other.new_sha256)


def original_name(request_key: str, index: int) -> str:
    return f"generated/{request_key[:16]}/{index:06d}.png"


@task(name="catalogue-generated", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def catalogue_generated(images: list[GeneratedImage], prompts: dict[int, PromptSpec], request_key: str,
                        source_id: int, store, catalog_url: str,
                        flow_run_id: str | None = None,
                        stored_prompt_ids: dict[int, int] | None = None) -> GenerationCounts:
    """Store a batch's files, then write its prompts, images and generation rows in one transaction:
    an interrupted batch leaves no rows, and its items are generated again on the next run."""
    from facetrace.tasks.prompts import save_prompts

    counts = GenerationCounts()
    limits = Limits.from_settings()
    stored: list[tuple[GeneratedImage, AcceptedImage | Quarantine | None]] = []
    for image in images:
        if image.flagged:
            stored.append((image, None))
            continue
        try:
            record = inspect_image(image.png, limits)
        except Quarantine as q:
            stored.append((image, q))
            continue
        path = store_bytes(store, record, image.png)  # an ArtifactStore, or a local data root
        stored.append((image, AcceptedImage(original_name(request_key, image.item.index), "synthetic", path,
                                            record, provenance="complete")))
    with session_scope(get_engine(catalog_url)) as session:
        # Every member's prompt is kept, flagged ones too: regenerating an image replays its batch.
        indices = [image.item.index for image in images]
        if stored_prompt_ids is not None:
            prompt_ids = {i: stored_prompt_ids[i] for i in indices}
        else:
            prompt_ids = dict(zip(indices, save_prompts(session, [prompts[i] for i in indices], flow_run_id)))
        for image, outcome in stored:
            if outcome is None:
                counts.flagged += 1
                continue
            if isinstance(outcome, Quarantine):
                add_rejection(session, source_id, original_name(request_key, image.item.index), outcome.reason,
                              outcome.detail, size=len(image.png), flow_run_id=flow_run_id)
                counts.quarantined += 1
                continue
            outcome.prompt_id = prompt_ids[image.item.index]
            execution = dict(image.provenance["execution"])
            execution["batch_prompt_ids"] = [prompt_ids.get(i) for i in execution["batch_items"]]
            with session.begin_nested() as savepoint:
                image_id, is_new = add_image(session, source_id, outcome, flow_run_id)
                recorded = add_generation(session, image_id, outcome.prompt_id, request_key, image.item.index,
                                          {**image.provenance, "execution": execution})
                if is_new and not recorded:
                    # A concurrent run recorded this item first (with other bytes): no image without its row.
                    savepoint.rollback()
            if is_new and recorded:
                counts.new += 1
                counts.new_image_ids.append(image_id)
                counts.new_sha256.append(outcome.record.sha256)
            else:
                counts.duplicate += 1
    return counts
