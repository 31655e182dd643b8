"""The model's config section (`model.*`): backbone, pooling, projection, LoRA, what is frozen."""
from __future__ import annotations

import enum
from typing import Literal

from pydantic import Field, model_validator

from vipoly.section import Section


class PoolingKind(str, enum.Enum):
    ATTENTION = "attention"  # SPEC §1: learnable context vector v_a
    MEAN = "mean"
    LAST = "last"
    MULTIHEAD = "multihead"


class PoolingConfig(Section):
    kind: PoolingKind = PoolingKind.ATTENTION
    """Pooling over the last hidden states; `attention` is the method, the others are ablations."""
    init_std: float = Field(0.02, gt=0)
    """Std of the N(0, σ²) initialisation of the context vector(s) v_a."""
    num_heads: int = Field(4, ge=1)
    """Heads of `multihead` pooling (one learnable query per head, outputs concatenated)."""


class ProjectionConfig(Section):
    out_dim: int = Field(1024, ge=1)
    """Embedding size after p = LN(W2·GELU(LN(W1 c)))."""
    hidden_dim: int | None = None
    """Width of W1's output; None = the backbone hidden size D."""
    matryoshka_dims: list[int] = [1024, 512, 256, 128]
    """Prefix sizes that stay useful after truncation (trained with the same loss when enabled)."""
    matryoshka: bool = False
    """Add the loss of each truncated prefix (Matryoshka representation learning)."""

    @model_validator(mode="after")
    def _dims_fit(self):
        bad = [d for d in self.matryoshka_dims if not 1 <= d <= self.out_dim]
        if bad:
            raise ValueError(f"model.projection.matryoshka_dims {bad} must lie in 1..out_dim={self.out_dim}")
        return self


LANGUAGE_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_LORA_TARGETS = ["qkv", "proj", "fc1", "fc2"]  # a Qwen2-VL vision block's attention and MLP


class LoraConfig(Section):
    """Low-rank adapters (LoRA, Hu et al. 2021; through `peft`) on the backbone, whose own weights
    then stay frozen; the pooling head and the projection always train fully. Training only: the
    exported model/ has the adapters merged (an ordinary PolyEmbedder folder), model/adapter/ holds
    them alone in peft's format."""

    r: int = Field(0, ge=0)
    """Rank of each adapter; 0 = no LoRA (full fine-tuning). VLM2Vec trains Qwen2-VL-2B at r = 16."""
    alpha: float = Field(32.0, gt=0)
    """Scale: an adapter adds (alpha / r)·B·A to its layer's weight."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapters' input while training."""
    target_modules: list[str] = LANGUAGE_LORA_TARGETS
    """Names of the language model's linear layers that get adapters (default: attention and MLP)."""
    vision: bool = False
    """Also adapt the vision tower's blocks (their `qkv`, `proj`, `fc1`, `fc2`)."""


class ModelConfig(Section):
    backbone: str = "Qwen/Qwen2-VL-2B-Instruct"
    """Hub id or local folder of a Qwen2-VL checkpoint (or a PolyEmbedder directory)."""
    pooling: PoolingConfig = PoolingConfig()
    """How token states become one vector (SPEC §1: attention pooling)."""
    projection: ProjectionConfig = ProjectionConfig()
    """The head from the pooled state to the embedding (SPEC §1: 1024-d, Matryoshka prefixes)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "vipoly_varlen"] = "auto"
    """`auto` on a GPU: FlashAttention-2 where flash_attn is installed, else PyTorch's varlen
    FlashAttention (`vipoly_varlen`, torch ≥ 2.9); SDPA on CPU. The varlen kinds run packed batches
    without any mask (padded batches go through SDPA)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Backbone weight dtype: float32 for training under bf16 autocast, bfloat16 to serve on a GPU.
    Pooling and projection always compute in float32."""
    task_tokens: bool = True
    """Add the five task prefixes to the vocabulary as single tokens (new rows start at the mean embedding)."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's activations in the backward pass (SPEC §4 uses it at scale): less
    activation memory for a second forward's compute."""
    max_length: int = Field(8192, ge=8)
    """Longest tokenised input (prefix + text + image tokens); longer ones are truncated."""
    image_max_pixels: int = Field(448 * 448, ge=28 * 28)
    """Images are resized so that h·w stays under this (Qwen2-VL dynamic resolution)."""
    image_min_pixels: int = Field(28 * 28, ge=4)
    """Images are resized so that h·w is at least this (pixels; Qwen2-VL's 28×28 patch merge)."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapters in the backbone (r = 0: full fine-tuning, SPEC's default)."""
    freeze: list[Literal["vision", "language", "embeddings"]] = []
    """Backbone parts that do not train: no gradient at all (not merely lr 0), no optimizer state,
    nothing for DDP to reduce. `language` is the language model less its input embeddings,
    `embeddings` those (the task tokens' rows too). The pooling head and the projection always
    train. A training setting: not saved with the model."""

    @model_validator(mode="after")
    def _pixels(self):
        if self.image_min_pixels > self.image_max_pixels:
            raise ValueError(f"model.image_min_pixels ({self.image_min_pixels}) exceeds "
                             f"model.image_max_pixels ({self.image_max_pixels})")
        return self
