"""Run the suites on their frames with Great Expectations and turn GX results into plain outcomes.

One GX context serves a whole validation run: a file-mode context under the data root keeps the
suites, checkpoints and results, so its data docs show the history of runs; an ephemeral context
(tests, benchmarks) keeps nothing.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import great_expectations as gx
import pandas as pd
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import ProgressBarsConfig

from facetrace.expectations.gate import CriticalValidationFailure  # noqa: F401 - re-exported for callers
from facetrace.expectations.suites import CRITICAL, SUITES, Thresholds

DATASOURCE = "facetrace"
EXAMPLES = 5  # offending rows kept per failed expectation in the catalog and the artifact


@dataclass
class ExpectationOutcome:
    suite: str
    expectation: str
    column: str | None
    description: str
    severity: str
    success: bool
    observed: str
    examples: list[Any] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SuiteOutcome:
    suite: str
    success: bool
    critical_failure: bool
    statistics: dict[str, Any]
    expectations: list[ExpectationOutcome]
    docs_page: str | None = None

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [e for e in self.expectations if not e.success]


def open_context(project_root: Path | None = None):
    """A file-mode GX context under ``project_root`` (created on first use), or an ephemeral one."""
    if project_root is None:
        context = gx.get_context(mode="ephemeral")
    else:
        project_root.mkdir(parents=True, exist_ok=True)
        context = gx.get_context(mode="file", project_root_dir=str(project_root))
    # GX draws tqdm bars on stderr for every metric batch: noise in flow logs and the CLI.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _batch_definition(context, asset_name: str):
    source = context.data_sources.add_or_update_pandas(DATASOURCE) if DATASOURCE not in context.data_sources.all() \
        else context.data_sources.get(DATASOURCE)
    try:
        asset = source.get_asset(asset_name)
    except LookupError:
        asset = source.add_dataframe_asset(asset_name)
    try:
        return asset.get_batch_definition("whole frame")
    except (KeyError, LookupError):
        return asset.add_batch_definition_whole_dataframe("whole frame")


def _observed(result: dict[str, Any]) -> str:
    """What the data showed, in a few words: the aggregate, or how many rows broke the rule."""
    if "observed_value" in result:
        value = result["observed_value"]
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):  # e.g. the column set: name what is missing or extra, else count
            mismatched = (result.get("details") or {}).get("mismatched") or {}
            if mismatched:
                return "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in mismatched.items() if v)
            return f"{len(value)} columns"
        return str(value)
    if "unexpected_count" in result:
        count, total = result["unexpected_count"], result.get("element_count", 0)
        percent = result.get("unexpected_percent") or 0.0
        return f"{count} of {total} rows unexpected ({percent:.2f}%)"
    return ""


def _jsonable(value: Any) -> Any:
    """Plain JSON values (the catalog's JSON columns refuse numpy scalars, and PostgreSQL refuses NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _examples(result: dict[str, Any]) -> list[Any]:
    rows = result.get("partial_unexpected_index_list") or result.get("partial_unexpected_list") or []
    return _jsonable(list(rows[:EXAMPLES]))


def _error(info: dict | None) -> str | None:
    """The message of an exception GX caught while evaluating (flat, or keyed by metric)."""
    if not info:
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    nested = [v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    return str(nested[0].get("exception_message")) if nested else None


def _outcome(suite: str, item) -> ExpectationOutcome:
    config = item.expectation_config
    kwargs = config.kwargs
    description = config.description or config.type.replace("_", " ")
    result = item.result or {}
    error = _error(item.exception_info)
    observed = f"error: {error}" if error else _observed(result)
    severity = getattr(config.severity, "value", config.severity) or CRITICAL
    return ExpectationOutcome(suite=suite, expectation=config.type, column=kwargs.get("column"),
                              description=description, severity=str(severity), success=bool(item.success),
                              observed=observed, examples=_examples(result))


def run_suite(context, name: str, frame: pd.DataFrame, thresholds: Thresholds,
              run_name: str | None = None) -> tuple[SuiteOutcome, Any]:
    """Validate ``frame`` with suite ``name`` through a checkpoint; returns the outcome and the GX
    validation result identifier (for the data docs page)."""
    build, index_columns = SUITES[name]
    suite = context.suites.add_or_update(build(thresholds))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=name, data=_batch_definition(context, name), suite=suite))
    result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES}
    if index_columns:
        result_format["unexpected_index_column_names"] = index_columns
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(name=f"facetrace-{name}", validation_definitions=[definition], result_format=result_format))
    run_id = RunIdentifier(run_name=run_name, run_time=dt.datetime.now(dt.timezone.utc))
    checkpoint_result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
    (identifier, validation), = checkpoint_result.run_results.items()
    expectations = [_outcome(name, item) for item in validation.results]
    critical = any(not e.success and e.severity == CRITICAL for e in expectations)
    statistics = _jsonable(dict(validation.statistics)) | {"rows": int(len(frame))}
    outcome = SuiteOutcome(suite=name, success=bool(validation.success), critical_failure=critical,
                           statistics=statistics, expectations=expectations)
    return outcome, identifier


def build_docs(context) -> Path | None:
    """Build the data docs (every configured site); returns the local index page."""
    sites = context.build_data_docs()
    index = next(iter(sites.values()), None)
    return _local_path(index)


def docs_pages(context, identifiers: dict[str, Any]) -> dict[str, str]:
    """Suite name -> local path of its validation result page in the data docs."""
    pages: dict[str, str] = {}
    for name, identifier in identifiers.items():
        urls = context.get_docs_sites_urls(resource_identifier=identifier)
        page = _local_path(urls[0]["site_url"]) if urls and urls[0].get("site_url") else None
        if page:
            pages[name] = str(page)
    return pages


def _local_path(url: str | None) -> Path | None:
    """A local path from GX's file:// URL (percent-escapes decoded: data roots may contain spaces)."""
    if not url:
        return None
    parsed = urlparse(url)
    return Path(url2pathname(parsed.path)) if parsed.scheme == "file" else Path(url)


def validate_frames(context, frames: dict[str, pd.DataFrame], thresholds: Thresholds, *,
                    run_name: str | None = None, docs: bool = True) -> tuple[list[SuiteOutcome], Path | None]:
    """Run each suite on its frame (``frames`` maps suite name -> frame), then build the data docs."""
    outcomes: list[SuiteOutcome] = []
    identifiers: dict[str, Any] = {}
    for name, frame in frames.items():
        outcome, identifier = run_suite(context, name, frame, thresholds, run_name)
        outcomes.append(outcome)
        identifiers[name] = identifier
    index = None
    if docs:
        index = build_docs(context)
        pages = docs_pages(context, identifiers)
        for outcome in outcomes:
            outcome.docs_page = pages.get(outcome.suite)
    return outcomes, index
