"""KFP components: one thin wrapper per stage around the llm2clip library (installed in the image)."""

from llm2clip.components.cache_caption_embeddings import cache_caption_embeddings
from llm2clip.components.collect_vision_model import collect_vision_model
from llm2clip.components.evaluate import evaluate
from llm2clip.components.format_gpu_limit import format_gpu_limit
from llm2clip.components.image import IMAGE
from llm2clip.components.locate_store import locate_store
from llm2clip.components.prepare_data import prepare_data
from llm2clip.components.train_clip import train_clip
from llm2clip.components.train_clip_baseline import train_clip_baseline
from llm2clip.components.train_clip_trainjob import train_clip_trainjob
from llm2clip.components.tune_caption_encoder import tune_caption_encoder

__all__ = [
    "IMAGE",
    "cache_caption_embeddings",
    "collect_vision_model",
    "evaluate",
    "format_gpu_limit",
    "locate_store",
    "prepare_data",
    "train_clip",
    "train_clip_baseline",
    "train_clip_trainjob",
    "tune_caption_encoder",
]
