"""LoRA (Hu et al. 2021): adapt a frozen model by training a low-rank update of some of its projections.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r), W frozen

B starts at zero, so training starts from the base model exactly; A is initialised as nn.Linear
initialises a weight (Kaiming-uniform), as PEFT does. Only A and B train and sit in the optimizer:
with AdamW that is 16 bytes per adapter parameter instead of per model parameter. Merged,
W' = W + (alpha / r) B A is an ordinary model again (merge, `python lora.py merge`).

An adapter directory is PEFT's: adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout,
target_modules, base_model_name_or_path) and adapter_model.safetensors with PEFT's key names
(base_model.model.<module>.lora_A.weight), so `peft.PeftModel.from_pretrained(base, dir)` reads it, and
Transformer.from_pretrained(dir) loads the base it names with the adapter on top.

    lora.add(model, r=16, alpha=32, dropout=0.05)   # wraps the target projections, freezes the rest
    with lora.disabled(model): ...                  # the base model (DPO's and GRPO's reference)
    lora.merge(model)                               # fold the adapters in: plain nn.Linear layers again
    python lora.py merge ADAPTER_DIR OUT_DIR        # a full model directory transformers loads

Left out: DoRA, rsLoRA scaling, LoRA on embeddings, several adapters on one model.
"""

import argparse
import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# attention and MLP; in MoE layers every expert's (and the shared experts') gate/up/down, never the
# router (moe.Router is no nn.Linear, so no target name can reach it)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """An nn.Linear (its weight and bias keep their names, so the base's checkpoint names hold) plus
    lora_A, lora_B: y = F.linear(x, W, b) + scaling * B(A(dropout(x))) while enabled."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: no copy
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)  # Kaiming-uniform, as nn.Linear does
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.r, self.alpha, self.scaling, self.enabled = r, alpha, alpha / r, True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """(out, in): the update the adapter adds to W, scaling * B A."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def adapters(model) -> dict:
    """{module name: LoRALinear} of the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add(model, r=16, alpha=32.0, dropout=0.0, targets=TARGETS, base_path=None) -> dict:
    """Wrap every nn.Linear whose name ends in one of targets; freeze every other parameter. Returns the
    adapter config (PEFT's fields), also kept as model.lora_config for save_pretrained; base_path: the
    base's directory, written as base_model_name_or_path. A target that matches nothing is an error."""
    if not (isinstance(r, int) and r >= 1) or not alpha > 0 or not 0 <= dropout < 1:
        raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1) (got {r}, {alpha}, {dropout})")
    found = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
             and name.rsplit(".", 1)[-1] in targets and not name.endswith("lm_head")}
    missing = set(targets) - {name.rsplit(".", 1)[-1] for name in found}
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {sorted(missing)} match no linear layer of this model; its layers are "
                         f"named {', '.join(linear)}")
    model.requires_grad_(False)
    for name, layer in found.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(layer, r, alpha, dropout))
    model.lora_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted(set(targets)), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": os.path.abspath(base_path) if base_path else None}
    return model.lora_config


@contextmanager
def disabled(model):
    """The base model inside the block: every adapter off (and back on after)."""
    layers = list(adapters(model).values())
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


class Base(nn.Module):
    """The adapted model with its adapters off, as a frozen reference that shares the weights (DPO, GRPO):
    no second copy. The model is held outside the module tree, so requires_grad_(False) or eval() on the
    reference never reach the policy it shares its weights with."""

    def __init__(self, model):
        super().__init__()
        self.__dict__["adapted"] = model  # not a submodule: parameters(), eval(), requires_grad_() skip it

    def forward(self, *args, **kwargs):
        with disabled(self.adapted):
            return self.adapted(*args, **kwargs)


@torch.no_grad()
def merge(model):
    """Fold each adapter into its weight (W += scaling B A) and put back a plain nn.Linear; returns model."""
    for name, m in adapters(model).items():
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter(m.weight + m.delta().to(m.weight.dtype), requires_grad=m.weight.requires_grad)
        plain.bias = m.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    return model


# -----------------------------------------------------------------------------
# PEFT's adapter directory


def is_adapter_dir(path) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save(path, state_dict, config):
    """adapter_config.json and adapter_model.safetensors from a model's state_dict (its lora_ keys, in PEFT's
    names); config["base_model_name_or_path"] is absolute, so the adapter directory can move."""
    from safetensors.torch import save_file
    tensors = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in state_dict.items() if ".lora_" in k}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE + ".tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(path, WEIGHTS_FILE + ".tmp"), os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def read_config(path) -> dict:
    with open(os.path.join(path, CONFIG_FILE)) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{path}/{CONFIG_FILE}: only plain LoRA adapters are supported (peft_type LORA, no DoRA, "
                         f"no rsLoRA); this one is {config.get('peft_type')!r}")
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(f"{path}/{CONFIG_FILE}: target_modules must be a list of module names (got {targets!r})")
    base = config.get("base_model_name_or_path")
    if not (isinstance(base, str) and os.path.isdir(base)):
        raise ValueError(f"{path}/{CONFIG_FILE}: its base model {base!r} is not a local directory; put the base "
                         "model there or edit base_model_name_or_path")
    return config


def load(model, path, config):
    """Wrap model's targets as the adapter says and load its weights; missing or unexpected keys are errors.
    The adapters are trainable (a run may go on), the rest frozen."""
    from safetensors.torch import load_file
    add(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), tuple(config["target_modules"]),
        config["base_model_name_or_path"])
    tensors = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v
               for k, v in load_file(os.path.join(path, WEIGHTS_FILE)).items()}
    own = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    if set(tensors) != set(own):
        raise ValueError(f"{path}/{WEIGHTS_FILE} does not fit its base: missing {sorted(set(own) - set(tensors))[:3]}, "
                         f"unexpected {sorted(set(tensors) - set(own))[:3]}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def tokenizer_dir(path) -> str:
    """Where an adapter directory's tokenizer is: its own (a training checkpoint has one), else its base's."""
    if is_adapter_dir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return read_config(path)["base_model_name_or_path"]
    return path


def counts(model) -> tuple:
    """(trainable, total) parameters."""
    params = list({id(p): p for p in model.parameters()}.values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def main():
    import checkpoint
    import cli
    from model import Transformer
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="base + adapter -> a full model directory (config.json, model.safetensors)")
    m.add_argument("adapter", help="adapter directory (or a LoRA run directory: its latest checkpoint)")
    m.add_argument("out", help="where to write the merged model directory")
    args = p.parse_args()
    try:
        path = checkpoint.resolve(args.adapter)
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"adapter: {e}") from None
    if not is_adapter_dir(path):
        raise cli.UsageError(f"{path} holds no {CONFIG_FILE}: not a LoRA adapter directory")
    if os.path.exists(args.out) and os.listdir(args.out):
        raise cli.UsageError(f"{args.out} exists and is not empty: pick a new directory")
    try:
        model = merge(Transformer.from_pretrained(path, dtype=torch.float32))
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"cannot load {path}: {e}") from None
    model.save_pretrained(args.out)
    import tokenizer
    tokenizer.load(tokenizer_dir(path)).save(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"merged {path} into {args.out} ({n / 1e6:.1f}M parameters, {math.ceil(n * 4 / 2**20)} MiB fp32)")


if __name__ == "__main__":
    import cli
    cli.run(main)
