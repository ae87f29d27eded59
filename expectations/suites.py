"""The data rules, as Great Expectations suites written in code (kept in the repository, reviewed
like code). Each suite validates one pandas frame built by :mod:`facetrace.expectations.frames`.

Every expectation declares its ``severity``: a ``critical`` failure means the catalog must not be
trained on (the validation flow fails and :func:`facetrace.expectations.gate.ensure_catalog_valid`
refuses); a ``warning`` is reported and recorded but lets the flow succeed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.expectations.row_conditions import Column

CRITICAL = "critical"
WARNING = "warning"

LABELS = ["real", "synthetic"]
SPLITS = ["train", "validation", "test"]
SHA256_PATTERN = r"^[0-9a-f]{64}$"
PHASH_PATTERN = r"^[0-9a-f]{16}$"

# Columns of the images frame (frames.load_images) and the pandas type each must have (None: any).
# Text reads back as pandas' `str` dtype; a SQLite column holding mixed types would read as `object`.
CATALOG_COLUMNS: dict[str, str | None] = {
    "image_id": "int64",
    "sha256": "str",
    "path": "str",
    "label": "str",
    "format": "str",
    "mode": "str",
    "width": "int64",
    "height": "int64",
    "bytes": "int64",
    "phash": "str",
    "status": "str",
    "provenance": None,  # nullable columns: their pandas type depends on whether any value is set
    "source_kind": "str",
    "prompt_id": None,
    "prompt_text": None,
    "generation_id": None,
    "is_synthetic": "int64",
}


@dataclass(frozen=True)
class Thresholds:
    """What a healthy catalog looks like; defaults mirror :class:`facetrace.settings.Settings`."""

    min_side: int = 16
    max_side: int = 16_384
    allowed_formats: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")
    class_balance_band: float = 0.3
    max_rejection_rate: float = 0.25
    min_provenance_coverage: float = 0.0
    near_duplicate_distance: int = 6
    file_sample: int = 10_000
    prediction_flag_band: float = 0.15
    prediction_window_days: int = 7

    @classmethod
    def from_settings(cls, **overrides) -> Thresholds:
        from facetrace.settings import get_settings

        s = get_settings()
        values = dict(
            min_side=s.min_image_side, max_side=s.max_image_side, allowed_formats=tuple(s.allowed_formats),
            class_balance_band=s.class_balance_band, max_rejection_rate=s.max_rejection_rate,
            min_provenance_coverage=s.min_provenance_coverage, near_duplicate_distance=s.near_duplicate_distance,
            file_sample=s.validation_file_sample, prediction_flag_band=s.prediction_flag_band,
            prediction_window_days=s.prediction_window_days,
        )
        known = {f.name for f in fields(cls)}
        values.update({k: v for k, v in overrides.items() if k in known and v is not None})
        return cls(**values)


def catalog_suite(t: Thresholds) -> gx.ExpectationSuite:
    """One row per catalogued image: identity, labels, sizes, formats, and synthetic provenance."""
    rules: list[gxe.Expectation] = []
    add = rules.append
    add(gxe.ExpectTableColumnsToMatchSet(column_set=list(CATALOG_COLUMNS), exact_match=True, severity=CRITICAL,
                                         description="the catalog frame has exactly the expected columns"))
    for column, type_ in CATALOG_COLUMNS.items():
        if type_:
            add(gxe.ExpectColumnValuesToBeOfType(column=column, type_=type_, severity=CRITICAL,
                                                 description=f"{column} is of type {type_}"))
    add(gxe.ExpectColumnValuesToBeUnique(column="sha256", severity=CRITICAL,
                                         description="one row per content: sha256 is unique"))
    add(gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=SHA256_PATTERN, severity=CRITICAL,
                                           description="sha256 is 64 lowercase hex characters"))
    add(gxe.ExpectColumnValuesToBeUnique(column="path", severity=CRITICAL,
                                         description="no two images share a stored path"))
    add(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=LABELS, severity=CRITICAL,
                                        description="label is real or synthetic"))
    add(gxe.ExpectColumnValuesToBeInSet(column="format", value_set=list(t.allowed_formats), severity=CRITICAL,
                                        description="format is one of the accepted formats"))
    for side in ("width", "height"):
        add(gxe.ExpectColumnValuesToBeBetween(column=side, min_value=t.min_side, max_value=t.max_side,
                                              severity=CRITICAL,
                                              description=f"{side} within [{t.min_side}, {t.max_side}] px"))
    add(gxe.ExpectColumnValuesToMatchRegex(column="phash", regex=PHASH_PATTERN, severity=CRITICAL,
                                           description="perceptual hash is 16 hex characters (64 bits)"))

    generated = Column("source_kind") == "generated"
    add(gxe.ExpectColumnValuesToNotBeNull(column="prompt_text", row_condition=generated, severity=CRITICAL,
                                          description="every generated image has a (non-empty) prompt"))
    add(gxe.ExpectColumnValuesToNotBeNull(column="generation_id", row_condition=generated, severity=CRITICAL,
                                          description="every generated image has a generation row"))
    # Imported synthetic images (folders, zips) often come without prompts: reported, not fatal.
    imported_synthetic = (Column("label") == "synthetic") & (Column("source_kind") != "generated")
    add(gxe.ExpectColumnValuesToNotBeNull(column="prompt_text", row_condition=imported_synthetic,
                                          mostly=t.min_provenance_coverage, severity=WARNING,
                                          description="imported synthetic images with a known prompt "
                                                      f"(coverage >= {t.min_provenance_coverage:.0%})"))
    low, high = max(0.0, 0.5 - t.class_balance_band), min(1.0, 0.5 + t.class_balance_band)
    add(gxe.ExpectColumnMeanToBeBetween(column="is_synthetic", min_value=low, max_value=high,
                                        row_condition=Column("status") == "ok", severity=WARNING,
                                        description=f"class balance: synthetic share of usable images "
                                                    f"within [{low:.2f}, {high:.2f}]"))
    return gx.ExpectationSuite(name="catalog", expectations=rules)


def intake_suite(t: Thresholds) -> gx.ExpectationSuite:
    """One row per file a source offered (a sighting, or a rejection): how much was refused."""
    return gx.ExpectationSuite(name="intake", expectations=[gxe.ExpectColumnMeanToBeBetween(
        column="rejected", min_value=0.0, max_value=t.max_rejection_rate, severity=WARNING,
        description=f"rejection rate (refused / offered files) at most {t.max_rejection_rate:.0%}")])


def splits_suite(t: Thresholds) -> gx.ExpectationSuite:
    """One row per member of the latest snapshot, with how its groups spread over the splits."""
    rules: list[gxe.Expectation] = []
    add = rules.append
    add(gxe.ExpectColumnValuesToBeInSet(column="split", value_set=SPLITS, severity=CRITICAL,
                                        description="split is train, validation or test"))
    add(gxe.ExpectColumnValuesToBeBetween(column="exact_group_splits", max_value=1, severity=CRITICAL,
                                          description="no exact-duplicate group on two sides of a split"))
    add(gxe.ExpectColumnValuesToBeBetween(column="near_duplicates_across_splits", max_value=0, severity=CRITICAL,
                                          description="no perceptual near-duplicate (phash Hamming distance "
                                                      f"<= {t.near_duplicate_distance}) in another split"))
    add(gxe.ExpectColumnValuesToBeBetween(column="prompt_group_splits", max_value=1, severity=CRITICAL,
                                          description="no prompt group on two sides of a split"))
    add(gxe.ExpectColumnValuesToBeBetween(column="snapshot_group_splits", max_value=1, severity=CRITICAL,
                                          description="each snapshot group (group_key) sits in one split"))
    return gx.ExpectationSuite(name="splits", expectations=rules)


def files_suite(t: Thresholds) -> gx.ExpectationSuite:
    """One row per checked file. A check that could not run (file missing) is null, so each defect
    fails exactly one expectation."""
    checks = (
        ("exists", "every catalogued file exists"),
        ("size_matches", "file size matches the catalog"),
        ("sha256_matches", "file sha256 matches the catalog (bytes unchanged)"),
        ("decodes", "file decodes as an image"),
    )
    return gx.ExpectationSuite(name="files", expectations=[
        gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True], severity=CRITICAL, description=description)
        for column, description in checks])


def predictions_suite(t: Thresholds) -> gx.ExpectationSuite:
    """One row per answer of `facetrace api` in the recent window (frames.load_prediction_drift).

    A warning, not a failure: a moving flag rate says the inputs or the world changed (or someone
    is probing the detector), which calls for a look and maybe retraining, not for blocking anything.
    """
    band = t.prediction_flag_band
    return gx.ExpectationSuite(name="predictions", expectations=[
        gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0.0, max_value=1.0, severity=CRITICAL,
                                          description="every recorded score is a probability"),
        gxe.ExpectColumnMeanToBeBetween(
            column="flag_drift", min_value=-band, max_value=band, severity=WARNING,
            description=f"share flagged synthetic in the last {t.prediction_window_days} days within "
                        f"+/-{band:.2f} of the answering model's test-split rate")])


# Suite name -> (builder, columns that identify an offending row in the results).
SUITES = {
    "catalog": (catalog_suite, ["sha256"]),
    "intake": (intake_suite, []),
    "splits": (splits_suite, ["sha256"]),
    "files": (files_suite, ["path"]),
    "predictions": (predictions_suite, ["prediction_id"]),
}
