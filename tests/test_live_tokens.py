"""Dead token positions (padding that attention masks out as a key and the pooling skips) are found from the
output gradients and left out of the statistics, the refits and block recovery: what they hold cannot change the
compiled model."""

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lpvit_compiler as lpvit
from lpvit_compiler.passes.importance import live_positions, live_rows

from conftest import tiny_vit

WIDTH, TOKENS, HEADS = 32, 12, 2
WORDS, PADDINGS = 50, 50  # token ids 0..49 are words, 50..99 padding (more than one kind, so padding varies)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, T, WIDTH], key_bias [B, 1, 1, T] (0 for a real token, -inf for padding) -> [B, T, WIDTH]."""
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, WIDTH))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PaddedEncoder(nn.Module):
    """Sentence-encoder-like: token ids [B, T] (ids >= WORDS are padding) -> logits [B, 4]; attention never
    reads padding and the mean pooling skips it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(WORDS + PADDINGS, WIDTH)
        self.position = nn.Parameter(torch.randn(1, TOKENS, WIDTH))
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position
        real = (ids < WORDS).to(x.dtype)  # [B, T]
        key_bias = ((1 - real) * -1e30)[:, None, None, :]  # exp underflows to exactly 0
        for block in self.blocks:
            x = block(x, key_bias)
        pooled = (x * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        return self.head(pooled)


def _sentences(padding_seed: int, sentences: int = 64) -> torch.Tensor:
    """Token ids [sentences, TOKENS]: the same words whatever the seed, padding ids drawn from ``padding_seed``."""
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, WORDS, (sentences, TOKENS), generator=g)
    lengths = torch.randint(3, TOKENS + 1, (sentences,), generator=g)
    padding = torch.arange(TOKENS)[None, :] >= lengths[:, None]
    filler = torch.randint(WORDS, WORDS + PADDINGS, (sentences, TOKENS),
                           generator=torch.Generator().manual_seed(padding_seed))
    return torch.where(padding, filler, words)


COMMON = dict(flops_keep=0.5, block_shape=8, hw="a100", recovery_steps=20, recovery_tflops=float("inf"),
              progress=False)


def test_the_dead_positions_are_the_padding(tmp_path):
    calib = _sentences(1)
    lpvit.compile(PaddedEncoder().eval(), calib=calib, dump_dir=tmp_path, **COMMON)
    decisions = json.loads(next(tmp_path.glob("*-importance/decisions.json")).read_text())
    assert decisions["live_token_share"] == pytest.approx(float((calib < WORDS).float().mean()))
    # OBS's ridge counts the live tokens only, max(hessian_damping, obs_damping * K / T), in the importance
    # pass and in sequential allocation's curves (the reconstruction fits on every calibration sentence here)
    live = int((calib < WORDS).sum())
    refits = json.loads(next(tmp_path.glob("*-reconstruct/decisions.json")).read_text())["layers"]
    for name, layer in decisions["layers"].items():
        expected = max(0.01, layer["weight_shape"][1] / live)
        assert layer["obs_ridge"] == pytest.approx(expected), name
        assert refits[name]["obs_ridge"] == pytest.approx(expected), name


def test_what_padding_holds_does_not_change_the_compiled_model():
    model = PaddedEncoder().eval()
    first, second = (lpvit.compile(model, calib=_sentences(seed), **COMMON).state_dict() for seed in (1, 2))
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_model_that_reads_every_position_has_none_dead(tmp_path):
    model = tiny_vit().eval()
    lpvit.compile(model, calib=torch.randn(16, 3, 32, 32), dump_dir=tmp_path, flops_keep=0.7, block_shape=8,
                  block_recovery=False, model_recovery_tflops=0, progress=False)
    decisions = json.loads(next(tmp_path.glob("*-importance/decisions.json")).read_text())
    assert decisions["live_token_share"] == 1.0


def test_live_positions_or_over_layers_and_refuse_mixed_token_counts_and_no_gradient():
    rows = {"a": torch.tensor([True, False, False, False]), "b": torch.tensor([False, False, True, False])}
    assert live_positions(rows, 2, {"a": 2, "b": 2}).tolist() == [[True, False], [True, False]]
    assert live_positions(rows, 2, {"a": 2, "b": 1}) is None
    no_gradient = {name: torch.zeros(4, dtype=torch.bool) for name in rows}  # e.g. a zero-initialised head
    assert live_positions(no_gradient, 2, {"a": 2, "b": 2}) is None


def test_live_rows_selects_token_rows_and_leaves_other_values():
    x = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    live = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(live_rows(x, live), torch.stack([x[0, 0], x[0, 2], x[1, 2]]))
    assert live_rows(x, None) is x
    assert live_rows(x[:, :2], live).shape == (2, 2, 4)  # another token count: not these positions
