"""The snapshot split is leakage-safe: no duplicate, near-duplicate or prompt group on two sides."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facetrace.tasks.splits import (
    SplitItem,
    assign_groups,
    group_items,
    grouped_folds,
    near_duplicate_pairs,
    normalise_prompt,
)

FRACTIONS = {"train": 0.7, "validation": 0.15, "test": 0.15}


def item(i: int, label: str = "real", phash: int | None = None, **kw) -> SplitItem:
    return SplitItem(image_id=i, label=label, sha256=f"{i:064x}",
                     phash=f"{(phash if phash is not None else random.Random(i).getrandbits(64)):016x}", **kw)


def flip_bits(value: int, count: int, rng: random.Random) -> int:
    for bit in rng.sample(range(64), count):
        value ^= 1 << bit
    return value


# ---------------------------------------------------------------- grouping rules


def test_exact_duplicates_share_a_group():
    items = [item(0, dedup_group="a"), item(1, dedup_group="a"), item(2, dedup_group="b")]
    groups = group_items(items, near_duplicate_distance=0)
    assert groups[0] == groups[1] != groups[2]


def test_near_duplicates_within_the_threshold_share_a_group_and_farther_ones_do_not():
    rng = random.Random(1)
    base = rng.getrandbits(64)
    items = [item(0, phash=base), item(1, phash=flip_bits(base, 6, rng)), item(2, phash=flip_bits(base, 7, rng))]
    groups = group_items(items, near_duplicate_distance=6)
    assert groups[0] == groups[1]
    assert groups[2] != groups[0]


def test_shared_prompt_id_or_same_prompt_text_joins_images():
    items = [item(0, "synthetic", prompt_ids=(5,)), item(1, "synthetic", prompt_ids=(5,)),
             item(2, "synthetic", prompt_texts=("A face of a man.",)),
             item(3, "synthetic", prompt_texts=("a  face of a MAN",)), item(4, "synthetic")]
    groups = group_items(items, near_duplicate_distance=0)
    assert groups[0] == groups[1]
    assert groups[2] == groups[3]
    assert len({groups[0], groups[2], groups[4]}) == 3
    assert normalise_prompt(" A face\tof a man. ") == "a face of a man"


def test_groups_are_transitive():
    # a~b by prompt, b~c by duplicate, c~d by near-duplicate: all four together.
    rng = random.Random(3)
    base = rng.getrandbits(64)
    items = [item(0, prompt_ids=(1,)), item(1, prompt_ids=(1,), dedup_group="x"),
             item(2, dedup_group="x", phash=base), item(3, phash=flip_bits(base, 2, rng))]
    assert len(set(group_items(items, 4))) == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=60), st.integers(0, 8), st.randoms())
def test_multi_index_search_finds_exactly_the_brute_force_pairs(seeds, distance, rng):
    # Plant near copies so there is something to find, then compare with an all-pairs scan.
    hashes = list(seeds) + [flip_bits(h, rng.randint(0, 10), rng) for h in seeds[: len(seeds) // 2]]
    array = np.array(hashes, dtype=np.uint64)
    found = set(near_duplicate_pairs(array, distance))
    expected = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                if bin(hashes[i] ^ hashes[j]).count("1") <= distance}
    assert found == expected


# ---------------------------------------------------------------- the property: no group on two sides


@st.composite
def planted_catalogs(draw):
    """A random catalog with planted exact duplicates, near-duplicates and shared prompts."""
    rng = draw(st.randoms(use_true_random=False))
    n = draw(st.integers(10, 120))
    distance = draw(st.integers(0, 8))
    items: list[SplitItem] = []
    must_join: list[tuple[int, int]] = []
    prompt_pool = [f"a face of person {k}" for k in range(draw(st.integers(1, 15)))]
    for i in range(n):
        label = rng.choice(["real", "synthetic"])
        kind = rng.random()
        if items and kind < 0.15:  # exact duplicate of an earlier image (same dedup group)
            other = rng.randrange(len(items))
            items.append(item(i, items[other].label, dedup_group=items[other].dedup_group or items[other].sha256))
            must_join.append((other, i))
        elif items and kind < 0.3:  # near-duplicate: a few bits flipped, within the threshold
            other = rng.randrange(len(items))
            phash = flip_bits(int(items[other].phash, 16), rng.randint(0, distance), rng)
            items.append(item(i, label, phash=phash))
            must_join.append((other, i))
        elif label == "synthetic" and kind < 0.7:  # shared prompt, by id or by text in another spelling
            k = rng.randrange(len(prompt_pool))
            if rng.random() < 0.5:
                items.append(item(i, label, prompt_ids=(k,)))
            else:
                text = prompt_pool[k]
                items.append(item(i, label, prompt_texts=(rng.choice([text, text.upper() + ".", f" {text} "]),)))
        else:
            items.append(item(i, label, dedup_group=f"{i:064x}"))
        if items[-1].dedup_group is None and kind >= 0.15:
            items[-1] = SplitItem(**{**items[-1].__dict__, "dedup_group": items[-1].sha256})
    # Every pair sharing a prompt (id or normalised text) must be together too.
    by_prompt = defaultdict(list)
    for index, it in enumerate(items):
        for p in it.prompt_ids:
            by_prompt[("id", p)].append(index)
        for t in it.prompt_texts:
            by_prompt[("text", normalise_prompt(t))].append(index)
    for members in by_prompt.values():
        must_join += [(members[0], m) for m in members[1:]]
    return items, must_join, distance, draw(st.integers(0, 10_000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planted_catalogs())
def test_no_planted_group_lands_on_two_sides(catalog):
    items, must_join, distance, seed = catalog
    groups = group_items(items, distance)
    parts = assign_groups(groups, [it.label for it in items], FRACTIONS, seed)
    for a, b in must_join:
        assert parts[a] == parts[b], f"items {a} and {b} belong together but were split"
    # And beyond the planted pairs: any two images within the distance are on the same side.
    hashes = [int(it.phash, 16) for it in items]
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            if bin(hashes[i] ^ hashes[j]).count("1") <= distance:
                assert parts[i] == parts[j]
    assert parts == assign_groups(groups, [it.label for it in items], FRACTIONS, seed)  # deterministic


def test_split_is_stratified_by_label_and_sized_by_fraction():
    rng = random.Random(7)
    items = [item(i, "synthetic" if i % 3 == 0 else "real", phash=rng.getrandbits(64)) for i in range(600)]
    parts = assign_groups(group_items(items, 0), [it.label for it in items], FRACTIONS, seed=0)
    for part, fraction in FRACTIONS.items():
        members = [it for it, p in zip(items, parts) if p == part]
        assert abs(len(members) / len(items) - fraction) < 0.02
        share = sum(it.label == "synthetic" for it in members) / len(members)
        assert abs(share - 1 / 3) < 0.03


def test_different_seeds_give_different_splits_of_the_same_groups():
    items = [item(i, "real" if i % 2 else "synthetic") for i in range(100)]
    groups = group_items(items, 0)
    labels = [it.label for it in items]
    assert assign_groups(groups, labels, FRACTIONS, 1) != assign_groups(groups, labels, FRACTIONS, 2)


def test_grouped_folds_keep_groups_whole_and_cover_every_image():
    items = [item(i, "real" if i % 2 else "synthetic", prompt_ids=(i // 4,)) for i in range(80)]
    groups = group_items(items, 0)
    folds = grouped_folds(groups, [it.label for it in items], 5, seed=0)
    assert set(folds) == set(range(5))
    for g in set(groups):
        assert len({f for f, gg in zip(folds, groups) if gg == g}) == 1


# ---------------------------------------------------------------- the snapshot in the catalog


@pytest.fixture
def catalog(catalog_url):
    from facetrace.db.engine import dispose_engines, get_engine

    engine = get_engine(catalog_url)
    yield engine
    dispose_engines()


def add_images(session, specs):
    from facetrace.db.models import Image, Prompt, Source

    source = Source(kind="folder", reference="/faces")
    session.add(source)
    session.flush()
    prompts = {}
    ids = []
    for i, (label, phash, dedup, prompt_text, status) in enumerate(specs):
        prompt_id = None
        if prompt_text:
            if prompt_text not in prompts:
                p = Prompt(text=prompt_text, method="import")
                session.add(p)
                session.flush()
                prompts[prompt_text] = p.id
            prompt_id = prompts[prompt_text]
        sha = f"{i + 1:064x}"
        image = Image(sha256=sha, path=f"images/{sha[:2]}/{sha}.png", label=label, source_id=source.id,
                      original_name=f"{i}.png", format="PNG", mode="RGB", width=64, height=64, bytes=1000,
                      phash=f"{phash:016x}", dedup_group=dedup or sha, prompt_id=prompt_id, status=status)
        session.add(image)
        session.flush()
        ids.append(image.id)
    return ids


def test_snapshot_freezes_usable_images_with_whole_groups_and_is_reused_when_unchanged(catalog):
    from sqlalchemy import func, select

    from facetrace.db.engine import session_scope
    from facetrace.db.models import Snapshot, SnapshotImage
    from facetrace.tasks.splits import create_snapshot, load_snapshot

    rng = random.Random(0)
    specs = []
    for i in range(60):
        label = "synthetic" if i % 2 else "real"
        prompt = "face of a man" if label == "synthetic" and i % 10 == 1 else None
        specs.append((label, rng.getrandbits(64), None, prompt, "quarantined" if i == 58 else "ok"))
    specs.append(("real", specs[0][1] ^ 0b101, None, None, "ok"))  # a near-duplicate of image 0
    with session_scope(catalog) as session:
        ids = add_images(session, specs)
    with session_scope(catalog) as session:
        first = create_snapshot(session, seed=3, near_duplicate_distance=6)
    with session_scope(catalog) as session:
        again = create_snapshot(session, seed=3, near_duplicate_distance=6)
        assert again == first
        assert session.scalar(select(func.count()).select_from(Snapshot)) == 1
        split = load_snapshot(session, first)
        assert session.scalar(select(func.count()).select_from(SnapshotImage)) == 60
    by_id = {image.image_id: image for image in split.images}
    assert ids[58] not in by_id  # quarantined images are not usable
    assert by_id[ids[0]].split == by_id[ids[60]].split  # near-duplicates together
    assert by_id[ids[0]].group_key == by_id[ids[60]].group_key
    prompt_sides = {by_id[ids[i]].split for i in range(60) if i % 10 == 1}
    assert len(prompt_sides) == 1  # one prompt group, one side
    counts = split.counts()
    assert all(counts[part]["real"] > 0 and counts[part]["synthetic"] > 0 for part in counts)

    with session_scope(catalog) as session:
        other = create_snapshot(session, seed=4, near_duplicate_distance=6)
    assert other != first


def test_snapshot_refuses_a_catalog_with_one_class(catalog):
    from facetrace.db.engine import session_scope
    from facetrace.tasks.splits import create_snapshot

    with session_scope(catalog) as session:
        add_images(session, [("real", i * 7919, None, None, "ok") for i in range(5)])
    with session_scope(catalog) as session, pytest.raises(ValueError, match="both real and synthetic"):
        create_snapshot(session)
