"""A small T5 tokenizer trained locally, for the tiny pipelines.

The real CogVideoX checkpoints use T5 v1.1's SentencePiece vocabulary; no hub is reachable here,
so the tiny pipelines get a Unigram vocabulary trained on a corpus of caption-like sentences,
laid out the way T5 expects (ids 0/1/2 = pad/eos/unk, 100 ``<extra_id_N>`` sentinels at the
end) and wrapped as :class:`transformers.T5Tokenizer`, so pipelines tokenize exactly as with the
real model. Saved, it loads without sentencepiece or protobuf.
"""

from __future__ import annotations

import itertools
import json
import random

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import T5Tokenizer

from cogvx.models.constants import MAX_TEXT_TOKENS

EXTRA_IDS = 100
SPECIAL = ("<pad>", "</s>", "<unk>")

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "cyan")
SHAPES = ("circle", "square", "triangle", "star", "ball", "box", "ring", "cube", "dot", "stripe")
MOTIONS = ("moving left to right", "moving right to left", "bouncing", "spinning slowly",
           "falling down", "rising up", "growing", "shrinking", "drifting", "zooming in")
SCENES = ("on a plain background", "across a sunny meadow", "in a dark room", "over the ocean",
          "through a forest", "under a cloudy sky", "on a city street", "in a cartoon style",
          "with soft lighting", "in slow motion")


def caption_corpus(lines: int = 600, seed: int = 0) -> list[str]:
    """Deterministic caption-like sentences covering the synthetic clips' vocabulary."""
    rng = random.Random(seed)
    combos = list(itertools.product(COLOURS, SHAPES, MOTIONS, SCENES))
    rng.shuffle(combos)
    starts = ("A", "The", "One", "Two", "Several")
    return [f"{rng.choice(starts)} {colour} {shape} {motion} {scene}."
            for colour, shape, motion, scene in combos[:lines]]


def train_t5_tokenizer(vocab_size: int = 800, corpus: list[str] | None = None) -> T5Tokenizer:
    """Train a Unigram vocabulary and wrap it as a T5 tokenizer (MAX_TEXT_TOKENS model_max_length)."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL),
                                      unk_token="<unk>", show_progress=False)
    unigram.train_from_iterator(corpus or caption_corpus(), trainer=trainer)
    # Scores are rounded: the trainer's parallel reductions differ in the last bits run to run,
    # and a byte-identical tokenizer keeps the tiny model's files (and DVC hashes) reproducible.
    pieces = [(piece, round(score, 6)) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    if tuple(piece for piece, _ in pieces[:3]) != SPECIAL:
        raise RuntimeError(f"tokenizer training put {pieces[:3]} first, expected {SPECIAL}")
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(EXTRA_IDS - 1, -1, -1)]
    return T5Tokenizer(vocab=pieces, extra_ids=EXTRA_IDS, model_max_length=MAX_TEXT_TOKENS)
