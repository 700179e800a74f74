"""qTTT FLOP accounting against a hand computation."""

from megatrain.models.config import IHAConfig, ModelConfig
from megatrain.ttt.flops import attention_pairs, forward_flops, qttt_flops, qttt_step_flops, think_tokens


def small(**extra):
    return ModelConfig(dim=8, layers=2, heads=2, kv_heads=1, ffn_dim=16, vocab_size=10, **extra).resolved()


def test_think_budget_is_two_n_k():
    assert think_tokens(32, 128) == 8192


def test_forward_and_step_by_hand():
    cfg = small()
    # per token and layer: 2 * (q 8x8 + k,v 2 x 8x4 + o 8x8 + mlp 3 x 8x16) = 2 * 576 = 1152
    # 3 tokens after 5 cached: pairs 3*5 + (1+2+3) = 21, scores + weighted sum 4 * Hd(8) * 21 = 672
    # head 2 * 8 * 10 per token
    assert forward_flops(small(), 3, 5) == 2 * (3 * 1152 + 672) + 3 * 160 == 8736
    # step: twice the forward, + the span's own key/value gradients 4*8*6 per layer,
    # + W_Q's weight gradient 2 * 3 tokens * 8 * 8 per layer
    assert qttt_step_flops(cfg, 3, 5) == 2 * 8736 + 2 * 192 + 2 * 384 == 18624
    # q_lora rank 2: adapter forward 2*3*2*(8+8) = 192 per layer (in both passes), its gradient the same
    assert qttt_step_flops(cfg, 3, 5, "q_lora", 2) == 2 * (8736 + 2 * 192) + 2 * 192 + 2 * 192


def test_per_example_totals_by_hand():
    cfg = small()
    out = qttt_flops(cfg, 6, steps=2, span=3)
    # starts 0, 1, 2: step(s) = 2 * (7776 + 192 s) + 1152, mean at s = 1
    assert out["qttt_step"] == 17088
    # prefill: 6 tokens, 21 pairs per layer, logits of the last token only
    assert out["prefill"] == 2 * (6 * 1152 + 32 * 21) + 160 == 15328
    assert out["qttt"] == 15328 + 2 * 17088
    # thinking: 2*2*3 = 12 tokens, each a one-token forward after 6 + t keys
    assert out["think_tokens"] == 12
    decode = 12 * (2 * 1152 + 160) + 2 * 32 * (12 * 6 + 78)
    assert out["think"] == 15328 + decode == 54496
    assert abs(out["ratio"] - 49504 / 54496) < 1e-12


def test_iha_pairs_count_virtual_tokens():
    cfg = small(attention="iha", iha=IHAConfig(pseudo_heads=2))
    # 2 tokens after 1: virtual queries 2..5 see 3, 4, 5, 6 keys
    assert attention_pairs(cfg, None, 1, 2) == 18
    assert attention_pairs(cfg, 4, 1, 2) == 3 + 4 + 4 + 4
    cfg = small(attention="iha", iha=IHAConfig(pseudo_heads=2, mask="token_causal"))
    assert attention_pairs(cfg, None, 1, 2) == 4 + 4 + 6 + 6
