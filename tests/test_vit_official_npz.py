"""The official ViT releases (google-research/vision_transformer, ``gs://vit_models/imagenet21k/ViT-B_16.npz`` ...):
a seeded tiny ViT classifier written in the official .npz layout by the official names and shapes (the flax modules
of vit_jax/models_vit.py, flattened with "/" as vit_jax/checkpoint.py saves them), loaded back, gives the logits of
the model it came from and of the official forward computed from the arrays; a file short of a tensor or with a
foreign one stops with one line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import compose
from vtrain.backbones.vit import VisionTransformer
from vtrain.config import ConfigError
from vtrain.training.build import build_task
from vtrain.training.checkpoint import load_backbone_weights

CLASSES, SIZE, DIM, HEADS, DEPTH = 5, 32, 16, 2, 2
TINY = [f"data.num_classes={CLASSES}", "backbone=vit_b16", f"backbone.img_size={SIZE}", f"backbone.embed_dim={DIM}",
        f"backbone.depth={DEPTH}", f"backbone.num_heads={HEADS}", "output_dir=/tmp/vtrain-test-vit-npz"]


def official_arrays(model: torch.nn.Module, pre_logits: bool = True) -> dict[str, np.ndarray]:
    """The classifier's weights under the official names: flax Dense kernels are (in, out); the patch embedding a
    Conv kernel (H, W, in, out); attention a DenseGeneral per query / key / value with kernel (D, heads, head_dim)
    and an ``out`` one with kernel (heads, head_dim, D); the class token (1, 1, D); ``pre_logits`` the pre-training
    representation layer (Sec. 3.1), which a fine-tuning drops."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, hd = DIM, DIM // HEADS
    arrays = {"embedding/kernel": sd["backbone.patch_embed.proj.weight"].transpose(2, 3, 1, 0),
              "embedding/bias": sd["backbone.patch_embed.proj.bias"], "cls": sd["backbone.cls_token"],
              "Transformer/posembed_input/pos_embedding": sd["backbone.pos_embed"],
              "Transformer/encoder_norm/scale": sd["backbone.norm.weight"],
              "Transformer/encoder_norm/bias": sd["backbone.norm.bias"],
              "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    if pre_logits:
        arrays |= {"pre_logits/kernel": np.ones((d, d), np.float32), "pre_logits/bias": np.zeros(d, np.float32)}
    for i in range(DEPTH):
        b, o = f"backbone.blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"].reshape(3, HEADS, hd, d), sd[b + "attn.qkv.bias"].reshape(3, HEADS, hd)
        for j, name in enumerate(("query", "key", "value")):
            arrays[f"{o}MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[j].transpose(2, 0, 1)
            arrays[f"{o}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j]
        arrays[f"{o}MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(HEADS, hd, d)
        arrays[f"{o}MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for norm, flax in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            arrays[f"{o}{flax}/scale"], arrays[f"{o}{flax}/bias"] = sd[f"{b}{norm}.weight"], sd[f"{b}{norm}.bias"]
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            arrays[f"{o}MlpBlock_3/{dense}/kernel"] = sd[f"{b}mlp.{fc}.weight"].T
            arrays[f"{o}MlpBlock_3/{dense}/bias"] = sd[f"{b}mlp.{fc}.bias"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}


def official_logits(w: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """vit_jax/models_vit.py VisionTransformer.__call__ (classifier 'token', no representation layer at fine-tuning)
    on NHWC images, in float64 from the arrays. GELU exact (torch's; flax's nn.gelu defaults to the tanh
    approximation, at most 5e-4 from it per activation: vtrain's timm blocks are exact)."""
    def norm(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * w[p + "/scale"] + w[p + "/bias"]  # flax LayerNorm epsilon 1e-6

    kernel = w["embedding/kernel"]
    p, n = kernel.shape[0], images.shape[0]
    g = SIZE // p
    patches = images.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("nijabc,abcd->nijd", patches, kernel).reshape(n, g * g, -1) + w["embedding/bias"]
    x = np.concatenate([np.repeat(w["cls"], n, 0), x], 1) + w["Transformer/posembed_input/pos_embedding"]
    for i in range(DEPTH):
        o, a = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        y = norm(x, o + "LayerNorm_0")
        q, k, v = (np.einsum("nld,dhk->nlhk", y, w[f"{a}{t}/kernel"]) + w[f"{a}{t}/bias"] for t in ("query", "key", "value"))
        logits = np.einsum("nqhk,nvhk->nhqv", q, k) / math.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + np.einsum("nqhk,hkd->nqd", np.einsum("nhqv,nvhk->nqhk", weights, v), w[a + "out/kernel"]) + w[a + "out/bias"]
        y = norm(x, o + "LayerNorm_2") @ w[o + "MlpBlock_3/Dense_0/kernel"] + w[o + "MlpBlock_3/Dense_0/bias"]
        y = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
        x = x + y @ w[o + "MlpBlock_3/Dense_1/kernel"] + w[o + "MlpBlock_3/Dense_1/bias"]
    return norm(x, "Transformer/encoder_norm")[:, 0] @ w["head/kernel"] + w["head/bias"]


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = build_task(compose(*TINY)).eval()
    with torch.no_grad():
        for tensor in model.parameters():  # away from the initialisation (zero biases, unit norms)
            tensor.add_(torch.randn_like(tensor) * 0.2)
    return model


def test_official_npz_gives_the_logits_of_its_model_and_of_the_official_forward(source, tmp_path):
    arrays = official_arrays(source)
    np.savez(tmp_path / "ViT-tiny.npz", **arrays)
    torch.manual_seed(1)
    loaded = build_task(compose(*TINY)).eval()
    loaded.load_pretrained(str(tmp_path / "ViT-tiny.npz"))  # strict: every backbone tensor comes from the file
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        got, expected = loaded(images), source(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    official = official_logits({k: v.astype(np.float64) for k, v in arrays.items()},
                               images.permute(0, 2, 3, 1).double().numpy())
    torch.testing.assert_close(got.double(), torch.from_numpy(official), rtol=1e-4, atol=1e-4)


def test_official_npz_position_table_is_zoomed_to_the_model_grid_as_the_official_code(source, tmp_path):
    """A 32x32 release (2x2 patches) into an 80x80 model (5x5) with the ViT recipes' ``bilinear_align_corners``: the
    table of vit_jax/checkpoint.py ``interpolate_posembed``, ``scipy.ndimage.zoom(grid, (5/2, 5/2, 1), order=1)``
    with the class token's row kept, run here."""
    ndimage = pytest.importorskip("scipy.ndimage")
    arrays = official_arrays(source)
    np.savez(tmp_path / "ViT-tiny.npz", **arrays)
    larger = VisionTransformer(img_size=80, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                               pos_embed_interpolation="bilinear_align_corners")
    load_backbone_weights(larger, tmp_path / "ViT-tiny.npz")
    table = arrays["Transformer/posembed_input/pos_embedding"].astype(np.float64)
    zoomed = ndimage.zoom(table[0, 1:].reshape(2, 2, DIM), (5 / 2, 5 / 2, 1), order=1).reshape(1, 25, DIM)
    expected = torch.from_numpy(np.concatenate([table[:, :1], zoomed], axis=1)).float()
    torch.testing.assert_close(larger.pos_embed.detach(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"),
     r"^not an official plain-ViT release .*: tensor names 1 missing \(Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias\); give"),
    (lambda a: a.update({"conv_root/kernel": np.zeros((7, 7, 3, 4), np.float32)}),
     r"^not an official plain-ViT release .*: tensor names 1 foreign \(conv_root/kernel\); give"),
])
def test_official_npz_with_a_missing_or_foreign_tensor_is_one_line(source, tmp_path, change, message):
    arrays = official_arrays(source, pre_logits=False)
    change(arrays)
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(ConfigError, match=message) as error:
        source.load_pretrained(str(tmp_path / "broken.npz"))
    assert "\n" not in str(error.value)


def test_npz_with_objects_is_refused_unread(source, tmp_path):
    np.savez(tmp_path / "objects.npz", cls=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ConfigError, match=r"^refused checkpoint .*objects.npz: .*allow_pickle=False\)$"):
        source.load_pretrained(str(tmp_path / "objects.npz"))


def test_an_unknown_position_table_interpolation_is_one_line():
    with pytest.raises(ConfigError, match=r"^pos_embed_interpolation=nearest: use one of bicubic, bilinear, "
                                          r"bilinear_align_corners$"):
        VisionTransformer(img_size=32, embed_dim=8, depth=1, num_heads=2, pos_embed_interpolation="nearest")
