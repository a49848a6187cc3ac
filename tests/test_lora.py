"""LoRA: the layer's equation, PEFT (the independent reference) reading our adapter files with no missing or
unexpected keys and giving our logits (and we reading PEFT's), merge = unmerged, gradients only on adapters,
and train.py runs with --lora-rank: start line, PEFT-format checkpoints, exact resume, DPO's reference."""

import json
import os
import shutil

import pytest
import torch

import engine as engine_lib
import lora
import train
from model import Transformer
from test_train import SMALL, files, metrics, run_cli  # noqa: F401  (files: the fixture)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, files):  # noqa: F811
    """A transformers-written Llama directory (with our tokenizer) as the base to adapt."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d, tok = files
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, tie_word_embeddings=False)).save_pretrained(str(path))
    tok.save(str(path))
    return path


def adapted(base, r=4, seed=1):
    """Our model of base with adapters whose B is random (a trained-looking adapter, not the zero start)."""
    model = Transformer.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(seed)  # A's initialisation
    lora.add(model, r=r, alpha=2.0 * r, targets=lora.TARGETS, base_path=str(base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model.eval()


IDS = torch.tensor([[1, 5, 9, 30, 2, 7, 11, 40], [3, 3, 8, 12, 50, 60, 4, 9]])


def test_the_layer_is_its_equation_and_starts_as_the_base():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    layer = lora.LoRALinear(base, r=4, alpha=8.0, dropout=0.0)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))  # B = 0
    torch.nn.init.normal_(layer.lora_B.weight)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert torch.allclose(layer(x), x @ base.weight.T + base.bias + 2.0 * (x @ A.T @ B.T), atol=1e-5)
    with lora.disabled(layer):
        assert torch.equal(layer(x), base(x))


def test_peft_reads_our_adapter_and_we_read_peft(hf_base, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM
    ours = adapted(hf_base)
    ours.save_pretrained(str(tmp_path / "ours"))
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(hf_base)), str(tmp_path / "ours"))
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(str(hf_base)), LoraConfig(
        r=4, lora_alpha=8, target_modules=list(lora.TARGETS)))
    keys = set_peft_model_state_dict(fresh, load_peft_weights(str(tmp_path / "ours")))
    assert keys.unexpected_keys == [] and not [k for k in keys.missing_keys if "lora_" in k]
    with torch.no_grad():
        assert torch.allclose(theirs(IDS).logits, ours(IDS), atol=1e-5)
        assert not torch.allclose(ours(IDS), Transformer.from_pretrained(str(hf_base))(IDS), atol=1e-3)  # it adapts
    # and the other way: an adapter PEFT wrote, through Transformer.from_pretrained
    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(hf_base)), LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    again = Transformer.from_pretrained(str(tmp_path / "theirs"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(again(IDS), peft_model(IDS).logits, atol=1e-5)


def test_merged_equals_unmerged_and_the_merge_command_writes_a_transformers_model(hf_base, tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM
    model = adapted(hf_base)
    with torch.no_grad():
        before = model(IDS)
        model.save_pretrained(str(tmp_path / "adapter"))
        merged = lora.merge(adapted(hf_base))
        assert not lora.adapters(merged) and torch.allclose(merged(IDS), before, atol=1e-5)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "lora.py", "merge", str(tmp_path / "adapter"), str(tmp_path / "merged")],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
        assert torch.allclose(hf(IDS).logits, before, atol=1e-5)
    # the engine serves an adapter directory (merged on load): greedy tokens as the plain reference decodes them
    with engine_lib.InferenceEngine.from_pretrained(str(tmp_path / "adapter"), max_batch_size=1) as e:
        out = e.generate([[1, 5, 9]], engine_lib.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == engine_lib.generate_reference(merged, [1, 5, 9], 8)


def test_only_adapters_get_gradients_and_sit_in_the_optimizer(hf_base):
    model = adapted(hf_base).train()
    loss = model(IDS).logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name
    trainable, total = lora.counts(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) < total / 10


def test_lora_runs_save_peft_checkpoints_and_resume_exactly(files, hf_base, tmp_path):  # noqa: F811
    d, tok = files
    common = ["--type", "sft", "--data", d / "sft.h5", "--model", hf_base, "--lora-rank", "4", *SMALL,
              "--lr", "3e-3", "--steps", "4", "--save-every", "2", "--keep-last", "5"]
    r = run_cli(*common, "--out", tmp_path / "full")
    assert r.returncode == 0, r.stderr
    assert "trainable" in r.stdout and "LoRA r=4" in r.stdout
    step = tmp_path / "full" / "step_000004"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(step))
    assert json.loads((step / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf_base)
    part = tmp_path / "part"  # interrupted after its step-2 checkpoint
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "step_000002", part / "step_000002")
    (part / "latest").write_text("step_000002\n")
    (part / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(tmp_path / "full")[:2]))
    r = run_cli(*common, "--out", part, "--resume")
    assert r.returncode == 0, r.stderr
    a = Transformer.from_pretrained(str(step)).state_dict()
    b = Transformer.from_pretrained(str(part / "step_000004")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if ".lora_" in k)
    assert [m["loss"] for m in metrics(tmp_path / "full")] == [m["loss"] for m in metrics(part)]
    from peft import PeftModel  # a training checkpoint is itself the adapter directory PEFT reads
    from transformers import AutoModelForCausalLM
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(hf_base)), str(step))
    with torch.no_grad():
        assert torch.allclose(theirs(IDS).logits, Transformer.from_pretrained(str(step)).eval()(IDS), atol=1e-5)


def test_dpo_with_lora_uses_the_base_as_its_reference(files, hf_base):  # noqa: F811
    d, tok = files
    args = train.build_parser().parse_args(["--type", "dpo", "--data", str(d / "dpo.h5"), "--model", str(hf_base),
                                            "--lora-rank", "4"])
    model = train.build_model(args, tok, torch.device("cpu"))
    strategy = train.build_strategy(args, model, torch.device("cpu"), tok)
    assert isinstance(strategy.reference, lora.Base) and not list(strategy.reference.parameters())  # no copy
    from test_train import fixed_batch
    batch = fixed_batch("dpo", d / "dpo.h5", tok)
    loss, m = strategy.loss(model, batch)
    assert m["reward_chosen"] == 0 and m["reward_rejected"] == 0  # B = 0: the policy is the base
    assert any(p.requires_grad for p in model.parameters())  # the reference froze nothing of the policy


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--lora-rank", "4"], "adapts a trained model"),
    (["--lora-rank", "4", "--lora-targets", "q_proj,qkv"], "match no linear layer"),
    (["--lora-rank", "4", "--lora-dropout", "1.5"], "--lora-dropout in [0, 1)"),
])
def test_bad_lora_flags_are_one_line(files, hf_base, tmp_path, argv, message):  # noqa: F811
    d, _ = files
    model = [] if "--preset" in argv else ["--model", hf_base]
    r = run_cli("--type", "sft", "--data", d / "sft.h5", "--tokenizer", d / "tok", *model, *argv, "--steps", "1",
                "--out", tmp_path / "x")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["grpo", "rm"])
def test_grpo_and_the_reward_model_train_adapters(kind, files, hf_base, tmp_path):  # noqa: F811
    import strategies
    d, _ = files
    extra = ["--group-size", "4", "--max-new-tokens", "6"] if kind == "grpo" else []
    r = run_cli("--type", kind, "--data", d / f"{strategies.STRATEGIES[kind][1]}.h5", "--model", hf_base,
                "--lora-rank", "2", "--out", tmp_path / kind, "--steps", 2, *SMALL, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    step = tmp_path / kind / "step_000002"
    assert (step / "adapter_model.safetensors").exists() and not (step / "model.safetensors").exists()
    if kind == "rm":
        rm = strategies.RewardModel.from_pretrained(str(step))
        assert rm.form == "head" and lora.adapters(rm.backbone)


def test_grpo_rollouts_sample_the_adapted_policy(files, hf_base):  # noqa: F811
    from test_train import grpo_run
    d, tok = files
    rollouts, prompts = grpo_run(d, tok, "--lora-rank", "2", "--model", str(hf_base), "--seq-len", "64")
    model = rollouts.model
    torch.manual_seed(0)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            m.lora_B.weight.normal_(0, 0.5)
    rollouts.engine.reset_prefix_cache()
    prompt = prompts["prompts"][0]
    got = rollouts.engine.generate([prompt], engine_lib.SamplingParams(max_tokens=6, temperature=0,
                                                                       ignore_eos=True))[0].token_ids
    import copy
    merged = lora.merge(copy.deepcopy(model))
    assert got == engine_lib.generate_reference(merged, prompt, 6)
    with lora.disabled(model):
        assert engine_lib.generate_reference(model, prompt, 6) != got  # the adapter changed what is sampled
