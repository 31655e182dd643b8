"""Vector tables and search over the embedding job's output (LanceDB); see index.py."""
from vipoly.search.index import (IndexConfig, IndexPlan, build_index, embedding_source, open_table, plan_index,
                                 read_embeddings, search)

__all__ = ["IndexConfig", "IndexPlan", "build_index", "embedding_source", "open_table", "plan_index",
           "read_embeddings", "search"]
