"""The Spark SQL settings of the point-in-time join (pipelines.feature_store.TRAINING_FRAME_SPARK_SQL):
set for the join only, the session's own values back afterwards, the frame as Feast's own.

The frame's equality with Feast's own ``to_df()`` (which runs with the session's defaults) is
tests/feature_repo/test_feature_store.py::test_chunked_frame_equals_one_shot_and_feasts_own."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines import feature_store as fs
from recsys import schema as S
from recsys.config import Settings
from recsys.spark import get_spark

COALESCE = "spark.sql.adaptive.coalescePartitions.enabled"
SPARE = "spark.sql.test.recsysTrainingFrameKey"  # a key no session sets: it must be unset again


def test_session_settings_are_restored_after_the_block(feature_ws: Settings) -> None:
    spark = get_spark(feature_ws)
    spark.conf.set(COALESCE, "true")
    with fs._session_sql_conf(feature_ws, {COALESCE: "false", SPARE: "on"}):
        assert spark.conf.get(COALESCE) == "false" and spark.conf.get(SPARE) == "on"
    assert spark.conf.get(COALESCE) == "true"  # the value before the block
    assert spark.conf.get(SPARE, None) is None  # unset before, unset again
    with pytest.raises(RuntimeError, match="inside"), fs._session_sql_conf(feature_ws, {COALESCE: "false"}):
        raise RuntimeError("inside")
    assert spark.conf.get(COALESCE) == "true"  # restored when the block fails too


def test_training_frame_leaves_the_session_as_it_found_it(feature_ws: Settings) -> None:
    spark = get_spark(feature_ws)
    spark.conf.set(COALESCE, "true")
    events = pd.read_parquet(feature_ws.dataset_path / "events").sample(20, random_state=3)
    labels = events[[S.COL_USER, S.COL_ITEM, S.COL_TS]].reset_index(drop=True).assign(label=np.arange(20))
    frame = fs.get_training_frame(labels, "ranker_v1", settings=feature_ws)
    assert sorted(frame["label"]) == list(range(20))  # one row per entity row
    assert spark.conf.get(COALESCE) == "true"
