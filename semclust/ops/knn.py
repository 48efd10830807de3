from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import validate as V
from . import reference
from .dispatch import register, resolve

register("torch", "knn")(reference.knn)


def knn(
    x: Tensor,
    k: int,
    queries: Optional[Tensor] = None,
    exclude_self: bool = True,
    query_chunk: int = 4096,
    database_chunk: int = 65536,
) -> tuple[Tensor, Tensor]:
    """Exact top-k neighbours by inner product (cosine for L2-normalised rows).

    Database `x` [N, D]; `queries` [Q, D] (default: x itself, then `exclude_self` drops
    each row's own index). Scores the database one [query_chunk, database_chunk] tile at
    a time (the torch backend also caps a tile at 2^23 scores, the extension uses fixed
    tiles) with a running top-k, so memory is O(query_chunk x (database_chunk + k)).
    Ties keep the lower database index.

    Returns:
        (scores [Q, k] in the queries' dtype, indices [Q, k] int64), best first.
    """
    V.matrix("x", x)
    if queries is not None:
        V.matrix("queries", queries, cols=x.shape[1])
        V.same_device(x=x, queries=queries)
    candidates = x.shape[0] - (1 if queries is None and exclude_self else 0)
    k = V.count("k", k, 1, candidates, what=f" (only {candidates} candidate neighbours exist)")
    V.count("query_chunk", query_chunk, 1)
    V.count("database_chunk", database_chunk, 1)
    _, impl = resolve("knn", x.device)
    return impl(x, k, queries=queries, exclude_self=exclude_self, query_chunk=query_chunk, database_chunk=database_chunk)
