"""Loading the Qwen2-VL backbone and its processor, from a hub id or a local folder.

Design choices:
- The backbone is the bare `Qwen2VLModel` (vision tower + language model, no LM head): an embedder
  needs hidden states, not logits. `Qwen2VLModel.from_pretrained` also reads checkpoints saved from
  `Qwen2VLForConditionalGeneration` (the hub's Qwen2-VL-2B-Instruct) and drops the LM head.
- The processor (tokenizer + PIL image processor) is in `vipoly.model.processor`, which does not
  import the model code.
- The vision tower's patch embedding is a Conv3d whose kernel equals its stride: a matrix product
  over flattened patches in disguise. cuDNN runs it as a convolution, slowly (tens of times slower
  than the GEMM on some cards and dtypes), so `load_backbone` turns it into that GEMM
  (`LinearPatchEmbed`: same weight tensor, same state-dict names, same outputs).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Qwen2VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

if not torch.cuda.is_available():
    # transformers' save_pretrained imports deepspeed where it is installed, and deepspeed then warns
    # in every process that it found no accelerator and chose the CPU: tell it so up front.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_attn_implementation(name: str) -> str:
    """`auto` on a CUDA device → FlashAttention-2 where the flash_attn package is importable, else
    PyTorch's own varlen FlashAttention (packing.VARLEN) where this torch has it; SDPA otherwise."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    from vipoly.model.packing import VARLEN, varlen_available

    return VARLEN if varlen_available() else "sdpa"


@contextlib.contextmanager
def quiet_progress():
    """Hide transformers' per-shard progress bars (one per Ray actor is noise), then restore them."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class LinearPatchEmbed(PatchEmbed):
    """Qwen2-VL's PatchEmbed computed as one GEMM over flattened patches (see the module docstring).
    Only the forward differs, so a loaded PatchEmbed becomes one by a class swap
    (`patch_embed_as_linear`), keeping its parameter and its checkpoint name `proj.weight`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight  # (D, C, T, p, p): the input is (n, C·T·p·p) in the same order
        flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
        return F.linear(flat, weight.reshape(weight.shape[0], -1), self.proj.bias)


def patch_embed_as_linear(backbone: Qwen2VLModel) -> bool:
    """Swap the vision tower's PatchEmbed for `LinearPatchEmbed` where its convolution is a pure
    patch projection (kernel = stride, no padding, dilation or groups). Returns whether it did."""
    embed = getattr(getattr(backbone, "visual", None), "patch_embed", None)
    conv = getattr(embed, "proj", None)
    if type(embed) is not PatchEmbed or not isinstance(conv, torch.nn.Conv3d):
        return isinstance(embed, LinearPatchEmbed)
    if (tuple(conv.kernel_size) != tuple(conv.stride) or any(conv.padding) or conv.groups != 1
            or any(d != 1 for d in conv.dilation)):
        return False
    embed.__class__ = LinearPatchEmbed
    return True


def load_backbone(source: str | Path, attn_implementation: str = "auto", dtype: str = "float32") -> Qwen2VLModel:
    """The bare Qwen2-VL model (vision tower + language model) in `dtype` with the resolved attention."""
    from vipoly.model.packing import VARLEN, use_varlen

    attn = resolve_attn_implementation(attn_implementation)
    try:
        with quiet_progress():
            # The varlen kernel is switched on after loading: it needs one name per sub-model.
            model = Qwen2VLModel.from_pretrained(str(source), attn_implementation="sdpa" if attn == VARLEN else attn,
                                                 dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise ValueError(f"model.backbone {str(source)!r}: cannot load a Qwen2-VL model "
                         f"({str(e).splitlines()[0]})") from e
    if attn == VARLEN:
        use_varlen(model)
    patch_embed_as_linear(model)
    log.info("backbone %s: %s, attention=%s, dtype=%s", source, type(model).__name__, attn, dtype)
    return model


def add_task_tokens(backbone: Qwen2VLModel, processor, prefixes: list[str]) -> list[int]:
    """Add task prefixes as single tokens; a new embedding row starts at μ + ε, ε ~ N(0, (σ/10)²),
    with μ, σ the mean and per-coordinate std of the existing rows.

    The mean keeps a new token's first hidden states in the distribution the pretrained layers saw
    (a random row would be an outlier the first steps must undo); the small noise keeps the five
    prefixes distinct from the start. Qwen2-VL's embedding matrix has spare rows beyond the
    tokenizer, so usually nothing is resized. Returns the ids of added tokens.
    """
    tokenizer = processor.tokenizer
    before = len(tokenizer)
    tokenizer.add_tokens(prefixes, special_tokens=True)
    new_ids = [i for i in tokenizer.convert_tokens_to_ids(prefixes) if i >= before]
    if not new_ids:
        return []
    embed = backbone.get_input_embeddings()
    if len(tokenizer) > embed.num_embeddings:
        backbone.resize_token_embeddings(len(tokenizer))
        embed = backbone.get_input_embeddings()
    with torch.no_grad(), _whole(embed.weight):
        old = embed.weight[:before].float()
        noise = torch.randn(len(new_ids), old.shape[1]) * old.std(0) / 10
        embed.weight[new_ids] = (old.mean(0) + noise.to(old.device)).to(embed.weight.dtype)
    return new_ids


def _whole(param: torch.nn.Parameter):
    """The whole parameter inside the block when ZeRO-3 partitions it (rank 0's writes are kept and
    broadcast); nothing to do otherwise."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
