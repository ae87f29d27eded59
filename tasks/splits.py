"""Snapshot and leakage-safe split.

A snapshot freezes the usable images (status ok) and assigns each to train, validation or test.
Images that are the same picture or come from the same recipe travel together: exact duplicates
(sha256 / dedup group), perceptual near-duplicates (pHash Hamming distance at or below a
threshold) and images sharing a prompt (by prompt id or by identical prompt text) are joined
with union-find into one group, and whole groups are assigned, stratified by label, in an order
fixed by the seed. No group is ever on two sides, so a test score is a score on unseen faces.

Near-duplicate search is a multi-index hash: by the pigeonhole principle two 64-bit hashes within
distance d agree exactly on at least one of d+1 disjoint bit chunks, so only images sharing a
chunk value are compared (vectorised), which keeps 100k images to seconds rather than hours.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from facetrace.db.models import Generation, Image, Prompt, Snapshot, SnapshotImage, Source

SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.7, "validation": 0.15, "test": 0.15}


@dataclass(frozen=True)
class SplitItem:
    """What grouping needs to know about one image."""

    image_id: int
    label: str
    sha256: str
    phash: str
    dedup_group: str | None = None
    prompt_ids: tuple[int, ...] = ()
    prompt_texts: tuple[str, ...] = ()


@dataclass
class SplitImage:
    """One image of a snapshot, as training and evaluation read it."""

    image_id: int
    path: str
    label: str
    split: str
    group_key: str
    sha256: str
    format: str
    width: int
    height: int
    bytes: int
    source: str

    @property
    def target(self) -> int:
        return int(self.label == "synthetic")


@dataclass
class SnapshotSplit:
    snapshot_id: int
    seed: int
    images: list[SplitImage] = field(default_factory=list)

    def part(self, name: str) -> list[SplitImage]:
        return [image for image in self.images if image.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {name: {"real": 0, "synthetic": 0} for name in SPLIT_NAMES}
        for image in self.images:
            out[image.split][image.label] += 1
        return out


# ---------------------------------------------------------------- grouping


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression keeps later finds O(1)
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def normalise_prompt(text: str) -> str:
    """Prompts differing only in case, spacing or trailing punctuation are the same recipe."""
    return re.sub(r"\s+", " ", text).strip().strip(".").lower()


def phash_array(hashes: Sequence[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int, block: int = 2048) -> Iterable[tuple[int, int]]:
    """Index pairs (i < j) whose 64-bit hashes differ in at most ``max_distance`` bits."""
    n = len(hashes)
    if n < 2 or max_distance < 0:
        return
    chunks = max_distance + 1
    bounds = np.linspace(0, 64, chunks + 1).astype(int)
    seen: set[tuple[int, int]] = set()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mask = np.uint64((1 << int(hi - lo)) - 1)
        keys = (hashes >> np.uint64(lo)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], n]
        for start, end in zip(starts, ends):
            if end - start < 2:
                continue
            members = order[start:end]
            values = hashes[members]
            # Compare in blocks so one crowded bucket cannot allocate an n x n matrix at once.
            for b0 in range(0, len(members), block):
                dist = np.bitwise_count(values[b0:b0 + block, None] ^ values[None, :])
                rows, cols = np.nonzero(dist <= max_distance)
                for r, c in zip(rows.tolist(), cols.tolist()):
                    i, j = int(members[b0 + r]), int(members[c])
                    if i < j and (i, j) not in seen:
                        seen.add((i, j))
                        yield i, j


def group_items(items: Sequence[SplitItem], near_duplicate_distance: int) -> list[int]:
    """A group index per item: connected components of 'same content, near-duplicate or same prompt'."""
    uf = UnionFind(len(items))
    first_by_key: dict[tuple[str, object], int] = {}

    def join_on(kind: str, key: object, index: int) -> None:
        other = first_by_key.setdefault((kind, key), index)
        if other != index:
            uf.union(other, index)

    for index, item in enumerate(items):
        # One namespace for both: a dedup group is named by the sha256 of its canonical image.
        join_on("content", item.sha256, index)
        if item.dedup_group:
            join_on("content", item.dedup_group, index)
        for prompt_id in item.prompt_ids:
            join_on("prompt", prompt_id, index)
        for text in item.prompt_texts:
            if text and text.strip():
                join_on("text", normalise_prompt(text), index)
    if items:
        for i, j in near_duplicate_pairs(phash_array([item.phash for item in items]), near_duplicate_distance):
            uf.union(i, j)
    roots = [uf.find(i) for i in range(len(items))]
    renumber: dict[int, int] = {}
    return [renumber.setdefault(root, len(renumber)) for root in roots]


# ---------------------------------------------------------------- assignment


def assign_groups(
    group_of: Sequence[int], labels: Sequence[str], fractions: Mapping[str, float], seed: int
) -> list[str]:
    """A part name per item, whole groups at a time, stratified by label, deterministic for ``seed``.

    Groups are placed largest first (ties in a seed-shuffled order) into the part whose label
    quotas are furthest from full, weighted by the group's own label mix: the greedy rule of
    stratified group k-fold, which keeps each part's label ratio close to the whole's.
    """
    names = [name for name, fraction in fractions.items() if fraction > 0]
    total = sum(fractions[name] for name in names)
    label_set = sorted(set(labels))
    members: dict[int, list[int]] = defaultdict(list)
    for index, group in enumerate(group_of):
        members[group].append(index)
    label_totals = {label: sum(1 for x in labels if x == label) for label in label_set}
    quota = {(name, label): fractions[name] / total * label_totals[label] for name in names for label in label_set}
    filled = {(name, label): 0.0 for name in names for label in label_set}

    rng = random.Random(seed)
    groups = sorted(members)
    rng.shuffle(groups)
    groups.sort(key=lambda g: -len(members[g]))  # stable: equal sizes keep the seeded order

    part_of_group: dict[int, str] = {}
    for group in groups:
        mix = defaultdict(int)
        for index in members[group]:
            mix[labels[index]] += 1

        def need(name: str) -> float:
            # Relative room left for this group's labels; a part with no quota for a label has none.
            score = 0.0
            for label, count in mix.items():
                q = quota[(name, label)]
                score += count * ((q - filled[(name, label)]) / q if q > 0 else -1.0)
            return score

        best = max(names, key=lambda name: (need(name), fractions[name], -names.index(name)))
        part_of_group[group] = best
        for label, count in mix.items():
            filled[(best, label)] += count
    return [part_of_group[group] for group in group_of]


def grouped_folds(group_of: Sequence[int], labels: Sequence[str], k: int, seed: int) -> list[int]:
    """A fold number (0..k-1) per item for grouped, stratified k-fold cross-validation."""
    parts = assign_groups(group_of, labels, {str(f): 1.0 / k for f in range(k)}, seed)
    return [int(part) for part in parts]


# ---------------------------------------------------------------- catalog


def load_split_items(session: Session) -> tuple[list[SplitItem], dict[int, Image]]:
    """Usable images with their prompt links (own prompt, generation's prompt, and their texts)."""
    own_prompt = aliased(Prompt)
    gen_prompt = aliased(Prompt)
    rows = session.execute(
        select(Image, own_prompt.text, Generation.prompt_id, gen_prompt.text)
        .outerjoin(own_prompt, own_prompt.id == Image.prompt_id)
        .outerjoin(Generation, Generation.image_id == Image.id)
        .outerjoin(gen_prompt, gen_prompt.id == Generation.prompt_id)
        .where(Image.status == "ok")
        .order_by(Image.sha256)  # content order, not ingest order: the same images split the same way
    ).all()
    items: list[SplitItem] = []
    images: dict[int, Image] = {}
    for image, own_text, gen_prompt_id, gen_text in rows:
        images[image.id] = image
        prompt_ids = tuple(sorted({p for p in (image.prompt_id, gen_prompt_id) if p is not None}))
        texts = tuple(sorted({t for t in (own_text, gen_text) if t}))
        items.append(SplitItem(image.id, image.label, image.sha256, image.phash, image.dedup_group, prompt_ids, texts))
    return items, images


def split_content_hash(assignment: Iterable[tuple[str, str]], parameters: Mapping[str, object]) -> str:
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode())
    for sha, part in sorted(assignment):
        digest.update(f"{sha}:{part}\n".encode())
    return digest.hexdigest()


def create_snapshot(
    session: Session,
    seed: int = 0,
    fractions: Mapping[str, float] | None = None,
    near_duplicate_distance: int | None = None,
    flow_run_id: str | None = None,
) -> int:
    """Freeze the usable images into a snapshot with a grouped split; returns the snapshot id.

    An identical snapshot (same images, same assignment, same parameters) is reused rather than
    duplicated, so retraining on an unchanged catalog compares models on the very same test split.
    """
    from facetrace.settings import get_settings

    fractions = dict(fractions or DEFAULT_FRACTIONS)
    if near_duplicate_distance is None:
        near_duplicate_distance = get_settings().near_duplicate_distance
    items, images = load_split_items(session)
    labels = [item.label for item in items]
    if len(set(labels)) < 2:
        raise ValueError(f"a snapshot needs both real and synthetic images; the catalog has {sorted(set(labels))}")
    group_of = group_items(items, near_duplicate_distance)
    parts = assign_groups(group_of, labels, fractions, seed)
    # A group's key is its smallest sha256: stable across runs and readable in SQL.
    group_key: dict[int, str] = {}
    for item, group in zip(items, group_of):
        group_key[group] = min(group_key.get(group, item.sha256), item.sha256)
    parameters = {"seed": seed, "fractions": fractions, "near_duplicate_distance": near_duplicate_distance,
                  "groups": len(group_key), "grouping": ["sha256", "dedup_group", "phash", "prompt_id", "prompt_text"]}
    content_hash = split_content_hash(((item.sha256, part) for item, part in zip(items, parts)), parameters)
    existing = session.scalar(select(Snapshot.id).where(Snapshot.content_hash == content_hash).order_by(Snapshot.id))
    if existing is not None:
        return existing
    snapshot = Snapshot(seed=seed, parameters=parameters, image_count=len(items), content_hash=content_hash,
                        flow_run_id=flow_run_id)
    session.add(snapshot)
    session.flush()
    session.add_all(
        SnapshotImage(snapshot_id=snapshot.id, image_id=item.image_id, split=part, group_key=group_key[group])
        for item, part, group in zip(items, parts, group_of)
    )
    session.flush()
    return snapshot.id


def load_snapshot(session: Session, snapshot_id: int) -> SnapshotSplit:
    """The images of a snapshot with their split, as plain records (no session needed afterwards)."""
    seed = session.scalar(select(Snapshot.seed).where(Snapshot.id == snapshot_id))
    if seed is None:
        raise ValueError(f"snapshot {snapshot_id} does not exist")
    rows = session.execute(
        select(SnapshotImage.split, SnapshotImage.group_key, Image, Source.kind, Source.reference)
        .join(Image, Image.id == SnapshotImage.image_id)
        .join(Source, Source.id == Image.source_id)
        .where(SnapshotImage.snapshot_id == snapshot_id)
        .order_by(Image.id)
    ).all()
    split = SnapshotSplit(snapshot_id=snapshot_id, seed=seed)
    for part, key, image, kind, reference in rows:
        split.images.append(SplitImage(image.id, image.path, image.label, part, key, image.sha256, image.format,
                                       image.width, image.height, image.bytes, f"{kind}:{reference}"))
    return split


@task(name="snapshot-catalog", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def snapshot_catalog(catalog_url: str, seed: int = 0, fractions: dict[str, float] | None = None,
                     near_duplicate_distance: int | None = None, flow_run_id: str | None = None) -> int:
    """Freeze the catalog into a snapshot (a Prefect task; retried on a busy database)."""
    from facetrace.db.engine import get_engine, session_scope

    with session_scope(get_engine(catalog_url)) as session:
        return create_snapshot(session, seed, fractions, near_duplicate_distance, flow_run_id)


@task(name="load-snapshot", cache_policy=NO_CACHE)
def read_snapshot(catalog_url: str, snapshot_id: int) -> SnapshotSplit:
    """A snapshot's images and split as plain records, for the tasks that follow."""
    from facetrace.db.engine import get_engine, session_scope

    with session_scope(get_engine(catalog_url)) as session:
        return load_snapshot(session, snapshot_id)


def snapshot_summary(catalog_url: str, split: SnapshotSplit) -> dict[str, Any]:
    """Counts by split and label, and by source with provenance coverage, for the model card."""
    from facetrace.db.engine import get_engine, session_scope

    with session_scope(get_engine(catalog_url)) as session:
        provenance = dict(session.execute(
            select(Image.id, Image.provenance).where(Image.id.in_([i.image_id for i in split.images]))).all())
    by_source: dict[tuple[str, str], list[int]] = {}
    for image in split.images:
        by_source.setdefault((image.source, image.label), []).append(image.image_id)
    sources = [{"source": s, "label": label, "images": len(ids),
                "provenance": ", ".join(f"{name} {count}" for name, count in sorted(
                    Counter(provenance.get(i) or "n/a" for i in ids).items()))}
               for (s, label), ids in sorted(by_source.items())]
    return {"id": split.snapshot_id, "image_count": len(split.images), "counts": split.counts(), "sources": sources}


DEMO_REAL_SOURCE = "sample"  # scikit-image's 25x25 LFW thumbnails (`facetrace ingest sample`)
DEMO_GENERATOR = "tiny"  # the tiny offline pipeline built in code (tasks/synthesis.py)


def demo_data_note(catalog_url: str, split: SnapshotSplit) -> str | None:
    """Why a model trained on this snapshot is a toy, or None: its real images are all the bundled
    LFW thumbnails, or its synthetic ones all come from the tiny generator (the demo's data). Such a
    detector tells tiny noise from thumbnails; it says nothing about real photos."""
    from facetrace.db.engine import get_engine, session_scope

    ids = [i.image_id for i in split.images]
    with session_scope(get_engine(catalog_url)) as session:
        real_kinds = set(session.scalars(select(Source.kind).join(Image, Image.source_id == Source.id).where(
            Image.id.in_(ids), Image.label == "real").distinct()))
        generators = set(session.execute(select(Generation.model_id).select_from(Image).outerjoin(
            Generation, Generation.image_id == Image.id).where(Image.id.in_(ids), Image.label == "synthetic")
            .distinct()).scalars())
    parts = []
    if real_kinds == {DEMO_REAL_SOURCE}:
        parts.append("every real image is one of the bundled 25x25 LFW thumbnails (`ingest sample`)")
    if generators == {DEMO_GENERATOR}:
        parts.append("every synthetic image comes from the `tiny` offline generator")
    if not parts:
        return None
    return ("trained on the demo's data: " + " and ".join(parts)
            + "; a toy that says nothing about real photos, retrain on your own faces")
