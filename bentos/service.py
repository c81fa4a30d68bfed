"""The BentoML recommendation service: ``bentoml serve`` from the repository root.

Endpoints: POST /recommend, /similar_items, /events (API key), /items (API key), /models (what
is served, the last reload and its failure); GET /healthz, /readyz and /metrics come from BentoML
(readiness also asks ``__is_ready__`` below).

The FAISS index, the ranker and the two-tower model are BentoML models pinned as class attributes, so
``bentoml build`` packages them; their folders and ``model_versions`` come from
:func:`bentos.factory.describe_models`, the derivation that ``recsys precompute`` uses on the same
store (:func:`bentos.factory.served_models`), so cached and live answers come from the same
models. They are the champion's (the pointer ``recsys retrain`` writes on a promotion), else the
store's latest. When the model store lacks one, the service starts without it (content, trending
and popularity only), logs why, and says so in ``model_versions``. A promotion while serving is
picked up without a restart (:mod:`bentos.reload`). An experiment's arms that pin other model
versions are served by engines of their own (:mod:`bentos.arm_engines`), read from the store at
start-up (``bentoml build`` packages the champion's models only).
"""

from __future__ import annotations

import faulthandler
import functools
import gc
import json
import logging
import signal
import threading
from datetime import datetime, timezone
from typing import Annotated, Any, Optional

import anyio
import bentoml
from annotated_types import Ge, Le

from bentos.auth import ApiKeyMiddleware
from bentos.cache import AsyncCacheReader
from bentos.config import service_observability, service_resources
from bentos.impressions import impression_logger
from bentos.metrics import count_unknown_context_keys
from bentos.new_items import ItemJournal
from bentos.schemas import (
    Context,
    EventAccepted,
    EventKind,
    EventRequest,
    ItemAdded,
    NewItem,
    RecommendRequest,
    RecommendResponse,
    SimilarItemsResponse,
)
from models.names import BENTO_INDEX_MODEL, BENTO_RANKER_MODEL, BENTO_TWO_TOWER_MODEL
from pipelines.impressions import new_request_id
from recsys import schema as S

log = logging.getLogger("bentos.service")

WRITE_ROUTES = ("/events", "/items")


def _pinned(name: str) -> Any:
    """A BentoModel reference to the champion's model (the store's latest when no champion was
    promoted: :func:`bentos.factory.champion_model`), else None: the service must also start
    before anything was trained (BentoML refuses to serve a missing pinned model)."""
    from models.champion import champion_tag

    tag = champion_tag(name) or f"{name}:latest"
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        return None
    return bentoml.models.BentoModel(tag)


def _stored(ref: Any) -> Any:
    """The stored model behind a pinned reference (None: not pinned). On an instance, BentoML
    resolves a pinned BentoModel to the stored model itself; a BentoModel still has ``stored``."""
    return getattr(ref, "stored", ref) if ref is not None else None


@bentoml.service(name="recsys", traffic={"timeout": 10, "max_concurrency": 256}, workers=1,
                  resources=service_resources(), **service_observability())
class Recommender:
    index_model = _pinned(BENTO_INDEX_MODEL)
    ranker_model = _pinned(BENTO_RANKER_MODEL)
    two_tower_model = _pinned(BENTO_TWO_TOWER_MODEL)

    def __init__(self) -> None:
        from bentos.arm_engines import build_engines
        from bentos.experiments import serving_experiment
        from bentos.factory import describe_models, new_items_log
        from recsys.config import load_settings

        # `kill -USR1 <worker pid>` writes every thread's stack to the log: what a start-up or a
        # request is stuck on, without stopping the worker
        faulthandler.register(signal.SIGUSR1, all_threads=True)

        self.settings = load_settings()
        # an invalid file or a pinned model missing from the store: logged, served without it
        self.experiment = serving_experiment(self.settings)
        models = describe_models(_stored(self.index_model), _stored(self.ranker_model),
                                 _stored(self.two_tower_model))
        # the champion's engine (self.engine) and one per model set an arm pins; any engine
        # answers a user with the models of the user's arm
        self.engines = build_engines(self.settings, models, self.experiment)
        self.engine = self.engines.default
        self.journal = ItemJournal()  # items added while serving: a swap never loses one
        self.cache = AsyncCacheReader(self.engine.cache, self.settings.effective_redis_url)
        self.reloader = _reloader(self)  # a promotion swaps self.engines (bentos/reload.py)
        self.impressions = impression_logger(self.settings)
        self.new_items_path = new_items_log(self.settings)
        self._producer: Any = None
        self._producer_lock = threading.Lock()
        self._listener = threading.Thread(target=self._listen_for_new_items, daemon=True, name="new-items")
        self._listener.start()
        # The catalogue, index maps and models are long-lived: move them out of the collector's
        # view so a full collection during a request does not walk them (tail latency).
        gc.collect()
        gc.freeze()

    @bentoml.on_shutdown
    def _close_impressions(self) -> None:
        self.impressions.close()  # send what the buffer holds, briefly

    def __is_ready__(self) -> bool:
        return len(self.engine.catalog) > 0

    @bentoml.api(route="/models")
    def models(self) -> dict[str, Any]:
        """What this worker serves, its last reload after a promotion and the last failure; in an
        experiment, under ``arms``, the ``model_versions`` each arm's answers carry."""
        return {**self.reloader.status(), "arms": self.engines.arm_versions()}

    def _swap(self, engines: Any) -> None:
        """One reference swap: requests holding the old engines finish on them, new ones get these."""
        self.engines = engines
        self.engine = engines.default
        self.cache.cache = engines.default.cache

    # ---- read endpoints ----------------------------------------------------------------------

    # the request models forbid unknown top-level fields (a typo in `k` must not pass silently);
    # unknown keys inside `context` are accepted and counted (bentos/schemas.py says why)
    @bentoml.api(route="/recommend", input_spec=RecommendRequest)
    async def recommend(self, user_id: int, k: int = 10, context: Optional[Context] = None) -> RecommendResponse:
        """Top-k items for a user now; an unknown user is a cold-start user."""
        if context is not None:
            count_unknown_context_keys("recommend", context.unknown_keys)
        ctx = context.model_dump(exclude_none=True) if context else None
        rec = await self.cache.lookup(user_id, k, ctx)  # a hit never leaves the event loop
        if rec is None:  # the miss path is CPU work (FAISS, the ranker): a worker thread
            rec = await anyio.to_thread.run_sync(
                functools.partial(self.engine.recommend, user_id, k, ctx, cache_checked=True))
        # the id goes beside the answer, not into it: coalesced misses share one answer object
        request_id = new_request_id()
        self.impressions.log(rec, request_id, rec.arm)  # O(1), never waits (bentos/impressions.py)
        return RecommendResponse(request_id=request_id, **rec.to_dict())

    @bentoml.api(route="/similar_items")
    def similar_items(
        self,
        item_id: Annotated[int, Ge(0)],
        k: Annotated[int, Ge(1), Le(100)] = 10,
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> SimilarItemsResponse:
        """Items most similar to one item (cosine of ALS vectors; category neighbours otherwise)."""
        try:
            items = self.engine.similar_items(item_id, k)
        except KeyError:
            ctx.response.status_code = 404
            return SimilarItemsResponse(item_id=item_id, items=[])
        return SimilarItemsResponse(item_id=item_id, items=items)

    # ---- write endpoints (the API key is checked by ApiKeyMiddleware before the body) ---------

    def _get_producer(self) -> Any:
        from pipelines.events import EventProducer

        with self._producer_lock:
            if self._producer is None:
                self._producer = EventProducer(self.settings.effective_kafka_bootstrap, self.settings.events_topic,
                                               request_timeout_ms=2000, max_block_ms=2000, bootstrap_timeout_ms=2000)
            return self._producer

    @bentoml.api(route="/events", input_spec=EventRequest)
    def events(
        self,
        user_id: int,
        item_id: int,
        event_type: EventKind,
        value: Optional[float] = None,
        session_id: Optional[str] = None,
        context: Optional[Context] = None,
        request_id: Optional[str] = None,
        position: Optional[int] = None,
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> EventAccepted:
        """Record a clickstream event: the server fills event_id and the time, then Kafka."""
        from pipelines.events import new_event

        if context is not None:
            count_unknown_context_keys("events", context.unknown_keys)

        event = new_event(user_id, item_id, event_type, value=value, session_id=session_id,
                          context=context.model_dump(exclude_none=True, exclude={"categories"}) if context else None,
                          request_id=request_id, position=position)
        stamp = event[S.COL_TS].isoformat()
        try:
            self._get_producer().send(event).get(timeout=2)
        except Exception as exc:  # noqa: BLE001 - any Kafka failure: tell the client to retry, never drop silently
            log.warning("Kafka unavailable for /events: %s", exc)
            with self._producer_lock:
                self._producer = None  # reconnect on the next call
            ctx.response.status_code = 503
            ctx.response.headers["Retry-After"] = "5"
            return EventAccepted(event_id=event[S.COL_EVENT_ID], event_timestamp=stamp, status="unavailable")
        return EventAccepted(event_id=event[S.COL_EVENT_ID], event_timestamp=stamp)

    @bentoml.api(route="/items", input_spec=NewItem)  # the item's fields at the top level of the body
    def items(self, **fields: Any) -> ItemAdded:
        """Add a new item: catalogue, FAISS (category-mean vector), persisted, broadcast to workers."""
        from bentos.factory import NEW_ITEMS_CHANNEL, record_new_item

        item = NewItem(**fields)
        row = item.model_dump()
        row[S.COL_CREATED_AT] = datetime.now(timezone.utc).isoformat()
        source = self.journal.add(lambda: self.engines, _parse_created(row))  # every arm's engine
        record_new_item(self.settings, row)  # the new-items log and the dataset's items table (the stream's catalogue)
        try:
            self.engine.client.publish(NEW_ITEMS_CHANNEL, json.dumps({"origin": id(self), "item": row}))
        except Exception as exc:  # noqa: BLE001 - other workers will pick it up from the log on restart
            log.warning("could not broadcast new item %s: %s", item.item_id, exc)
        return ItemAdded(item_id=item.item_id, indexed=self.engine.index is not None, embedding_from=source)

    def _listen_for_new_items(self) -> None:
        """Add items that other workers received, as they arrive (Redis pub/sub)."""
        import time

        from bentos.factory import NEW_ITEMS_CHANNEL, redis_client

        while True:
            try:
                pubsub = redis_client(self.settings, timeout_s=5.0).pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(NEW_ITEMS_CHANNEL)
                for message in pubsub.listen():
                    body = json.loads(message["data"])
                    if body.get("origin") != id(self):
                        self.journal.add(lambda: self.engines, _parse_created(body["item"]))
            except Exception as exc:  # noqa: BLE001 - keep listening across Redis restarts
                log.debug("new-item listener reconnecting: %s", exc)
                time.sleep(1.0)


def _reloader(service: Recommender) -> Any:
    """Poll the champion and swap in new engines on a promotion, in this worker (pinned arms keep
    their pins; the models they do not pin follow the champion)."""
    from bentos.arm_engines import build_engines
    from bentos.factory import served_models
    from bentos.reload import ModelReloader

    build_started = [0.0]  # the reloader builds one set at a time (its lock): one slot suffices

    def build(models: Any) -> Any:
        build_started[0] = service.journal.now()
        return build_engines(service.settings, models, service.experiment)

    def swap(engines: Any) -> None:
        late = service.journal.swap(engines, build_started[0], service._swap)
        if late:
            log.info("%d item(s) added during the reload were added to the new engines", late)

    reloader = ModelReloader(lambda: service.engines, served_models, build, swap,
                             service.settings.model_reload_poll_s)
    # the first check now, before the worker is ready: it imports the model store's client
    # (mlflow), a second of the GIL that would otherwise fall on the requests of the first poll
    reloader.check_once()
    reloader.start()
    return reloader


def _parse_created(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out[S.COL_CREATED_AT] = datetime.fromisoformat(str(row[S.COL_CREATED_AT]))
    return out


Recommender.add_asgi_middleware(ApiKeyMiddleware, protected=WRITE_ROUTES)
