"""The Qwen2-VL processor (tokenizer + image processor) of a checkpoint, without the model code:
what tokenising and image decoding need, in every Ray task that does them.

- The image processor is the PIL one: torchvision is not usable on every machine this runs on
  (ENV-NOTES), and one code path everywhere means the same pixels everywhere.
- `Qwen2VLProcessor` insists on a video processor (which needs torchvision); `ImageTextProcessor`
  is the same processor without one. It is built from its parts, never through `AutoProcessor`.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

try:  # transformers ≥ 5.2x names the PIL backend explicitly
    from transformers import Qwen2VLImageProcessorPil as ImageProcessor
except ImportError:  # older releases: the default Qwen2VLImageProcessor is the PIL/numpy one
    from transformers import Qwen2VLImageProcessor as ImageProcessor

__all__ = ["ImageProcessor", "ImageTextProcessor", "load_processor", "save_processor"]


class ImageTextProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` for images and text only: no video processor, so no torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        # Skip Qwen2VLProcessor.__init__ (it passes a video processor along); the mixin checks the
        # classes of the two parts this signature names.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def load_processor(source: str | Path) -> ImageTextProcessor:
    """Tokenizer + PIL image processor of a Qwen2-VL checkpoint (hub id or folder)."""
    source = str(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = ImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:  # transformers raises either for a missing or foreign folder
        raise ValueError(f"model.backbone {source!r}: no Qwen2-VL tokenizer/preprocessor found there "
                         f"({str(e).splitlines()[0]})") from e
    return ImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_processor(processor: ImageTextProcessor, out_dir: str | Path) -> None:
    """Write tokenizer and preprocessor files so that `load_processor(out_dir)` gives them back."""
    processor.tokenizer.save_pretrained(str(out_dir))
    processor.image_processor.save_pretrained(str(out_dir))
