"""The stream's decoder gives exactly the canonical rules' verdict and reason for every message,
through its pure-Python fast path or not."""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from pipelines.canonical import event_reject_reasons
from pipelines.events import InvalidEvent, check_event, decode_batch, event_to_message, new_event

NOW = pd.Timestamp("2030-01-01", tz="UTC")
KNOWN = np.array([7, 9])
VARIANTS = {
    "event_id": ["x", "", None],
    "user_id": [1, -1, None, 1.5, "2", True],
    "item_id": [7, 8, -2],
    "event_type": ["VIEW", "RATING", "PURCHASE", "NOPE"],
    "value": [None, 4.0, 0, 6, -1, "3"],
    "event_timestamp": ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.5+02:00", "2026-01-01T00:00:00",
                        "2100-01-01T00:00:00Z", "junk", 5],
}


def canonical_reasons(bodies: list[dict]) -> list[str | None]:
    """The canonical rules on all bodies at once (pandas), as the batch loaders apply them."""
    frame = pd.DataFrame.from_records(bodies)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True, errors="coerce", format="ISO8601")
    for col in ("user_id", "item_id"):  # the wire wants JSON integers
        frame[col] = frame[col].where(pd.Series([type(b[col]) is int for b in bodies]), None)
    reasons = event_reject_reasons(frame, KNOWN, NOW)[0]
    return [None if pd.isna(r) else str(r) for r in reasons]


def test_every_variant_gets_the_canonical_verdict() -> None:
    base = json.loads(event_to_message(new_event(5, 7, "VIEW", ts=datetime(2026, 1, 1, tzinfo=timezone.utc)))[1])
    bodies = [{**base, **dict(zip(VARIANTS, combo))} for combo in itertools.product(*VARIANTS.values())]
    decoded = decode_batch([json.dumps(b).encode() for b in bodies], KNOWN, NOW)
    reasons = dict(decoded.rejected)
    accepted = set(decoded.index.tolist())
    for i, (body, expected) in enumerate(zip(bodies, canonical_reasons(bodies))):
        assert (reasons.get(i), i in accepted) == (expected, expected is None), body
    assert len(accepted) + len(reasons) == len(bodies)


def test_accepted_events_keep_their_values_and_order() -> None:
    events = [new_event(3, 9, "RATING", value=4.5, ts=datetime(2026, 1, 1, 0, 0, 1, 5, tzinfo=timezone.utc),
                        event_id="a"),
              new_event(4, 8, "VIEW", event_id="b"),  # item 8 is outside the catalogue
              new_event(4, 7, "CLICK", ts=datetime(2026, 1, 1, 1, tzinfo=timezone.utc), event_id="c")]
    decoded = decode_batch([event_to_message(e)[1] for e in events] + [b"", b"{"], KNOWN, NOW)
    assert decoded.index.tolist() == [0, 2] and decoded.event_id == ["a", "c"]
    assert decoded.user_id.tolist() == [3, 4] and decoded.item_id.tolist() == [9, 7]
    assert decoded.value[0] == 4.5 and np.isnan(decoded.value[1])
    assert decoded.ts_us.tolist() == [1_767_225_601_000_005, 1_767_229_200_000_000]
    assert [r for _, r in decoded.rejected][:2] == ["item_id not in catalogue", "empty message"]


def test_check_event_names_the_reason() -> None:
    with pytest.raises(InvalidEvent, match="unknown event_type"):
        check_event(new_event(1, 7, "LIKE"))
    check_event(new_event(1, 7, "VIEW"), KNOWN)
