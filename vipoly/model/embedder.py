"""PolyEmbedder: Qwen2-VL backbone → pooling → projection → L2, one vector for text, image or both.

    H = Qwen2VL(x) ∈ R^{N×D},  c = pool(H, M),  p = LN(W₂·GELU(LN(W₁ c))),  e = p / ‖p‖₂

A saved PolyEmbedder is a self-contained folder:

    vipoly.json             name, format, the ModelConfig, hidden size and embedding size
    config.json             the Qwen2-VL backbone config
    model.safetensors       backbone weights (sharded `model-*.safetensors` for large models)
    heads.safetensors       pooling + projection weights, float32
    tokenizer*.json, preprocessor_config.json
    modules.json, config_sentence_transformers.json   the same folder as a sentence-transformers
                            model (vipoly.st); a training run's export adds README.md, the model card

No pickles anywhere. The backbone half is an ordinary Qwen2-VL folder, so `Qwen2VLModel
.from_pretrained(dir)` also reads it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2VLModel

from vipoly.model.config import ModelConfig
from vipoly.model.backbone import add_task_tokens, load_backbone, quiet_progress
from vipoly.model.processor import load_processor, save_processor
from vipoly.folder import META_FILE, is_polyembedder_dir, read_meta
from vipoly.model.inputs import InputBuilder, apply_explicit, decode_image
from vipoly.model.packing import FLASH_IMPLEMENTATIONS, attention_inputs, pool_packed, unpack, use_varlen
from vipoly.model.pooling import build_pooling
from vipoly.model.projection import ProjectionHead, matryoshka
from vipoly.st import write_st_files
from vipoly.tasks import TASKS, check_task, prefix

log = logging.getLogger(__name__)

FORMAT = 1
HEADS_FILE = "heads.safetensors"
COMPONENTS = ("vision", "language", "pooling", "projection")


@dataclass
class EmbedOutput:
    embedding: torch.Tensor
    """(B, out_dim) float32, L2-normalised."""
    pooled: torch.Tensor
    """(B, D) float32, the pooled hidden state c before projection."""
    pooling_weights: torch.Tensor
    """(B, N) weight of each token in c ((B, H, N) for multi-head pooling); 0 on padding."""
    attention_mask: torch.Tensor
    """(B, N) the mask the pooling used."""


def component_of(param_name: str) -> str:
    """'vision' | 'language' | 'pooling' | 'projection' for a parameter name of a PolyEmbedder
    (also under DDP's `module.` or torch.compile's `_orig_mod.` prefixes). Used for the
    differential learning rates and the per-component gradient norms (SPEC §4)."""
    name = param_name
    for wrapper in ("module.", "_orig_mod."):
        while name.startswith(wrapper):
            name = name[len(wrapper):]
    if name.startswith("pooling."):
        return "pooling"
    if name.startswith("projection."):
        return "projection"
    if name.startswith("backbone.visual.") or name.startswith("backbone.model.visual."):
        return "vision"
    if name.startswith("backbone."):
        return "language"
    raise ValueError(f"parameter {param_name!r} belongs to no PolyEmbedder component")


class PolyEmbedder(nn.Module):
    def __init__(self, backbone: Qwen2VLModel, processor, cfg: ModelConfig, name: str = "vipoly"):
        super().__init__()
        _check_processor_matches(processor, backbone)
        self.backbone = backbone
        self.processor = processor
        self.cfg = cfg
        self.name = name
        self.pooling = build_pooling(cfg.pooling, self.hidden_size)
        self.projection = ProjectionHead(self.hidden_size, cfg.projection)
        self.inputs = InputBuilder(processor, cfg)

    # ------------------------------------------------------------ sizes and parts
    @property
    def hidden_size(self) -> int:
        return self.backbone.config.text_config.hidden_size

    @property
    def embedding_dim(self) -> int:
        return self.cfg.projection.out_dim

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """{component: [(name, parameter)]} for vision, language, pooling, projection."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {c: [] for c in COMPONENTS}
        for name, param in self.named_parameters():
            groups[component_of(name)].append((name, param))
        return groups

    def enable_gradient_checkpointing(self) -> None:
        # Non-reentrant checkpointing needs no input that requires grad and works under DDP.
        kwargs = {"use_reentrant": False}
        if hasattr(self.backbone, "activation_checkpointing_enable"):  # transformers ≥ 5.2x name
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def packs_by_default(self) -> bool:
        """Whether the language model's attention is a varlen FlashAttention kind, whose packed
        batches cost nothing extra (SDPA's would need a T×T mask): then inference packs."""
        return self.backbone.language_model.config._attn_implementation in FLASH_IMPLEMENTATIONS

    def collate(self, rows: list[dict[str, Any]], packed: bool | None = None) -> dict[str, torch.Tensor]:
        """Rows from `InputBuilder.encode_one` → one batch: packed if `packed` (None: where
        `packs_by_default`), else right-padded."""
        use_pack = self.packs_by_default if packed is None else packed
        return self.inputs.pack(rows) if use_pack else self.inputs.pad(rows)

    def compile_layers(self) -> None:
        """torch.compile each language-model decoder layer and each vision block in place (their
        elementwise work fuses; the layer boundaries keep graphs small and shared by all layers).
        A vision tower on SDPA splits its attention per image, which only breaks graphs: there only
        the MLPs are compiled. The state-dict names do not change."""
        for layer in self.backbone.language_model.layers:
            layer.compile()
        whole = "flash" in (self.backbone.visual.config._attn_implementation or "")
        for block in self.backbone.visual.blocks:
            (block if whole else block.mlp).compile()

    # ------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None) -> EmbedOutput:
        """A batch from `InputBuilder.pad` (or, with `cu_seqlens`, from `InputBuilder.pack`: see
        `forward_packed`) → normalised embeddings. Pooling and projection run in float32 with autocast
        off, whatever the backbone's dtype. Both kinds go through `forward`, so DDP sees them."""
        if cu_seqlens is not None:
            return self.forward_packed(input_ids, position_ids, cu_seqlens, seq_ids, pixel_values=pixel_values,
                                       image_grid_thw=image_grid_thw)
        if attention_mask is None:
            raise ValueError("forward: a padded batch needs attention_mask (a packed one needs cu_seqlens)")
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.inputs.image_pad_id).int()
        embeds = self._input_embeds(input_ids, pixel_values, image_grid_thw)
        # input_ids and image_grid_thw still go in: the backbone derives the 3-D positions from them
        hidden = self.backbone(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                               mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                               use_cache=False).last_hidden_state
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            pooled, weights = self.pooling(hidden.float(), attention_mask)
            embedding = F.normalize(self.projection(pooled), dim=-1)
        return EmbedOutput(embedding, pooled, weights, attention_mask)

    def _input_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                      image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image features put where the image tokens are (or, in a training
        batch with no image, `_blank_image`). Done here, before the backbone's forward, for every
        batch: the modules then run in one order whether a batch has images or not, which ZeRO-3's
        parameter prefetch relies on (it replays the order of the first step; a batch of the other
        kind stopped the run with "tracing error")."""
        embeds = self.backbone.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            image = self.backbone.get_image_features(pixel_values, image_grid_thw)
            image = torch.cat(list(getattr(image, "pooler_output", image))).to(embeds.device, embeds.dtype)
            image_mask, _ = self.backbone.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=image)
            return embeds.masked_scatter(image_mask, image)
        if self._needs_blank_image(pixel_values):
            return embeds + self._blank_image(embeds)
        return embeds

    def _needs_blank_image(self, pixel_values: torch.Tensor | None) -> bool:
        """A training batch with no image, while the vision tower trains or ZeRO-3 partitions it
        (frozen or not, its weights are then gathered by a collective every worker must join):
        `_blank_image` then."""
        return self.training and pixel_values is None and any(
            p.requires_grad or hasattr(p, "ds_id") for p in self.backbone.visual.parameters())

    def _blank_image(self, embeds_like: torch.Tensor) -> torch.Tensor:
        """0 × the features of one blank image, added to the input embeddings where images go,
        after them, so that every trained parameter takes part in every backward in the order an
        image batch gives. ZeRO reduces gradients at every backward in buckets filled in that
        order: workers whose batches used different parameters (or the same ones in another
        order) crashed, or summed one worker's vision gradients with another's language ones. DDP
        then needs no unused-parameter search either."""
        visual = self.backbone.visual
        cfg = self.backbone.config.vision_config
        merge = cfg.spatial_merge_size
        pixels = torch.zeros(merge * merge, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2,
                             device=embeds_like.device, dtype=next(visual.parameters()).dtype)
        image = self.backbone.get_image_features(pixels, torch.tensor([[1, merge, merge]], device=embeds_like.device))
        image = torch.cat(list(getattr(image, "pooler_output", image)))
        return 0.0 * image.sum().to(embeds_like.dtype)

    def forward_packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                       seq_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                       image_grid_thw: torch.Tensor | None = None, **_: Any) -> EmbedOutput:
        """A packed batch from `InputBuilder.pack` (B documents in one row of T tokens) → the same
        EmbedOutput as the padded batch of those rows: embedding (B, out), pooled (B, D), and the
        pooling weights and mask in the padded (B, N) layout.

        The vision tower runs as in `forward` (it never pads); the language model gets the packed
        positions and attends within each document only (packing.py says how, per attention kind).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"forward_packed: input_ids must be (1, T), got {tuple(input_ids.shape)}")
        if position_ids is None or position_ids.shape[0] != 4:
            raise ValueError("forward_packed: position_ids must be (4, 1, T) as InputBuilder.pack makes them")
        cu_seqlens = cu_seqlens.to(input_ids.device)
        if seq_ids is None:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=input_ids.device), lengths)
        seq_ids = seq_ids.reshape(-1)
        # (merged before the backbone's forward: the varlen arguments below reach the language model only)
        embeds = self._input_embeds(input_ids, pixel_values, image_grid_thw)
        text_config = self.backbone.language_model.config
        mask, attn_kwargs = attention_inputs(text_config._attn_implementation, cu_seqlens,
                                             getattr(text_config, "layer_types", None) or ["full_attention"])
        hidden = self.backbone(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask,
                               use_cache=False, **attn_kwargs).last_hidden_state
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            pooled, weights = pool_packed(self.pooling, hidden[0], seq_ids, cu_seqlens)
            embedding = F.normalize(self.projection(pooled), dim=-1)
        weights, attention_mask = unpack(weights, seq_ids, cu_seqlens)
        if weights.dim() == 3:  # multi-head: (B, N, heads) → (B, heads, N) as the padded pooler gives
            weights = weights.transpose(1, 2)
        return EmbedOutput(embedding, pooled, weights, attention_mask)

    def use_varlen_attention(self) -> None:
        """Switch the backbone to PyTorch's varlen FlashAttention for packed batches (SDPA for all
        else) and for the vision tower; see packing.VARLEN. For GPUs without the flash_attn package."""
        use_varlen(self.backbone)

    # ------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(self, texts: str | Sequence[str | None] | None = None, images: Any = None, task: str | None = None,
               batch_size: int = 32, dim: int | None = None, show_progress: bool = False,
               packed: bool | None = None) -> np.ndarray:
        """Embed texts, images, or (text, image) pairs → float32 (n, dim), rows L2-normalised.

        images: PIL images, PNG/JPEG bytes or file paths (one per row; a list per row for several).
        task: one of TASKS, prepended as its prefix; None for no prefix.
        dim: Matryoshka truncation e[:dim] / ‖e[:dim]‖ (None = the full size).
        Inputs are batched by length (less padding); each vector is the one the input gets alone.
        packed: feed packed batches (no padding at all); None = where the attention is a varlen
        FlashAttention kind, whose packed batches cost nothing extra (SDPA's would need a T×T mask).
        """
        rows = _rows(texts, images)
        check_task(task)
        if dim is not None and not 1 <= dim <= self.embedding_dim:
            raise ValueError(f"dim={dim} must lie in 1..{self.embedding_dim} (the embedding size)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        out = np.empty((len(rows), dim or self.embedding_dim), dtype=np.float32)
        # Rows are prepared and sorted a window at a time, so the decoded pixels held in memory stay
        # bounded however many images are passed.
        window = batch_size * 16
        progress = None
        if show_progress:
            from tqdm.auto import tqdm
            progress = tqdm(total=len(rows), desc=f"encode {self.name}", unit="input")
        was_training = self.training
        self.eval()
        try:
            for first in range(0, len(rows), window):
                encoded = [self._prepare(i, *rows[i], task) for i in range(first, min(len(rows), first + window))]
                order = np.argsort([-len(r["input_ids"]) for r in encoded], kind="stable")
                for start in range(0, len(encoded), batch_size):
                    idx = order[start:start + batch_size]
                    batch = {k: v.to(self.device) for k, v in self.collate([encoded[i] for i in idx], packed).items()}
                    with self._inference_autocast():
                        emb = self(**batch).embedding
                    out[first + idx] = matryoshka(emb, dim).float().cpu().numpy()
                    if progress is not None:
                        progress.update(len(idx))
        finally:
            self.train(was_training)
            if progress is not None:
                progress.close()
        return out

    def _prepare(self, i: int, text: str | None, image: Any, task: str | None) -> dict[str, np.ndarray]:
        try:  # decode here, so that the message can say which image is bad
            image = [decode_image(x) for x in image] if isinstance(image, (list, tuple)) else (
                None if image is None else decode_image(image))
        except ValueError as e:
            raise ValueError(f"images[{i}]: {e}") from None
        try:
            return self.inputs.encode_one(text, image, task)
        except ValueError as e:
            raise ValueError(f"row {i}: {e}") from None

    def _inference_autocast(self):
        # fp32 weights on a GPU: run the backbone in bf16 (FlashAttention-2 needs half precision).
        on_gpu = self.device.type == "cuda"
        fp32 = next(self.backbone.parameters()).dtype == torch.float32
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu and fp32)

    # ------------------------------------------------------------ build / save / load
    @classmethod
    def build(cls, model_cfg: ModelConfig, weights_from: str | Path | None = None) -> "PolyEmbedder":
        """A PolyEmbedder dir in `model_cfg.backbone` → `from_pretrained` (with `model_cfg`'s explicitly
        set fields applied); else a Qwen2-VL checkpoint (hub id or folder) with fresh heads.
        `weights_from`: a PolyEmbedder folder of this same model (a checkpoint's `model/`), loaded
        instead of `model_cfg.backbone`: the modules `model_cfg` describes, with its weights."""
        if weights_from is not None or is_polyembedder_dir(model_cfg.backbone):
            model = cls.from_pretrained(weights_from or model_cfg.backbone, model_cfg)
        else:
            processor = load_processor(model_cfg.backbone)
            backbone = load_backbone(model_cfg.backbone, model_cfg.attn_implementation, model_cfg.dtype)
            if model_cfg.task_tokens:
                add_task_tokens(backbone, processor, [prefix(t).strip() for t in TASKS])
            model = cls(backbone, processor, model_cfg, name="vipoly-" + Path(model_cfg.backbone.rstrip("/")).name)
            if model_cfg.gradient_checkpointing:
                model.enable_gradient_checkpointing()
        if model_cfg.lora.r:
            model.add_lora(model_cfg.lora)
        model.freeze(model_cfg.freeze)
        return model

    def add_lora(self, lora) -> None:
        """Adapters on the backbone's target layers (`model.lora`, through peft), put in place: the
        parameter names keep their `backbone.` prefix (components, optimizer groups, gradient
        norms), and every other backbone weight stops training."""
        import re

        import peft

        from vipoly.model.config import VISION_LORA_TARGETS

        pattern = rf"language_model\..*\.({'|'.join(map(re.escape, lora.target_modules))})"
        if lora.vision:
            pattern += rf"|visual\.blocks\..*\.({'|'.join(VISION_LORA_TARGETS)})"
        config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=pattern, bias="none")
        # Kept beside the modules, not among them: its parameters are the backbone's own.
        object.__setattr__(self, "_peft", peft.get_peft_model(self.backbone, config))

    @property
    def has_lora(self) -> bool:
        return self.__dict__.get("_peft") is not None

    def merge_lora(self, adapter_dir: str | Path | None = None) -> None:
        """Fold the adapters into the weights they adapt and drop them, in place (the model is an
        ordinary PolyEmbedder again); first write them alone to `adapter_dir` in peft's format."""
        if not self.has_lora:
            return
        peft_model = self.__dict__.pop("_peft")
        if adapter_dir is not None:
            peft_model.save_pretrained(str(adapter_dir))
        self.backbone = peft_model.merge_and_unload()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters that train, by name, on the CPU: a LoRA run's checkpoint (its frozen base
        comes back from `model.backbone`)."""
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def freeze(self, parts: list[str] | tuple[str, ...]) -> None:
        """Stop the gradients of backbone parts (`model.freeze`): 'vision', 'language' (less the
        input embeddings) and 'embeddings'."""
        embeddings = self.backbone.get_input_embeddings().weight
        for name, p in self.named_parameters():
            part = "embeddings" if p is embeddings else component_of(name)
            if part in parts:
                p.requires_grad_(False)

    def parameter_counts(self) -> dict[str, int]:
        """{"params/trainable", "params/total", "params/local"}: numbers of parameters (elements, not
        tensors); local = this process's share (its partitions when ZeRO-3 has partitioned them)."""
        def numel(p):  # a ZeRO-3 partitioned parameter holds a slice; ds_numel is its whole size
            return getattr(p, "ds_numel", p.numel())

        return {"params/trainable": sum(numel(p) for p in self.parameters() if p.requires_grad),
                "params/total": sum(numel(p) for p in self.parameters()),
                "params/local": sum(getattr(p, "ds_tensor", p).numel() for p in self.parameters())}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, model_cfg: ModelConfig | None = None,
                        device: str | torch.device | None = None) -> "PolyEmbedder":
        """Load a saved PolyEmbedder. Fields set explicitly in `model_cfg` (pydantic's
        `model_fields_set`, e.g. from YAML or `--set`) override the saved config; a changed pooling or
        projection config gets fresh heads of the new kind (the pooling ablations start this way)."""
        model_dir = Path(model_dir)
        meta = read_meta(model_dir)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{model_dir / META_FILE}: format {meta.get('format')!r}, this code reads {FORMAT}")
        saved = ModelConfig.model_validate(meta["model"])
        cfg = apply_explicit(saved, model_cfg) if model_cfg is not None else saved
        backbone = load_backbone(model_dir, cfg.attn_implementation, cfg.dtype)
        model = cls(backbone, load_processor(model_dir), cfg, name=meta.get("name", model_dir.name))
        heads = load_file(str(model_dir / HEADS_FILE))
        for part in ("pooling", "projection"):
            if getattr(cfg, part) != getattr(saved, part):
                log.info("%s: config differs from the saved one, starting fresh %s weights", part, part)
                continue
            state = {k[len(part) + 1:]: v for k, v in heads.items() if k.startswith(part + ".")}
            getattr(model, part).load_state_dict(state)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model.to(device) if device is not None else model

    def save_pretrained(self, out_dir: str | Path, default_task: str | None = None) -> Path:
        """Write the self-contained folder described in the module docstring; returns it.
        default_task: the sentence-transformers default prompt (None: no prefix, as `encode`)."""
        if self.has_lora:
            raise ValueError("save_pretrained: the model holds LoRA adapters; merge_lora() first")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with quiet_progress():
            self.backbone.save_pretrained(str(out))
        heads = {f"{part}.{k}": v.detach().float().cpu().contiguous()
                 for part in ("pooling", "projection") for k, v in getattr(self, part).state_dict().items()}
        save_file(heads, str(out / HEADS_FILE))
        save_processor(self.processor, out)
        meta = {"format": FORMAT, "name": self.name, "model": self.cfg.model_dump(mode="json", exclude={"freeze", "lora"}),
                "hidden_size": self.hidden_size, "embedding_dim": self.embedding_dim}
        (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        write_st_files(out, default_task)
        return out


# ---------------------------------------------------------------- helpers
def _check_processor_matches(processor, backbone: Qwen2VLModel) -> None:
    """The image processor must cut patches the vision tower expects (a tiny config's classic slip)."""
    ip, vc = processor.image_processor, backbone.config.vision_config
    pairs = {"patch_size": (ip.patch_size, vc.patch_size), "merge_size": (ip.merge_size, vc.spatial_merge_size),
             "temporal_patch_size": (ip.temporal_patch_size, vc.temporal_patch_size)}
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if bad:
        raise ValueError(f"image processor and vision config disagree (processor, model): {bad}")
    rows = backbone.get_input_embeddings().num_embeddings  # (the weight's shape is a slice under ZeRO-3)
    if len(processor.tokenizer) > rows:
        raise ValueError(f"tokenizer has {len(processor.tokenizer)} tokens, the backbone embeds only {rows}")


def _one_image(x: Any) -> bool:
    """Is `x` a single image (rather than a sequence of them)?"""
    return isinstance(x, (Image.Image, bytes, bytearray, memoryview, str, PathLike, dict)) or (
        isinstance(x, np.ndarray) and x.dtype != object and x.ndim <= 3)


def _rows(texts: Any, images: Any) -> list[tuple[str | None, Any]]:
    """Validate `encode`'s arguments into (text, image) rows; every message names the argument."""
    if texts is not None:
        texts = [texts] if isinstance(texts, str) or not hasattr(texts, "__iter__") else list(texts)
    if images is not None:  # one image, or any sequence of them (list, tuple, object array, Series)
        images = [images] if _one_image(images) or not hasattr(images, "__iter__") else list(images)
    if not texts and not images:
        raise ValueError("nothing to encode: pass texts, images, or both (as pairs)")
    if texts is not None and images is not None and len(texts) != len(images):
        raise ValueError(f"texts ({len(texts)}) and images ({len(images)}) have different lengths; "
                         f"pass one image per text (None where there is none)")
    n = len(texts or images)
    texts = texts or [None] * n
    images = images or [None] * n
    for i, t in enumerate(texts):
        if t is not None and not isinstance(t, str):
            raise ValueError(f"texts[{i}] is not a string (got {type(t).__name__})")
    return list(zip(texts, images))
