"""FAISS over item embeddings: inner product for user -> item, cosine for item -> item.

- **Kind by size**: exact search (``IndexFlat``) up to ``exact_max_items`` items, HNSW above.
- **Ids**: every index is an ``IndexIDMap2``, so FAISS returns item ids directly. A k larger
  than the index is trimmed to its size; a slot HNSW could not fill comes back as id -1 with
  score -inf (and candidate generation skips it).
- **Recall report**: when built, an HNSW index measures its recall@10 against exact search on a
  sample of queries, starting from a small ``efSearch`` and doubling it (up to ``ef_search_max``)
  until it reaches ``target_recall``: the fastest setting that is good enough. The numbers are in
  :attr:`ItemIndex.report`.
- **New items without a rebuild**: :meth:`ItemIndex.add_items`; an item without an ALS vector
  gets the mean vector of the items of its category (the global mean when the category is new).
- **Save and load**: ``index.faiss`` + ``meta.json`` + ``categories.npz`` in a folder; a reloaded
  index returns identical scores.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recsys.arrays import positions

log = logging.getLogger(__name__)

Metric = Literal["ip", "cosine"]
Kind = Literal["auto", "flat", "hnsw"]
INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
CATEGORIES_FILE = "categories.npz"
NO_CATEGORY = -1
TIE_MARGIN = 8


@dataclass(frozen=True)
class IndexConfig:
    """How an item index is built. ``kind="auto"`` picks exact search for catalogues of at most
    ``exact_max_items`` items (exact is fast enough there and has recall 1), HNSW above."""

    kind: Kind = "auto"
    exact_max_items: int = 50_000
    #: 16 links per node: on clustered vectors its recall is high enough and it builds faster than
    #: 32 (benchmarks/training.py measures both; the numbers are in benchmarks/results/)
    hnsw_m: int = 16
    ef_construction: int = 80
    #: where the calibration starts; it doubles efSearch until the measured recall reaches
    #: target_recall, so the index searches with the smallest (fastest) efSearch that does
    ef_search: int = 16
    ef_search_max: int = 2048
    target_recall: float = 0.97
    recall_k: int = 10
    recall_queries: int = 1_000
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ("auto", "flat", "hnsw"):
            problems.append(f"kind={self.kind!r} must be auto, flat or hnsw")
        for name in ("exact_max_items", "hnsw_m", "ef_construction", "ef_search", "recall_k", "recall_queries"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.ef_search_max < self.ef_search:
            problems.append(f"ef_search_max={self.ef_search_max} must be >= ef_search={self.ef_search}")
        if not 0.0 < self.target_recall <= 1.0:
            problems.append(f"target_recall={self.target_recall} must be within (0, 1]")
        if problems:
            raise ValueError("invalid index config: " + "; ".join(problems))

    def kind_for(self, n_items: int) -> Literal["flat", "hnsw"]:
        if self.kind != "auto":
            return self.kind
        return "flat" if n_items <= self.exact_max_items else "hnsw"


def _faiss_metric(metric: Metric) -> int:
    import faiss

    if metric not in ("ip", "cosine"):
        raise ValueError(f"metric={metric!r}: choose 'ip' (user -> item) or 'cosine' (item -> item)")
    return faiss.METRIC_INNER_PRODUCT  # cosine = inner product of L2-normalized vectors


def _prepare(vectors: np.ndarray, metric: Metric, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"vectors have {x.shape[1]} dimensions, the index has {dim}: use vectors of the same model")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinity: fix the embeddings before indexing")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1.0)  # a zero vector stays zero rather than NaN
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class CategoryMeans:
    """Running sums of real (ALS) vectors per category: the vector of a new item without one."""

    sums: dict[int, np.ndarray] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    item_category: dict[int, int] = field(default_factory=dict)

    def add(self, item_ids: np.ndarray, vectors: np.ndarray, categories: np.ndarray) -> None:
        for item, cat in zip(item_ids.tolist(), categories.tolist()):
            self.item_category[item] = cat
        for cat in np.unique(categories):
            rows = categories == cat
            key = int(cat)
            total = vectors[rows].astype(np.float64).sum(axis=0)
            self.sums[key] = self.sums[key] + total if key in self.sums else total
            self.counts[key] = self.counts.get(key, 0) + int(rows.sum())

    def mean(self, category: int) -> np.ndarray:
        if self.counts.get(category):
            return (self.sums[category] / self.counts[category]).astype(np.float32)
        if not self.counts:
            raise ValueError("the index has no vectors to derive a new item's vector from")
        total = np.sum(np.stack(list(self.sums.values())), axis=0)
        return (total / sum(self.counts.values())).astype(np.float32)

    def save(self, path: Path) -> None:
        cats = np.array(sorted(self.counts), dtype=np.int64)
        np.savez(path, categories=cats, counts=np.array([self.counts[c] for c in cats.tolist()], dtype=np.int64),
                 sums=np.stack([self.sums[c] for c in cats.tolist()]) if len(cats) else np.empty((0, 0)),
                 items=np.array(list(self.item_category), dtype=np.int64),
                 item_categories=np.array(list(self.item_category.values()), dtype=np.int64))

    @classmethod
    def load(cls, path: Path) -> CategoryMeans:
        data = np.load(path)
        cats = data["categories"].tolist()
        return cls(sums={c: data["sums"][i] for i, c in enumerate(cats)},
                   counts={c: int(data["counts"][i]) for i, c in enumerate(cats)},
                   item_category=dict(zip(data["items"].tolist(), data["item_categories"].tolist())))


class ItemIndex:
    """A FAISS index over item vectors whose ids are item ids. Build with :meth:`build`."""

    def __init__(self, index: Any, metric: Metric, kind: str, config: IndexConfig,
                 categories: CategoryMeans, report: dict[str, Any] | None = None) -> None:
        self._index = index
        self.metric = metric
        self.kind = kind
        self.config = config
        self.categories = categories
        self.report: dict[str, Any] = report or {}
        self._sorted_ids: np.ndarray | None = None  # cache for contains(); reset when items are added

    # ---- building ---------------------------------------------------------------------------

    @classmethod
    def build(cls, item_ids: np.ndarray, vectors: np.ndarray, metric: Metric, config: IndexConfig | None = None,
              categories: np.ndarray | None = None, queries: np.ndarray | None = None) -> ItemIndex:
        """Index ``vectors`` (row i = ``item_ids[i]``). ``categories`` (aligned) enable the vectors
        of new items; ``queries`` are what the recall report searches with (default: a sample of
        the items themselves, which is what item -> item search asks)."""
        import faiss

        config = config or IndexConfig()
        item_ids = np.asarray(item_ids, dtype=np.int64)
        raw = np.asarray(vectors, dtype=np.float32)
        if raw.ndim != 2 or len(item_ids) != len(raw) or len(raw) == 0:
            raise ValueError(f"need one vector per item: got {len(item_ids)} ids and vectors of shape {raw.shape}")
        if len(np.unique(item_ids)) != len(item_ids):
            raise ValueError("item_ids has duplicates: each item may appear once in an index")
        faiss_metric = _faiss_metric(metric)
        x = _prepare(raw, metric)
        dim = x.shape[1]
        kind = config.kind_for(len(item_ids))
        start = time.perf_counter()
        base: Any
        if kind == "flat":
            base = faiss.IndexFlat(dim, faiss_metric)
        else:
            base = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss_metric)
            base.hnsw.efConstruction = config.ef_construction
            base.hnsw.efSearch = config.ef_search
        index = faiss.IndexIDMap2(base)
        index.add_with_ids(x, item_ids)
        build_s = time.perf_counter() - start
        means = CategoryMeans()
        cats = np.full(len(item_ids), NO_CATEGORY, np.int64) if categories is None else np.asarray(categories, np.int64)
        means.add(item_ids, raw, cats)
        built = cls(index, metric, kind, config, means)
        built.report = {"kind": kind, "metric": metric, "items": int(len(item_ids)), "dim": int(dim),
                        "build_s": round(build_s, 3), **built._calibrate(x, queries)}
        log.info("built %s index (%s) over %d items x %d dims in %.1fs: recall@%d %.3f vs exact (efSearch %s)",
                 kind, metric, len(item_ids), dim, build_s, config.recall_k, built.report["recall_at_k"],
                 built.report.get("ef_search"))
        return built

    def _calibrate(self, x: np.ndarray, queries: np.ndarray | None) -> dict[str, Any]:
        """Measure recall@k against exact search; for HNSW raise efSearch until the target."""
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        if queries is None:
            queries = x[rng.choice(len(x), size=min(cfg.recall_queries, len(x)), replace=False)]
        else:
            queries = np.asarray(queries, dtype=np.float32)
            queries = queries[rng.choice(len(queries), size=min(cfg.recall_queries, len(queries)), replace=False)]
        q = _prepare(queries, self.metric, self.dim)
        if self.kind == "flat":
            return {"recall_at_k": 1.0, "recall_k": cfg.recall_k, "recall_queries": len(q)}
        exact = exact_search(x, self.ids(), q, cfg.recall_k)
        ef = cfg.ef_search
        while True:
            self._hnsw().efSearch = ef
            recall = recall_against(self.search(q, cfg.recall_k, prepared=True)[1], exact)
            if recall >= cfg.target_recall or ef >= cfg.ef_search_max:
                break
            ef = min(ef * 2, cfg.ef_search_max)
        if recall < cfg.target_recall:
            log.warning("HNSW recall@%d %.3f is below the target %.2f at efSearch %d: raise hnsw_m or ef_construction",
                        cfg.recall_k, recall, cfg.target_recall, ef)
        return {"recall_at_k": round(recall, 4), "recall_k": cfg.recall_k, "recall_queries": len(q), "ef_search": ef}

    def _hnsw(self) -> Any:
        import faiss

        return faiss.downcast_index(self._index.index).hnsw

    # ---- querying ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        """Item ids in insertion order (row i of the stored vectors)."""
        import faiss

        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def contains(self, item_ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``item_ids`` are in the index."""
        if self._sorted_ids is None:
            self._sorted_ids = np.sort(self.ids())
        return positions(self._sorted_ids, item_ids)[1]

    def search(self, queries: np.ndarray, k: int, prepared: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item_ids), each (n_queries x min(k, len(index))); best first, ties by item id;
        slots FAISS could not fill hold item id -1 and score -inf."""
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        q = queries if prepared else _prepare(queries, self.metric, self.dim)
        k_eff = min(k, len(self))
        if k_eff == 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        # FAISS cuts ties at the k-th score arbitrarily: fetch a few more, order equal scores by
        # item id, then cut (ties wider than the margin still resolve deterministically)
        scores, ids = self._index.search(q, min(k_eff + TIE_MARGIN, len(self)))
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)[:, :k_eff]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def vectors(self, item_ids: np.ndarray) -> np.ndarray:
        """The stored vectors (normalized for cosine) of ``item_ids``; KeyError for unknown ids."""
        ids = np.ascontiguousarray(item_ids, dtype=np.int64)
        if not len(ids):
            return np.empty((0, self.dim), dtype=np.float32)
        try:  # one call into FAISS, not one per id (the service reads ~150 per request)
            return np.asarray(self._index.reconstruct_batch(ids), dtype=np.float32).reshape(len(ids), self.dim)
        except RuntimeError:  # some id is unknown: name the first
            missing = ids[~self.contains(ids)]
            raise KeyError(f"item {int(missing[0]) if len(missing) else ids[0]} is not in the index") from None

    # ---- updating ---------------------------------------------------------------------------

    def add_items(self, item_ids: np.ndarray, vectors: np.ndarray | None = None,
                  categories: np.ndarray | None = None) -> np.ndarray:
        """Add new items without a rebuild; returns the raw vectors used. Rows of ``vectors`` that
        are NaN (or ``vectors=None``) get the mean vector of the item's category."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        existing = self.contains(item_ids)
        if existing.any():
            raise ValueError(f"items {item_ids[existing][:5].tolist()} are already in the index: "
                             "rebuild it (recsys index build) to change their vectors")
        cats = np.full(len(item_ids), NO_CATEGORY, np.int64) if categories is None else np.asarray(categories, np.int64)
        raw = np.full((len(item_ids), self.dim), np.nan, np.float32) if vectors is None else \
            np.array(vectors, dtype=np.float32).reshape(len(item_ids), self.dim)
        derived = np.isnan(raw).any(axis=1)
        for row in np.flatnonzero(derived):
            raw[row] = self.categories.mean(int(cats[row]))
        self._index.add_with_ids(_prepare(raw, self.metric, self.dim), item_ids)
        self._sorted_ids = None
        # only real vectors count as evidence about a category; derived ones just record it
        self.categories.add(item_ids[~derived], raw[~derived], cats[~derived])
        for item, cat in zip(item_ids[derived].tolist(), cats[derived].tolist()):
            self.categories.item_category[item] = cat
        log.info("added %d items (%d with a category-mean vector) to the %s index", len(item_ids),
                 int(derived.sum()), self.metric)
        return raw

    # ---- persistence ------------------------------------------------------------------------

    def save(self, folder: Path) -> Path:
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(folder / INDEX_FILE))
        meta: dict[str, Any] = {"metric": self.metric, "kind": self.kind, "config": asdict(self.config),
                                "report": self.report}
        if self.kind == "hnsw":
            meta["ef_search"] = int(self._hnsw().efSearch)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        self.categories.save(folder / CATEGORIES_FILE)
        return folder

    @classmethod
    def load(cls, folder: Path) -> ItemIndex:
        import faiss

        folder = Path(folder)
        if not (folder / INDEX_FILE).is_file():
            raise FileNotFoundError(f"no index at {folder}: run `recsys index build` first")
        meta = json.loads((folder / META_FILE).read_text())
        loaded = cls(faiss.read_index(str(folder / INDEX_FILE)), meta["metric"], meta["kind"],
                     IndexConfig(**meta["config"]), CategoryMeans.load(folder / CATEGORIES_FILE), meta["report"])
        if loaded.kind == "hnsw":
            loaded._hnsw().efSearch = int(meta["ef_search"])
        return loaded


def exact_search(x: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k item ids by inner product (vectors already prepared for the metric)."""
    import faiss

    _, rows = faiss.knn(queries, x, min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
    return np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)


def recall_against(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each exact top-k row that ``found`` retrieved (-1 padding ignored)."""
    hits = [len(set(f[f >= 0].tolist()) & set(e[e >= 0].tolist())) / max(1, int((e >= 0).sum()))
            for f, e in zip(found, exact)]
    return float(np.mean(hits)) if hits else 0.0


def categories_for(item_ids: np.ndarray, category_of: Mapping[int, int]) -> np.ndarray:
    return np.array([category_of.get(int(i), NO_CATEGORY) for i in item_ids], dtype=np.int64)
