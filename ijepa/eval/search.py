"""Similarity search over L2-normalised embeddings: exact in torch, or approximate with faiss (optional).

Retrieval metrics use class labels as relevance: a gallery item is relevant to a query when it has the
query's class. ``recall@k`` is the share of queries with at least one relevant item among the top k;
``map`` is the mean average precision over the whole ranked gallery.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import atomic_save, read_checkpoint


class SearchIndex:
    """Normalised gallery embeddings plus what identifies each item (keys, labels, source paths)."""

    def __init__(
        self,
        embeddings: torch.Tensor,
        keys: Sequence[str],
        labels: torch.Tensor,
        sources: Sequence[str],
        meta: dict | None = None,
    ):
        if not (len(embeddings) == len(keys) == len(labels) == len(sources)):
            raise ValueError("embeddings, keys, labels and sources must have the same length")
        self.embeddings = F.normalize(embeddings.float(), dim=1)
        self.keys, self.labels, self.sources = list(keys), torch.as_tensor(labels), list(sources)
        self.meta = dict(meta or {})
        self._faiss = None

    def save(self, path: str | Path) -> None:
        atomic_save(
            {
                "embeddings": self.embeddings,
                "keys": self.keys,
                "labels": self.labels,
                "sources": self.sources,
                "meta": self.meta,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> SearchIndex:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"search index {path} not found: run the search stage first")
        d = read_checkpoint(path, what="search index", keys=("embeddings", "keys", "labels", "sources", "meta"))
        return cls(d["embeddings"], d["keys"], d["labels"], d["sources"], d["meta"])

    def encoder_checkpoint(self, index_path: str | Path) -> Path:
        """The encoder checkpoint recorded in ``meta``. A relative path (the stages record one relative to the
        repository, so that every clone writes the same index) is found from the working directory, else from
        the folders holding the index, nearest first; a path found nowhere is returned as recorded."""
        recorded = Path(self.meta["checkpoint"])
        if recorded.is_absolute() or recorded.exists():
            return recorded
        for folder in Path(index_path).absolute().parents:
            if (folder / recorded).exists():
                return folder / recorded
        return recorded

    def use_faiss(self, nlist: int = 256, nprobe: int = 16) -> None:
        """Switch to an approximate faiss IVF inner-product index (for galleries too large for exact search)."""
        try:
            import faiss
        except ImportError as e:
            raise RuntimeError("approximate search needs the faiss-cpu package: pip install faiss-cpu") from e
        x = self.embeddings.numpy()
        quant = faiss.IndexFlatIP(x.shape[1])
        index = faiss.IndexIVFFlat(quant, x.shape[1], min(nlist, len(x)), faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.add(x)
        index.nprobe = nprobe
        self._faiss = index

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D) queries -> (scores (M, k), gallery indices (M, k)), best first (cosine similarity)."""
        q = F.normalize(queries.float(), dim=1)
        k = min(k, len(self.embeddings))
        if self._faiss is not None:
            scores, idx = self._faiss.search(q.numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(idx).long()
        out_s, out_i = [], []
        for start in range(0, len(q), chunk):
            s, i = (q[start : start + chunk] @ self.embeddings.T).topk(k, dim=1)
            out_s.append(s)
            out_i.append(i)
        return torch.cat(out_s), torch.cat(out_i)


@torch.no_grad()
def retrieval_metrics(
    index: SearchIndex, queries: torch.Tensor, query_labels: torch.Tensor, ks: Sequence[int] = (1, 5), chunk: int = 512
) -> dict[str, float]:
    """recall@k for each k and mAP of same-class retrieval (exact ranking over the whole gallery)."""
    q = F.normalize(queries.float(), dim=1)
    hits = {k: 0 for k in ks}
    ap_sum = 0.0
    gallery = index.labels
    for start in range(0, len(q), chunk):
        sims = q[start : start + chunk] @ index.embeddings.T
        order = sims.argsort(dim=1, descending=True)
        rel = (gallery[order] == query_labels[start : start + chunk, None]).float()
        for k in ks:
            hits[k] += int(rel[:, :k].any(1).sum())
        ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float32)
        precision = rel.cumsum(1) / ranks
        n_rel = rel.sum(1).clamp_min(1)
        ap_sum += float(((precision * rel).sum(1) / n_rel).sum())
    n = len(q)
    return {**{f"recall@{k}": hits[k] / n for k in ks}, "map": ap_sum / n}
