"""Pix2seq (Chen et al., "Pix2seq: A Language Modeling Framework for Object Detection", ICLR 2022) on any vtrain
backbone: detection as reading out a sequence of tokens.

The official code (google-research/pix2seq, TF2), on the backbone contract:

* Encoder (``architectures/transformers.py`` ``ResNetTransformer``): the backbone's C5 map (``out_indices=(3,)``),
  dropout, a linear projection to ``hidden_dim`` and a LayerNorm (``stem_projection``, ``stem_ln``), 2-D sine
  positions (``get_2d_position_codes``), pre-norm transformer layers (GELU MLP), a final LayerNorm.
* Bridge (``models/ar_model.py`` ``_encode_images``, ``dec_proj_mode='mlp'``): a linear projection and LayerNorm,
  the positions again, one pre-norm MLP block.
* Decoder (``AutoregressiveDecoder``): token embedding shared with the output layer (plus an output bias), learned
  sequence positions, pre-norm layers of causal self-attention, cross-attention to the image and an MLP, a final
  LayerNorm; LayerNorm epsilon 1e-6 everywhere, weights initialised by a normal of std 0.02 truncated at 2 std
  (``get_variable_initializer``) for the embeddings.
* Vocabulary (``vocab.py``, ``configs/config_det_finetune.py``): 0 is padding and the end of the sequence, 10 the
  detection prompt (``vocab_id=10``), 30 the noise class (``FAKE_CLASS_TOKEN``), label k is token 100 + k
  (``BASE_VOCAB_SHIFT``), coordinate bin b is token 1000 + b (``coord_vocab_shift``); ``1000 + num_bins`` tokens.
* Sequence (``tasks/object_detection.py`` ``build_response_seq_from_bbox``): per object ``[ymin, xmin, ymax,
  xmax, class]``, each coordinate ``round(c * (bins - 1))`` of its [0, 1] value (``utils.quantize``); objects in
  a random order each time an image is seen (``reorder_object_instances``, ``order='random'``); then noise objects
  up to ``max_objects`` (``data_utils.inject_noise_bbox`` / ``augment_bbox``: duplicates jittered from real
  boxes, shifted real boxes, random boxes, all of the noise class). Target = the prompt-shifted sequence; the
  input's class tokens are corrupted (``class_label_corruption``). Token weights: a noise object's coordinates
  0, its class ``noise_class_weight`` (1), padding / end ``eos_weight`` (0.1); the loss is the weighted softmax
  cross-entropy over the vocabulary, divided by the weights' sum (``ar_model.compute_loss``).
* Inference (``AutoregressiveDecoder.infer``, ``task_utils.decode_object_seq_to_bbox``): ``5 * max_objects_test``
  tokens after the prompt, each sampled from the nucleus of probability ``top_p`` (0.4, ``config_det_finetune``;
  ``top_p: 0`` takes the most probable token); each object's class is the most probable class at its class
  position, its score that probability, its box the dequantised coordinate tokens, clipped to the image.

Departures, none of which changes the model's parameters: coordinates are relative to the image itself, not to
the padded canvas (here the canvas is the batch's largest image, which would make an object's tokens depend on
its batch companions; the official pads every image to one fixed square); attention skips the padding; the class
at decoding is taken over the dataset's categories only (the official argmax runs over all 900 class tokens,
of which the unused ones are never a target).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth
from vtrain.tasks.detection.detr import OfficialTransform

from vtrain.backbones.base import Backbone
from vtrain.config import ConfigError

# the official vocabulary (vocab.py; configs/config_det_finetune.py)
PADDING_TOKEN = 0        # padding, read as the end of the sequence
DETECTION_PROMPT = 10    # the object-detection task's vocab_id, the first input token
NOISE_CLASS_TOKEN = 30   # FAKE_CLASS_TOKEN: the class of a noise object
CLASS_SHIFT = 100        # BASE_VOCAB_SHIFT: label k is token 100 + k
COORD_SHIFT = 1000       # coord_vocab_shift: bin b is token 1000 + b
CORRUPTIONS = ("none", "rand_cls", "real_n_fake_cls", "rand_n_fake_cls", "real_n_rand_n_fake_cls")


def quantize(coords: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[0, 1] coordinates -> bins 0..num_bins-1 (official ``utils.quantize``)."""
    return torch.round(coords * (num_bins - 1)).long().clamp(0, num_bins - 1)


def dequantize(bins: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Bins -> [0, 1] coordinates (official ``utils.dequantize``)."""
    return bins.float() / (num_bins - 1)


# ------------------------------------------------------------------------------------ sequence construction
def _clip(boxes: torch.Tensor) -> torch.Tensor:
    return boxes.clamp(0.0, 1.0)  # truncation_bbox


def _truncated_normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
    return nn.init.trunc_normal_(torch.empty(shape), std=std, a=-2 * std, b=2 * std)  # tf.random.truncated_normal


def jitter_boxes(boxes: torch.Tensor, max_range: float) -> torch.Tensor:
    """``jitter_bbox(min_range=0)``: each coordinate moved by a truncated normal of std ``max_range / 2`` times the
    box's height (y) or width (x)."""
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return _clip(boxes + torch.stack([h, w, h, w], -1) * _truncated_normal(tuple(boxes.shape), max_range / 2))


def _centred(cy: torch.Tensor, cx: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h, w = h.abs(), w.abs()
    return _clip(torch.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], -1))


def shift_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """``shift_bbox``: the same height and width at a uniformly random centre."""
    n = len(boxes)
    return _centred(torch.rand(n), torch.rand(n), boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def random_boxes(n: int) -> torch.Tensor:
    """``random_bbox(max_size=1)``: a uniform centre, height and width |truncated normal of std 0.5|."""
    return _centred(torch.rand(n), torch.rand(n), _truncated_normal((n,), 0.5), _truncated_normal((n,), 0.5))


def noise_objects(boxes: torch.Tensor, count: int) -> torch.Tensor:
    """``augment_bbox`` (``mix_rate=0``, no jitter of the real boxes): ``count`` noise boxes appended after the
    real ones, a uniform number of them duplicates of real boxes jittered by ``jitter_bbox(max_range=0.1)``, the
    rest "bad" boxes, each a shifted real box or a random box; in a random order."""
    n = len(boxes)
    duplicates = 0 if n == 0 else int(torch.randint(0, count + 1, ()))
    bad = count - duplicates
    tiled = boxes.repeat(1 if n == 0 else count // n + 1, 1)
    shifted = shift_boxes(tiled[torch.randperm(len(tiled))][:bad])
    bad_boxes = torch.cat([shifted, random_boxes(bad)])[torch.randperm(len(shifted) + bad)][:bad]
    duplicate_boxes = jitter_boxes(tiled[torch.randperm(len(tiled))][:duplicates], 0.1)
    noise = torch.cat([bad_boxes, duplicate_boxes])
    return noise[torch.randperm(count)]


def object_tokens(boxes: torch.Tensor, class_tokens: torch.Tensor, num_bins: int) -> torch.Tensor:
    """(N, 4) [0, 1] ``yxyx`` boxes and their (N,) class tokens -> the 5N tokens ``[ymin, xmin, ymax, xmax,
    class]`` per object."""
    return torch.cat([quantize(boxes, num_bins) + COORD_SHIFT, class_tokens[:, None]], 1).flatten()


def training_sequences(boxes: torch.Tensor, labels: torch.Tensor, num_bins: int, max_objects: int,
                       noise_class_weight: float = 1.0, eos_weight: float = 0.1, corruption: str = "rand_n_fake_cls",
                       max_seq_len: int | None = None, num_class_tokens: int = COORD_SHIFT - CLASS_SHIFT,
                       order: str = "random") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's ``(input, target, weights)``, each ``max_seq_len`` long (default ``5 * max_objects``), from its
    (N, 4) [0, 1] ``yxyx`` boxes and (N,) labels 1..K (``preprocess_batched``): the objects in a random order
    (``order='none'``: as given), cut to ``max_objects`` and filled up to it with noise objects; input = the
    prompt then the sequence with its class tokens corrupted, target = the sequence; padding with token 0."""
    max_seq_len = 5 * max_objects if max_seq_len is None else max_seq_len
    if order == "random":
        keep = torch.randperm(len(boxes))
        boxes, labels = boxes[keep], labels[keep]
    boxes, labels = boxes[:max_objects].float(), labels[:max_objects]
    count = max_objects - len(boxes)
    noise = noise_objects(boxes, count) if count > 0 else boxes.new_zeros(0, 4)
    classes = torch.cat([labels.long() + CLASS_SHIFT, torch.full((count,), NOISE_CLASS_TOKEN)])
    target = object_tokens(torch.cat([boxes, noise]), classes, num_bins)
    corrupted = torch.cat([target.view(-1, 5)[:, :4], corrupt_classes(classes, corruption, num_class_tokens)[:, None]],
                          1).flatten()
    is_real = (classes != NOISE_CLASS_TOKEN).float()[:, None]
    weights = torch.cat([is_real.expand(-1, 4), is_real + (1 - is_real) * noise_class_weight], 1).flatten()
    prompt = torch.tensor([DETECTION_PROMPT])
    inputs = _pad(torch.cat([prompt, corrupted]), max_seq_len + 1)[:-1]
    targets = _pad(target, max_seq_len)
    weights = torch.where(targets == PADDING_TOKEN, eos_weight, _pad(weights, max_seq_len))
    return inputs, targets, weights


def corrupt_classes(classes: torch.Tensor, corruption: str, num_class_tokens: int) -> torch.Tensor:
    """The input's class tokens (``class_label_corruption``): ``rand_cls`` a random class token, ``fake`` the noise
    class; ``rand_n_fake_cls`` either, with probability 1/2 each (the official default), and so on."""
    n = len(classes)
    rand_cls = CLASS_SHIFT + torch.randint(0, num_class_tokens, (n,))
    fake_cls = torch.full((n,), NOISE_CLASS_TOKEN)
    rand_n_fake = torch.where(torch.rand(n) > 0.5, rand_cls, fake_cls)
    mapping = {"none": lambda: classes, "rand_cls": lambda: rand_cls, "rand_n_fake_cls": lambda: rand_n_fake,
               "real_n_fake_cls": lambda: torch.where(torch.rand(n) > 0.5, classes, fake_cls),
               "real_n_rand_n_fake_cls": lambda: torch.where(torch.rand(n) > 0.5, classes, rand_n_fake)}
    return mapping[corruption]()


def _pad(tokens: torch.Tensor, length: int) -> torch.Tensor:
    if len(tokens) > length:
        raise ValueError(f"a sequence of {len(tokens)} tokens does not fit max_seq_len {length}")
    return F.pad(tokens, (0, length - len(tokens)), value=PADDING_TOKEN)


def decode_objects(tokens: torch.Tensor, logits: torch.Tensor, num_bins: int, num_classes: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``decode_object_seq_to_bbox`` of one sequence (without its prompt) and the logits each token was sampled
    from: ``(boxes yxyx in [0, 1], labels 1..K, scores)``, one per whole group of 5 tokens; the class of an object
    is the most probable of the K class tokens at its class position, the score that probability."""
    length = len(tokens) // 5 * 5
    tokens, logits = tokens[:length].view(-1, 5), logits[:length].view(-1, 5, logits.shape[-1])
    class_probs = logits[:, 4].softmax(-1)[:, CLASS_SHIFT + 1:CLASS_SHIFT + 1 + num_classes]
    scores, classes = class_probs.max(-1)
    boxes = dequantize(tokens[:, :4] - COORD_SHIFT, num_bins).clamp(0.0, 1.0)
    return boxes, classes + 1, scores


# ------------------------------------------------------------------------------------------------- sampling
def nucleus_logits(logits: torch.Tensor, top_p: float, mask: float = -1e10) -> torch.Tensor:
    """``top_logits(p=top_p)``: the logits outside the nucleus set to ``mask``. The nucleus: the largest logits
    whose cumulative probability stays at most ``top_p``, and at least the largest one."""
    if top_p >= 1.0:
        return logits
    sorted_logits = logits.sort(-1, descending=True).values
    cum_probs = sorted_logits.softmax(-1).cumsum(-1)
    inside = torch.where(cum_probs <= top_p, sorted_logits, torch.full_like(sorted_logits, -mask))
    threshold = torch.minimum(inside.min(-1, keepdim=True).values, sorted_logits[..., :1])
    return torch.where(logits < threshold, torch.full_like(logits, mask), logits)


def sample_tokens(logits: torch.Tensor, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    """The next tokens of (B, V) logits: from the nucleus of ``top_p`` (the official ``infer``), the most probable
    with ``top_p: 0``."""
    if top_p <= 0:
        return logits.argmax(-1)
    filtered = nucleus_logits(logits / temperature, top_p)
    return torch.multinomial(filtered.softmax(-1), 1)[:, 0]


# --------------------------------------------------------------------------------------------- architecture
def sine_positions_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """``get_2d_position_codes`` (H * W, dim): rows and columns each scaled to [0, 2 pi]; the first half of the
    channels encodes the row (sines of ``dim / 4`` frequencies, then cosines), the second half the column."""
    def encode(n: int) -> torch.Tensor:
        coords = torch.arange(n, dtype=torch.float32) / max(n - 1, 1) * 6.2831852
        half = dim // 2
        i = torch.arange(half)
        angles = coords[:, None] / torch.pow(10000.0, (2 * (i // 2)).float() / half)
        return torch.cat([angles[:, 0::2].sin(), angles[:, 1::2].cos()], -1)

    rows, cols = encode(height), encode(width)
    return torch.cat([rows[:, None].expand(-1, width, -1), cols[None].expand(height, -1, -1)], -1).flatten(0, 1)


class FeedForward(nn.Module):
    """The official ``MLP(1, ...)`` block: x + DropPath(dense2(dropout(GELU(dense1(LN(x))))))."""

    def __init__(self, dim: int, dim_feedforward: int, dropout: float, drop_path: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear1, self.linear2 = nn.Linear(dim, dim_feedforward), nn.Linear(dim_feedforward, dim)
        self.dropout, self.drop_path = nn.Dropout(dropout), drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.linear2(self.dropout(F.gelu(self.linear1(self.norm(x)))))
        return x + stochastic_depth(residual, self.drop_path, "row", self.training)


class EncoderLayer(nn.Module):
    """``TransformerEncoderLayer``: pre-norm self-attention, then :class:`FeedForward`."""

    def __init__(self, dim: int, num_heads: int, dim_feedforward: int, dropout: float, drop_path: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp, self.drop_path = FeedForward(dim, dim_feedforward, dropout, drop_path), drop_path

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        y = self.norm(x)
        y = self.attn(y, y, y, key_padding_mask=padding, need_weights=False)[0]
        return self.mlp(x + stochastic_depth(y, self.drop_path, "row", self.training))


class DecoderLayer(nn.Module):
    """``TransformerDecoderLayer``: pre-norm causal self-attention (over the cached normalised inputs of the
    earlier tokens at inference), pre-norm cross-attention to the image, :class:`FeedForward`."""

    def __init__(self, dim: int, num_heads: int, dim_feedforward: int, dropout: float, drop_path: float):
        super().__init__()
        self.self_norm, self.cross_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp, self.drop_path = FeedForward(dim, dim_feedforward, dropout, drop_path), drop_path

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_padding: torch.Tensor | None,
                cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x_norm = self.self_norm(x)
        if cache is None:  # teacher forcing: token t sees tokens 0..t
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
            y = self.self_attn(x_norm, x_norm, x_norm, attn_mask=causal, need_weights=False)[0]
        else:  # one new token, which sees the cached ones and itself
            keys = torch.cat([cache, x_norm], 1)
            y = self.self_attn(x_norm, keys, keys, need_weights=False)[0]
        x = x + stochastic_depth(y, self.drop_path, "row", self.training)
        y = self.cross_attn(self.cross_norm(x), memory, memory, key_padding_mask=memory_padding, need_weights=False)[0]
        x = x + stochastic_depth(y, self.drop_path, "row", self.training)
        return self.mlp(x), x_norm


class Pix2Seq(nn.Module):
    """Pix2seq on a backbone built with ``out_indices=(3,)``.

    Args:
        backbone: the task's backbone (registered by the task as ``backbone.*``; only called here).
        num_classes: object categories K (labels 1..K, tokens 101..100+K); at most 899.
        num_bins: coordinate quantisation bins (the paper's 2000 for COCO at 1333, Sec. 4.1).
        hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward: the transformer (the
            official ``resnet`` architecture: 256, 8, 6, 6, 1024; ``config_base.py``).
        dropout, drop_path: ``drop_units`` and ``drop_path`` (0.1 each, ``config_det_finetune.py``).
        max_objects: objects per training sequence, real + noise (100, ``max_instances_per_image``).
        max_objects_test: objects read out at inference (100, ``max_instances_per_image_test``).
        max_seq_len: the learned sequence positions (512, the model's ``max_seq_len``).
        noise_class_weight, eos_weight: the loss weights of a noise object's class token and of the padding /
            end tokens (``noise_bbox_weight`` 1.0, ``eos_token_weight`` 0.1).
        class_label_corruption: how the input's class tokens are corrupted (``rand_n_fake_cls``).
        top_p, temperature: nucleus sampling at inference (0.4, 1.0); ``top_p: 0``: the most probable token.
        min_size, max_size, image_mean, image_std: the test-time resize and the normalisation (the task's).
        size_divisible: images are padded to a multiple of it.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        num_bins: int = 2000,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        drop_path: float = 0.1,
        max_objects: int = 100,
        max_objects_test: int = 100,
        max_seq_len: int = 512,
        noise_class_weight: float = 1.0,
        eos_weight: float = 0.1,
        class_label_corruption: str = "rand_n_fake_cls",
        top_p: float = 0.4,
        temperature: float = 1.0,
        min_size: int = 1333,
        max_size: int = 1333,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        size_divisible: int = 32,
    ):
        super().__init__()
        if backbone.out_indices != Pix2SeqSpec.out_indices:
            raise ValueError(f"Pix2seq reads backbone output {Pix2SeqSpec.out_indices}, the backbone gives {backbone.out_indices}")
        if num_classes > COORD_SHIFT - CLASS_SHIFT - 1:
            raise ConfigError(f"Pix2seq's vocabulary holds {COORD_SHIFT - CLASS_SHIFT - 1} classes (tokens 101..999), "
                              f"this data has {num_classes}")
        if class_label_corruption not in CORRUPTIONS:
            raise ConfigError(f"task.detector.model.class_label_corruption={class_label_corruption!r}: one of "
                              f"{', '.join(CORRUPTIONS)}")
        if 5 * max(max_objects, max_objects_test) + 1 > max_seq_len:
            raise ConfigError(f"task.detector.model.max_seq_len={max_seq_len} is shorter than the prompt and 5 tokens "
                              f"for each of {max(max_objects, max_objects_test)} objects: raise it to "
                              f"{5 * max(max_objects, max_objects_test) + 1} or lower max_objects")
        object.__setattr__(self, "body", backbone)  # not a submodule: the task registers it
        self.num_classes, self.num_bins, self.hidden_dim = num_classes, num_bins, hidden_dim
        self.max_objects, self.max_objects_test = max_objects, max_objects_test
        self.noise_class_weight, self.eos_weight = noise_class_weight, eos_weight
        self.class_label_corruption, self.top_p, self.temperature = class_label_corruption, top_p, temperature
        self.vocab_size = COORD_SHIFT + num_bins
        self.transform = OfficialTransform(min_size, max_size, list(image_mean), list(image_std),
                                           size_divisible=size_divisible, _skip_resize=True)
        # encoder (ResNetTransformer)
        self.input_dropout = nn.Dropout(dropout)
        self.input_proj = nn.Linear(backbone.feature_info.channels(-1), hidden_dim)  # stem_projection
        self.input_norm = nn.LayerNorm(hidden_dim, eps=1e-6)  # stem_ln
        layer_args = (hidden_dim, num_heads, dim_feedforward, dropout, drop_path)
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(num_encoder_layers))
        self.encoder_norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        # bridge (ar_model: proj, proj_ln, positions, proj_mlp)
        self.memory_proj = nn.Linear(hidden_dim, hidden_dim)
        self.memory_norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.memory_mlp = FeedForward(hidden_dim, dim_feedforward, dropout, drop_path)
        # decoder (AutoregressiveDecoder, shared_embedding=True, output_bias=True)
        self.token_embed = nn.Parameter(_truncated_normal((self.vocab_size, hidden_dim), 0.02))
        self.position_embed = nn.Parameter(_truncated_normal((max_seq_len, hidden_dim), 0.02))
        self.output_bias = nn.Parameter(_truncated_normal((self.vocab_size,), 0.02))
        self.decoder = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim, eps=1e-6)

    def encode(self, x: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (normalised, padded) -> the memory the decoder reads (B, H * W, d) and its padding mask."""
        features = self.body(x)[-1]
        mask = F.interpolate(padding[None].float(), size=features.shape[-2:]).to(torch.bool)[0].flatten(1)
        h, w = features.shape[-2:]
        positions = sine_positions_2d(h, w, self.hidden_dim).to(features)
        tokens = self.input_norm(self.input_proj(self.input_dropout(features.flatten(2).transpose(1, 2))))
        tokens = tokens + positions
        for layer in self.encoder:
            tokens = layer(tokens, mask)
        memory = self.memory_norm(self.memory_proj(self.encoder_norm(tokens))) + positions
        return self.memory_mlp(memory), mask

    def logits(self, tokens: torch.Tensor, memory: torch.Tensor, memory_padding: torch.Tensor | None) -> torch.Tensor:
        """Teacher-forced (B, L) tokens -> (B, L, V) logits of the token after each."""
        x = self.token_embed[tokens] + self.position_embed[:tokens.shape[1]]
        for layer in self.decoder:
            x, _ = layer(x, memory, memory_padding, None)
        return self.decoder_norm(x) @ self.token_embed.T + self.output_bias

    def generate(self, memory: torch.Tensor, memory_padding: torch.Tensor | None, length: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``length`` tokens after the prompt, one at a time (the official ``infer``, caching each layer's
        normalised inputs), and the logits each was drawn from: (B, length), (B, length, V)."""
        batch = memory.shape[0]
        token = torch.full((batch,), DETECTION_PROMPT, dtype=torch.long, device=memory.device)
        caches: list[torch.Tensor | None] = [None] * len(self.decoder)
        tokens, all_logits = [], []
        for step in range(length):
            x = (self.token_embed[token] + self.position_embed[step])[:, None]
            for i, layer in enumerate(self.decoder):
                empty = x.new_zeros(batch, 0, x.shape[-1])
                x, x_norm = layer(x, memory, memory_padding, empty if caches[i] is None else caches[i])
                caches[i] = x_norm if caches[i] is None else torch.cat([caches[i], x_norm], 1)
            logits = (self.decoder_norm(x) @ self.token_embed.T + self.output_bias)[:, 0]
            token = sample_tokens(logits, self.top_p, self.temperature)
            tokens.append(token)
            all_logits.append(logits)
        return torch.stack(tokens, 1), torch.stack(all_logits, 1)

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        x, padding, image_sizes = self.transform.padded(images)
        memory, memory_padding = self.encode(x, padding)
        if self.training:
            if targets is None:
                raise ValueError("Pix2seq in training mode needs targets")
            return {"loss_tokens": self.loss(memory, memory_padding, targets, image_sizes)}
        tokens, logits = self.generate(memory, memory_padding, 5 * self.max_objects_test)
        return [self.detections(t, lg, size) for t, lg, size in zip(tokens, logits, original_sizes)]

    def sequences(self, targets: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's (input, target, weights), from pixel ``xyxy`` boxes over each (unpadded) image's size."""
        built = []
        for target, (h, w) in zip(targets, sizes):
            scale = torch.tensor([h, w, h, w], dtype=torch.float32)
            yxyx = target["boxes"].detach().float().cpu()[:, [1, 0, 3, 2]] / scale
            built.append(training_sequences(yxyx, target["labels"].cpu(), self.num_bins, self.max_objects,
                                            self.noise_class_weight, self.eos_weight, self.class_label_corruption,
                                            num_class_tokens=COORD_SHIFT - CLASS_SHIFT))
        return tuple(torch.stack(parts) for parts in zip(*built))

    def loss(self, memory: torch.Tensor, memory_padding: torch.Tensor, targets: list[dict[str, torch.Tensor]],
             sizes: list[tuple[int, int]]) -> torch.Tensor:
        """The weighted token cross-entropy over the vocabulary, over the weights' sum (``compute_loss``)."""
        inputs, target, weights = (t.to(memory.device) for t in self.sequences(targets, sizes))
        logits = self.logits(inputs, memory, memory_padding)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none")
        return (losses * weights.flatten()).sum() / (weights.sum() + 1e-9)

    def detections(self, tokens: torch.Tensor, logits: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """One image's generated tokens -> ``{"boxes" xyxy pixels of the original image, "labels", "scores"}``."""
        boxes, labels, scores = decode_objects(tokens, logits, self.num_bins, self.num_classes)
        h, w = size
        scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        return {"boxes": boxes[:, [1, 0, 3, 2]] * scale, "labels": labels, "scores": scores}


# ------------------------------------------------------------------------------------------- the detector config
class Pix2SeqSpec:
    """``conf/task/detector/pix2seq.yaml``: Pix2seq on the task's backbone (a :class:`detector.DetectorSpec`).

    Args:
        model: :class:`Pix2Seq` with its options (a partial; the official values by default).
    """

    out_indices = (3,)  # C5 only
    iou_types = ("bbox",)

    def __init__(self, model: Callable[..., Pix2Seq] = Pix2Seq):
        self.model = model

    def build(self, backbone: Backbone, num_classes: int, transform: Mapping[str, Any]) -> Pix2Seq:
        """Pix2seq on ``backbone``; ``num_classes`` counts categories + 1 (the task's background, unused here)."""
        return self.model(backbone, num_classes - 1, **transform)

    def load_release(self, task: nn.Module, path: str, strict: bool = True) -> bool:
        """The official checkpoints are TensorFlow's: none loads here; ``path`` holds backbone weights."""
        return False

