"""Migration 0004: the catalog's absolute paths under the data root become store keys, on SQLite and
PostgreSQL; an existing local catalog keeps working (its keys resolve in the local store), and a
path outside the data root is left as it was."""

from __future__ import annotations

import json

from sqlalchemy import text

from facetrace.db.engine import make_engine
from facetrace.db.migrate import downgrade, upgrade


def test_absolute_paths_under_the_data_root_become_keys_and_back(settings_env, data_dir):
    root = data_dir.resolve()
    model = root / "models" / "mobilenet_v2" / "t1" / "model.keras"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    metrics = {"reports": {"roc": str(root / "reports/mobilenet_v2/t1/roc.png")},
               "training": {"tensorboard": str(root / "reports/mobilenet_v2/t1/tensorboard"), "epochs_run": 3},
               "test": {"roc_auc": 0.9}}
    hyper = {"members": [{"backbone": "xception", "path": str(root / "models/xception/t2/model.keras")},
                         {"backbone": "other", "path": "/elsewhere/model.keras"}]}
    engine = make_engine(settings_env.catalog_url)
    try:
        upgrade(engine, "0003")
        with engine.begin() as connection:
            cast = "CAST(:j AS JSONB)" if connection.dialect.name == "postgresql" else ":j"
            connection.execute(text("INSERT INTO snapshots (id, seed, image_count, content_hash, created_at) "
                                    "VALUES (1, 0, 0, 'x', CURRENT_TIMESTAMP)"))
            connection.execute(text(
                "INSERT INTO models (id, backbone, version, path, sha256, snapshot_id, image_size, hyperparameters, "
                f"metrics, stage, model_card, created_at) VALUES (1, 'mobilenet_v2', 1, :p, 's', 1, 96, {cast.replace(':j', ':h')},"
                f" {cast}, 'champion', :c, CURRENT_TIMESTAMP)"),
                {"p": str(model), "j": json.dumps(metrics), "h": json.dumps(hyper),
                 "c": str(model.parent / "model_card.md")})
            connection.execute(text("INSERT INTO validation_runs (id, suite, success, critical_failure, data_docs, created_at) "
                                    "VALUES (1, 'files', true, false, :d, CURRENT_TIMESTAMP), "
                                    "(2, 'intake', true, false, NULL, CURRENT_TIMESTAMP)"),
                               {"d": str(root / "validation/gx/uncommitted/data_docs/local_site/index.html")})
        upgrade(engine, "head")
        with engine.connect() as connection:
            path, card, raw_metrics, raw_hyper = connection.execute(
                text("SELECT path, model_card, metrics, hyperparameters FROM models")).one()
            docs = connection.execute(text("SELECT data_docs FROM validation_runs WHERE id = 1")).scalar_one()
        loads = (lambda v: json.loads(v) if isinstance(v, str) else v)
        assert path == "models/mobilenet_v2/t1/model.keras" and card == "models/mobilenet_v2/t1/model_card.md"
        assert docs == "validation/gx/uncommitted/data_docs/local_site/index.html"
        assert loads(raw_metrics)["reports"]["roc"] == "reports/mobilenet_v2/t1/roc.png"
        assert loads(raw_metrics)["training"] == {"tensorboard": "reports/mobilenet_v2/t1/tensorboard", "epochs_run": 3}
        assert loads(raw_hyper)["members"][0]["path"] == "models/xception/t2/model.keras"
        assert loads(raw_hyper)["members"][1]["path"] == "/elsewhere/model.keras"  # outside: left as it was

        # The key resolves in the local store: the same file, checked against its digest.
        from facetrace.tasks.store import artifact_file

        import hashlib

        assert artifact_file(path, hashlib.sha256(b"weights").hexdigest()) == model

        downgrade(engine, "0003")
        with engine.connect() as connection:
            assert connection.execute(text("SELECT path FROM models")).scalar_one() == str(model)
            assert connection.execute(text("SELECT data_docs FROM validation_runs WHERE id = 1")).scalar_one() == \
                str(root / "validation/gx/uncommitted/data_docs/local_site/index.html")
    finally:
        engine.dispose()
