"""The embedding model: Qwen2-VL backbone → pooling → projection → L2 (see embedder.py)."""
from vipoly.model.embedder import COMPONENTS, EmbedOutput, PolyEmbedder, component_of
from vipoly.folder import is_polyembedder_dir
from vipoly.model.inputs import InputBuilder, decode_image
from vipoly.model.pooling import (AttentionPooling, LastTokenPooling, MeanPooling, MultiHeadAttentionPooling,
                                  build_pooling)
from vipoly.model.projection import ProjectionHead, matryoshka

__all__ = ["COMPONENTS", "EmbedOutput", "PolyEmbedder", "component_of", "is_polyembedder_dir", "InputBuilder",
           "decode_image", "AttentionPooling", "LastTokenPooling", "MeanPooling", "MultiHeadAttentionPooling",
           "build_pooling", "ProjectionHead", "matryoshka"]
