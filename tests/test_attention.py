"""attention.py: RoPE against transformers, manual vs SDPA, MLA absorbed vs naive, KV-cache equivalence."""
import dataclasses

import pytest
import torch

from attention import KVBatch, rope_frequencies
from model import PRESETS, ModelConfig, Transformer

VARIANTS = {
    "gqa": dataclasses.replace(PRESETS["tiny"], num_hidden_layers=2),
    "gqa-qknorm-gated-bias": dataclasses.replace(PRESETS["tiny"], num_hidden_layers=2, qk_norm=True,
                                                 gated_attention=True, qkv_bias=True),
    "mla": dataclasses.replace(PRESETS["tiny-mla"], num_hidden_layers=2),
    "mla-qlora": dataclasses.replace(PRESETS["tiny-mla"], num_hidden_layers=2, q_lora_rank=48),
}


def make(name, impl="sdpa", seed=0):
    torch.manual_seed(seed)
    model = Transformer(dataclasses.replace(VARIANTS[name], attn_impl=impl)).eval()
    with torch.no_grad():  # random biases and norm gains so every option changes the output
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", factor=4.0),
    dict(rope_type="dynamic", factor=2.0),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    dict(rope_type="yarn", factor=8.0, mscale=1.0, mscale_all_dim=0.5, beta_fast=16, beta_slow=2),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=64),
])
def test_rope_scaling_matches_transformers(rope):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    conf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=256,
                                    rope_parameters={"rope_theta": 10000.0, **rope})
    seq_len = 1000 if rope["rope_type"] == "dynamic" else None
    ref, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](conf, "cpu", seq_len=seq_len)
    ours, scale = rope_frequencies(64, 10000.0, rope, 256, seq_len)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_manual_attention_equals_sdpa(name):
    sdpa, manual = make(name, "sdpa"), make(name, "manual")
    ids = torch.randint(0, 4096, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(manual(ids), sdpa(ids), atol=1e-5, rtol=1e-5)
        tables = [[5, 1, 3], [0, 4, 2]]  # blocks of 4 tokens, out of order
        caches = {}
        for model in (sdpa, manual):  # and through the cache
            caches[model] = model.make_cache(6, 4)
            model(ids[:, :10], KVBatch.from_tables(caches[model], torch.arange(10).expand(2, 10), tables))
        step, pos = ids[:, 10:11], torch.tensor([[10], [10]])
        torch.testing.assert_close(manual(step, KVBatch.from_tables(caches[manual], pos, tables)),
                                   sdpa(step, KVBatch.from_tables(caches[sdpa], pos, tables)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_cached_prefill_and_decode_equal_full_forward(name, impl):
    """Rows of lengths 9, 14, 5 whose blocks (of 4 tokens) are scattered over the pool: prefill a
    prefix of each (the middle one in two chunks), then decode one token at a time in a batch where
    rows sit at different positions, crossing block boundaries; every logit must match the full
    uncached forward of that row."""
    model = make(name, impl)
    gen = torch.Generator().manual_seed(0)
    lengths, prefix = [9, 14, 5], [4, 6, 2]
    tables = [[7, 2, 9], [0, 5, 1, 8], [3, 6]]
    seqs = [torch.randint(0, 4096, (n,), generator=gen) for n in lengths]
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]  # (T, V) each
        cache = model.make_cache(10, 4)
        got = [[] for _ in seqs]
        for i, (s, p) in enumerate(zip(seqs, prefix)):
            chunks = [(0, 3), (3, p)] if i == 1 else [(0, p)]
            for a, b in chunks:
                out = model(s[None, a:b], KVBatch.from_tables(cache, torch.arange(a, b)[None], [tables[i]]))
                got[i].append(out[0])
        done = list(prefix)
        while any(d < n for d, n in zip(done, lengths)):
            rows = [i for i in range(3) if done[i] < lengths[i]]
            ids = torch.stack([seqs[i][done[i]] for i in rows])[:, None]  # (B, 1)
            pos = torch.tensor([[done[i]] for i in rows])
            out = model(ids, KVBatch.from_tables(cache, pos, [tables[i] for i in rows]))
            for j, i in enumerate(rows):
                got[i].append(out[j])
                done[i] += 1
        for i in range(3):
            torch.testing.assert_close(torch.cat(got[i]), full[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mla", "mla-qlora"])
def test_mla_absorbed_equals_naive(name):
    model = make(name)
    ids = torch.randint(0, 4096, (2, 12))
    outs = {}
    with torch.no_grad():
        for absorb in (False, True):
            for layer in model.model.layers:
                layer.self_attn.absorb = absorb
            no_cache = model(ids)
            cache, tables = model.make_cache(8, 4), [[0, 2, 4, 6], [1, 3, 5, 7]]
            prefill = model(ids[:, :8], KVBatch.from_tables(cache, torch.arange(8).expand(2, 8), tables))
            decode = model(ids[:, 8:9], KVBatch.from_tables(cache, torch.full((2, 1), 8), tables))
            outs[absorb] = (no_cache, prefill, decode)
    for naive, absorbed in zip(outs[False], outs[True]):
        torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-5)


def test_mla_cache_stores_only_latent_and_rope_key():
    gqa, mla = Transformer(PRESETS["tiny"]), Transformer(PRESETS["tiny-mla"])
    cg, cm = gqa.make_cache(2, 10), mla.make_cache(2, 10)
    cfg = PRESETS["tiny-mla"]
    assert [tuple(b.shape) for b in cm.layers[0]] == [(20, cfg.kv_lora_rank), (20, cfg.qk_rope_head_dim)]
    assert cm.nbytes() == 2 * 10 * cfg.kv_bytes_per_token(dtype_bytes=4)
    assert cg.nbytes() == 2 * 10 * PRESETS["tiny"].kv_bytes_per_token(dtype_bytes=4)
    # same width, same head count: MHA would cache 2*H*D = 512 values per layer, MLA caches R + Dr = 96
    mha = ModelConfig(**{**dataclasses.asdict(PRESETS["tiny"]), "num_key_value_heads": 4})
    assert mha.kv_bytes_per_token() / cfg.kv_bytes_per_token() == pytest.approx(512 / 96)


@pytest.mark.parametrize("q_lora_rank", [None, 48])
def test_mla_matches_transformers_deepseek_v3(q_lora_rank):
    """HF DeepSeek-V3 with every layer dense and rotate-half RoPE is our MLA model:
    parameter names line up one to one and the logits agree."""
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(PRESETS["tiny-mla"], num_hidden_layers=2, vocab_size=97,
                              q_lora_rank=q_lora_rank, tie_word_embeddings=False)
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=2, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, first_k_dense_replace=2, rope_interleave=False,
        q_lora_rank=q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False, initializer_range=0.1, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    ours = Transformer(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
        cache, tables = ours.make_cache(2, 32), [[0], [1]]  # and the absorbed decode path, same reference
        ours(ids[:, :29], KVBatch.from_tables(cache, torch.arange(29).expand(2, 29), tables))
        last = ours(ids[:, 29:], KVBatch.from_tables(cache, torch.full((2, 1), 29), tables))
        torch.testing.assert_close(last[:, 0], hf(ids).logits[:, -1], atol=1e-4, rtol=0)


def test_fused_rms_norm_equals_the_reference():
    from attention import RMSNorm
    norm = RMSNorm(64, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 7, 64, dtype=dtype) * 5
        torch.testing.assert_close(norm(x), norm.reference(x), atol=0, rtol=0 if dtype == torch.float32 else 1e-2)
