"""The `facetrace` command line: read-only SQL that the database itself enforces, output formats,
one-line errors, and a start-up light enough not to load TensorFlow or torch."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from facetrace.db.models import Base
from ingest_corpus import FACETRACE, encode, noise_image

HEAVY = ("tensorflow", "torch", "diffusers", "great_expectations")


def _populate(settings, tmp_path: Path, count: int = 3) -> None:
    """A few real catalog rows, written by the ingest task called as a plain function."""
    from facetrace.db.catalog import ensure_source
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.tasks.faces import ingest_batch, list_folder
    from facetrace.tasks.storage import Limits

    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(count):
        (folder / f"face{i}.png").write_bytes(encode(noise_image(i, (32, 32)), "PNG"))
    (folder / "broken.jpg").write_bytes(b"<html>oops</html>")
    listing = list_folder(folder, "real")
    with session_scope(get_engine(settings.catalog_url)) as session:
        source_id = ensure_source(session, "folder", listing.source.reference)
    ingest_batch.fn(listing.candidates, source_id, settings.data_dir, settings.catalog_url, Limits())


def _row_counts(url: str) -> dict[str, int]:
    from facetrace.db.engine import get_engine, session_scope

    with session_scope(get_engine(url)) as session:
        return {t.name: session.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}


def _sql(capsys, *args: str) -> tuple[int, str, str]:
    from facetrace.cli.app import main

    code = main(["sql", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("statement", [
    "DELETE FROM images",
    "DROP TABLE images",
    "UPDATE images SET label = 'synthetic'",
    "INSERT INTO sources (kind, reference) VALUES ('folder', '/elsewhere')",
    # Ways out of a read-only transaction when several statements share one message (PostgreSQL):
    "SET TRANSACTION READ WRITE; DELETE FROM images",
    "COMMIT; BEGIN READ WRITE; DELETE FROM images; COMMIT",
    "SELECT 1; DELETE FROM images",
])
def test_sql_refuses_writes_and_the_catalog_is_intact(settings_env, tmp_path, capsys, statement):
    _populate(settings_env, tmp_path)
    before = _row_counts(settings_env.catalog_url)
    assert before["images"] == 3

    code, out, err = _sql(capsys, statement)

    assert code != 0
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("facetrace sql: ")
    if ";" not in statement:  # the database's own refusal, named as such
        assert "refused: the catalog is opened read-only" in err, err
    assert _row_counts(settings_env.catalog_url) == before


def test_sql_cannot_create_files_beside_the_catalog(sqlite_settings_env, tmp_path, capsys):
    _populate(sqlite_settings_env, tmp_path)
    for statement in (f"ATTACH DATABASE '{tmp_path / 'other.db'}' AS other", f"VACUUM INTO '{tmp_path / 'copy.db'}'"):
        code, _, err = _sql(capsys, statement)
        assert code != 0 and err.startswith("facetrace sql: "), err
    assert not (tmp_path / "other.db").exists() and not (tmp_path / "copy.db").exists()


def test_sql_formats_csv_and_json(settings_env, tmp_path, capsys):
    _populate(settings_env, tmp_path)
    query = "SELECT original_name, width, label FROM images ORDER BY original_name"

    code, out, _ = _sql(capsys, query, "--format", "csv")
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [
        ["original_name", "width", "label"], ["face0.png", "32", "real"], ["face1.png", "32", "real"],
        ["face2.png", "32", "real"]]

    code, out, _ = _sql(capsys, query, "--format", "json")
    assert code == 0
    assert json.loads(out) == [{"original_name": f"face{i}.png", "width": 32, "label": "real"} for i in range(3)]

    code, out, _ = _sql(capsys, "SELECT reason, COUNT(*) AS files FROM rejections_by_reason GROUP BY reason")
    assert code == 0 and "not_an_image" in out  # views answer like tables


def test_sql_reports_a_bad_query_in_one_line(settings_env, capsys):
    from facetrace.db.engine import get_engine

    get_engine(settings_env.catalog_url)  # an empty, migrated catalog
    code, out, err = _sql(capsys, "SELECT no_such_column FROM images")
    assert code != 0 and out == ""
    assert err.startswith("facetrace sql: query failed:") and len(err.strip().splitlines()) == 1


def test_status_counts_by_label_source_and_reason(settings_env, tmp_path, capsys):
    from facetrace.cli.app import main

    _populate(settings_env, tmp_path)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "real" in out and "not_an_image" in out and str(tmp_path / "faces") in out


def test_ingest_without_a_path_is_one_line(sqlite_settings_env, capsys, tmp_path):
    from facetrace.cli.app import main

    assert main(["ingest", "folder"]) == 2
    assert main(["ingest", "folder", str(tmp_path / "missing")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("facetrace ingest: ") for line in err)


def _modules_after(argv: list[str], env: dict[str, str]) -> tuple[set[str], subprocess.CompletedProcess]:
    """Run the CLI's main() in a fresh interpreter; return which heavy packages it imported."""
    probe = (
        "import sys, json\n"
        "from facetrace.cli.app import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)\n"
        "sys.exit(code or 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    return set(json.loads(done.stderr.strip().splitlines()[-1])), done


def test_sql_on_a_catalog_not_yet_created_says_so(sqlite_settings_env, capsys):
    code, _, err = _sql(capsys, "SELECT 1")
    assert code != 0 and "does not exist; run `facetrace ingest` first" in err
    assert not Path(sqlite_settings_env.catalog_url.removeprefix("sqlite:///")).exists()  # not created by a read


@pytest.mark.parametrize("argv", [["--help"], ["status"], ["sql", "SELECT COUNT(*) FROM images"],
                                  ["ingest", "--help"]])
def test_light_verbs_import_neither_tensorflow_nor_torch(tmp_path, argv):
    import os

    env = {**os.environ, "FACETRACE_DATA_DIR": str(tmp_path), "FACETRACE_DB_URL": f"sqlite:///{tmp_path}/c.sqlite"}
    if argv[0] == "sql":
        _, first = _modules_after(["status"], env)  # create the catalog
        assert first.returncode == 0, first.stderr
    heavy, done = _modules_after(argv, env)
    assert done.returncode == 0, done.stderr
    assert heavy == set(), f"`facetrace {' '.join(argv)}` imported {heavy}"


def test_a_crash_in_native_code_says_where_on_stderr(tmp_path):
    """A verb that dies of SIGSEGV (here: reading address 0) leaves its Python stack on stderr."""
    import os

    crash = ("import ctypes, facetrace.cli.app as app\n"
             "def status(args):\n"
             "    return ctypes.string_at(0)\n"
             "app.VERBS['status'] = status\n"
             "app.main(['status'])\n")
    env = {**os.environ, "FACETRACE_DATA_DIR": str(tmp_path), "FACETRACE_DB_URL": f"sqlite:///{tmp_path}/c.sqlite"}
    env.pop("PYTHONFAULTHANDLER", None)
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == -11
    assert "Fatal Python error: Segmentation fault" in done.stderr
    assert 'line 3 in status' in done.stderr, done.stderr


def test_the_console_script_exists_and_shows_help():
    done = subprocess.run([FACETRACE, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for verb in ("ingest", "status", "sql"):
        assert verb in done.stdout


def test_sql_as_a_postgresql_superuser_cannot_read_server_files_or_run_programs(settings_env, tmp_path, capsys):
    if not settings_env.catalog_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite has neither")
    _populate(settings_env, tmp_path)
    marker = tmp_path / "ran"
    for statement in (f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'", "SELECT pg_read_file('/etc/hostname')",
                      "SELECT pg_ls_dir('.')"):
        code, out, err = _sql(capsys, statement)
        assert code != 0 and out == "" and ("permission denied" in err or "must be superuser" in err), err
    assert not marker.exists()
    # Undoing the role is one statement and ends there; the next query is restricted again.
    assert _sql(capsys, "RESET ROLE")[0] == 0
    assert _sql(capsys, "SELECT pg_read_file('/etc/hostname')")[0] != 0
    code, out, _ = _sql(capsys, "SELECT COUNT(*) AS n FROM images")  # reading the catalog still works
    assert code == 0 and "3" in out


# ---------------------------------------------------------------- output: width, JSON types, one-line errors

def _register_model(settings, backbone: str, path: str, metrics: dict, hyperparameters: dict | None = None) -> int:
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import Snapshot
    from facetrace.tasks.registry import add_candidate

    with session_scope(get_engine(settings.catalog_url)) as session:
        snapshot = Snapshot(seed=0, image_count=0, content_hash="0" * 64)
        session.add(snapshot)
        session.flush()
        return add_candidate(session, backbone=backbone, path=path, sha256="a" * 64, snapshot_id=snapshot.id,
                             image_size=96, hyperparameters=hyperparameters or {}, metrics=metrics,
                             threshold=0.25).id


def test_tables_into_a_pipe_never_cut_a_value(sqlite_settings_env, capsys):
    from facetrace.cli.app import main

    long_path = "/models/" + "mobilenet_v2-" * 12 + "weights.keras"
    _register_model(sqlite_settings_env, "mobilenet_v2_with_a_long_name", long_path, {"test": {"roc_auc": 1.0}})
    capsys.readouterr()
    assert main(["models"]) == 0  # capsys: stdout is not a terminal
    out = capsys.readouterr().out
    assert "mobilenet_v2_with_a_long_name" in out and "…" not in out
    assert main(["sql", "SELECT path FROM models"]) == 0
    out = capsys.readouterr().out
    assert any(long_path in line for line in out.splitlines()), out


def test_tables_through_cat_keep_whole_names(sqlite_settings_env):
    """The console script into a real pipe, as `facetrace sql ... | cat` runs it."""
    import os

    from facetrace.db.engine import get_engine

    get_engine(sqlite_settings_env.catalog_url)
    name = "x" * 300
    done = subprocess.run([FACETRACE, "sql", f"SELECT '{name}' AS name, 1 AS n"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    assert any(name in line for line in done.stdout.splitlines()), done.stdout


def test_a_reader_that_closes_the_pipe_early_gets_no_error_line(sqlite_settings_env):
    """`facetrace sql ... | head -c 100`: the reader leaves before the output ends."""
    import os

    from facetrace.db.engine import get_engine

    get_engine(sqlite_settings_env.catalog_url)
    query = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000) SELECT i FROM n"
    with subprocess.Popen([FACETRACE, "sql", query, "--format", "json"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=os.environ) as process:
        assert process.stdout.read(100)
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == 141, stderr
    assert "BrokenPipe" not in stderr and "Traceback" not in stderr, stderr


def test_json_has_real_numbers_and_big_integers_as_strings(sqlite_settings_env, capsys):
    from facetrace.cli.app import main

    _register_model(sqlite_settings_env, "mobilenet_v2", "/m/model.keras",
                    {"test": {"roc_auc": 0.875, "tpr_at_1pct_fpr": 0.5, "tpr_at_5pct_fpr": 1.0},
                     "confound_audit": {"roc_auc": 0.625}})
    capsys.readouterr()
    assert main(["models", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["roc_auc"] == 0.875 and row["tpr@5%fpr"] == 1.0 and row["threshold"] == 0.25
    assert row["confound_auc"] == 0.625 and isinstance(row["id"], int)

    big = 2**53 + 1
    assert main(["sql", f"SELECT {big} AS seed, {2**53} AS edge, 7 AS n, 0.5 AS x, NULL AS missing",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"seed": str(big), "edge": 2**53, "n": 7, "x": 0.5, "missing": None}]


def test_models_table_rounds_numbers_for_display(sqlite_settings_env, capsys):
    from facetrace.cli.app import main

    _register_model(sqlite_settings_env, "xception", "/m/x.keras", {"test": {"roc_auc": 0.123456789}})
    capsys.readouterr()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "0.1235" in out and "0.123456789" not in out


def test_verbose_is_accepted_before_and_after_the_verb(sqlite_settings_env, capsys):
    from facetrace.cli.app import main

    assert main(["--verbose", "ingest", "folder"]) == 2
    assert main(["ingest", "folder", "-v"]) == 2
    err = capsys.readouterr().err
    assert err.count("facetrace ingest: `facetrace ingest folder` needs a PATH") == 2
    assert "Traceback" in err  # --verbose: the traceback too


# ---------------------------------------------------------------- after `make demo`: commands as printed

def test_demo_summary_prints_commands_that_work_from_the_users_shell(sqlite_settings_env, tmp_path, capsys,
                                                                     monkeypatch):
    """`facetrace` is not on PATH after `make demo` (no activated venv): the summary names the venv's script."""
    import os
    import shlex

    from facetrace.cli.app import print_demo_summary

    _populate(sqlite_settings_env, tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no venv on PATH, as in a fresh shell
    monkeypatch.chdir(tmp_path)
    print_demo_summary(12.0)
    out = capsys.readouterr().out
    lines = out[out.index("Where to look next"):].splitlines()
    assert "source " in lines[0] and "activate" in lines[0]
    printed = [line.split("  #")[0].strip() for line in lines[1:] if line.strip()]
    exports = [line for line in printed if line.startswith("export ")]
    commands = [line for line in printed if shlex.split(line)[0].endswith("facetrace")]
    runnable = [c for c in commands if " predict " not in c and not c.endswith(" serve")]
    assert any(c.endswith(" status") for c in runnable) and any(" sql " in c for c in runnable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACETRACE_")}
    for command in runnable:
        assert not command.startswith("facetrace "), command  # not on this PATH: it would be `command not found`
        done = subprocess.run(["bash", "-c", "; ".join([*exports, command])], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        assert "no such table" not in done.stdout
    assert any(shlex.split(c)[0].endswith("bin/facetrace") for c in runnable)


def test_help_of_every_verb_imports_neither_tensorflow_nor_torch(tmp_path):
    import os

    from facetrace.cli.app import VERBS, build_parser

    build_parser()  # registers every verb module's verbs
    probe = (
        "import contextlib, io, json, sys\n"
        "from facetrace.cli.app import VERBS, main\n"
        "for verb in ['--help', *sys.argv[1:]]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([verb] if verb == '--help' else [verb, '--help'])\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    verbs = sorted(VERBS)
    assert {"ingest", "train", "predict", "generate", "server", "demo"} <= set(verbs)
    env = {**os.environ, "FACETRACE_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", probe, *verbs], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_a_failed_flow_run_is_one_line_on_stderr_and_the_traceback_is_in_verbose(prefect_harness, tmp_path):
    """`prompts --llm openai` without a key fails inside the flow run: Prefect's console log of the
    failed run (dozens of lines) stays off the terminal unless --verbose."""
    from ingest_corpus import cli_env

    env = cli_env(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'catalog.sqlite'}", tmp_path / "home",
                  OPENAI_API_KEY="")
    env.pop("PREFECT_LOGGING_LEVEL", None)  # Prefect's default (INFO), as a user has it
    done = subprocess.run([FACETRACE, "prompts", "--count", "2", "--llm", "openai"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("facetrace prompts: no OpenAI API key")

    verbose = subprocess.run([FACETRACE, "prompts", "--count", "2", "--llm", "openai", "--verbose"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert verbose.returncode == done.returncode
    assert "Traceback" in verbose.stderr and "Finished in state Failed" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("facetrace prompts: no OpenAI API key")


def test_flows_the_command_line_runs_itself_skip_heartbeats_unless_configured(prefect_harness, sqlite_settings_env,
                                                                              monkeypatch):
    """Prefect joins a flow run's heartbeat thread at exit while it sleeps in one-second steps; the
    CLI's own (foreground) runs go without it, a user's explicit setting wins, `serve` keeps it."""
    from prefect import flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    from facetrace.cli import app

    seen: list = []

    @flow
    def probe() -> None:  # what Prefect's flow engine reads when it decides to start the thread
        seen.append(get_current_settings().flows.heartbeat_frequency)

    monkeypatch.setitem(app.VERBS, "ingest", lambda args: probe() or 0)
    monkeypatch.delitem(app.PRECHECKS, "ingest")
    assert get_current_settings().flows.heartbeat_frequency is not None  # Prefect's default is on
    assert app.main(["ingest", "sample"]) == 0
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        assert app.main(["ingest", "sample"]) == 0
        with app.foreground("serve"):
            assert get_current_settings().flows.heartbeat_frequency == 60
    assert seen == [None, 60]
    assert get_current_settings().flows.heartbeat_frequency is not None  # restored after the command
