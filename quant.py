"""Weights for decoding: int8 per output channel, int4 per group of 32 inputs, float through oneDNN.

Decoding one token reads every weight once, so at small batch it is memory-bound: its speed is
(memory bandwidth) / (bytes of weights per token). Storing weights in 8 or 4 bits reads 4 or 8x
fewer bytes than fp32; the matmul kernels dequantize in registers.

    int8, symmetric, per output row o:   s_o = max_i |W_oi| / 127;   Q = round(W / s) in [-127, 127];
                                         W ~ Q * s                                  (_weight_int8pack_mm)
    int4, asymmetric, per row and group g of 32 inputs:   lo, hi = min, max of the group;
                                         s = (hi - lo) / 15;   Q = round((W - lo) / s) in [0, 15];
                                         W ~ (Q - 8) * s + z,  z = lo + 8 s     (_weight_int4pack_mm_for_cpu)

Both kernels take bf16 activations (an fp32 input would run a slow path); the layers cast on the
way in and back to the caller's dtype on the way out, so the rest of the model (norms, attention,
the residual stream, the KV cache) keeps its own dtype. The readable paths, dequantize then the
ordinary matmul, are `Int8Linear.reference` and `dequantize_int4`; tests hold the kernels to them.

What is quantized: every Linear of the decoder blocks, and the embedding table / output head in
int8 for both kinds (the head decides every token; int4 there costs the most quality for the
least memory). A tied head and the embedding share one int8 table: a row's per-row scale
dequantizes that token's embedding exactly as it does the head's output channel. MLA's
kv_b_proj stays in float (the absorbed decode path reads its weight directly). In MoE layers each
expert's projections are Linears and are quantized; the router (moe.Router) is no Linear and stays
float: its top-k is a discrete choice that rounding would flip.

Weights left in float (all of them when nothing is quantized) go through oneDNN's matmul on a CPU
(`use_onednn`), the same product as F.linear, which is `OneDNNLinear.reference`.

Under torch.compile a one-row product (batch-1 decode) is `gemv` instead, a multiply and a sum that
inductor fuses into one pass over the weight (int8 and float weights; int4 keeps its kernel); tests
hold it to the same references.

Left out: activation quantization (W8A8), GPTQ / AWQ calibration, the CUDA int4 layout.

    model = quantize(Transformer.from_pretrained(path), "int8")     # in place; returns the model
    model = use_onednn(Transformer.from_pretrained(path).eval())      # float Linears on oneDNN
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("int8", "int4")
GROUP = 32  # int4 group size: inputs sharing one scale and zero


# -----------------------------------------------------------------------------
# One row: the product as a multiply and a sum, for inductor to fuse

# torch.compile options for a model whose products go through gemv: inductor inlines a cheap producer of
# x (an RMSNorm, SiLU(gate) * up) into the loop of each reduction that reads it, which recomputes it for
# every output row; a threshold of 1 has it store x once instead.
COMPILE_OPTIONS = {"realize_acc_reads_threshold": 1}


def fused_gemv(x: torch.Tensor) -> bool:
    """True inside torch.compile when x (..., K) is a single row (batch-1 decode; the compiled graph
    specializes on it)."""
    return torch.compiler.is_compiling() and x.numel() == x.shape[-1]


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y_n = sum_k x_k W_nk: x (..., K) one row, W (N, K) in any dtype -> (..., N) fp32.

    Written as an elementwise product and a sum, which inductor compiles to one loop over W: each
    weight read once and converted in registers, each row's dot product kept in a vector register.
    A matrix-vector product reads W once and does 2 flops per weight, so that loop runs at memory
    speed; the library GEMMs, built for many rows, read a one-row product slower on a CPU (README).
    Eager, this would materialize the (N, K) product: call it only where fused_gemv(x)."""
    return (x.float().unsqueeze(-2) * w).sum(-1)


# -----------------------------------------------------------------------------
# int8, per output channel

def quantize_int8(w: torch.Tensor):
    """w (N, K) float -> (q (N, K) int8, scales (N,) bf16), w ~ q * scales[:, None]."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x Q^T * s (+ b): int8 weights Q (N, K) with per-output-channel bf16 scales s (N,)."""

    def __init__(self, qweight, scales, bias=None):
        super().__init__()
        self.register_buffer("qweight", qweight)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) bf16
        self.bias = bias
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(*quantize_int8(linear.weight), _frozen(linear.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        if fused_gemv(x):
            y = (gemv(x2, self.qweight) * self.scales).to(torch.bfloat16)
        else:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
        return _finish(y, x, self.bias)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]  # (N, K)

    def reference(self, x):
        """The same product the readable way: bf16 input, dequantized weight, fp32 matmul."""
        return F.linear(x.to(torch.bfloat16).float(), self.dequantize(), _float(self.bias)).to(x.dtype)


# -----------------------------------------------------------------------------
# int4, groups of 32 inputs

def int4_fits(linear: nn.Linear) -> bool:
    """torch's CPU int4 kernel needs N a multiple of 16 and K of the group size."""
    n, k = linear.weight.shape
    return n % 16 == 0 and k % GROUP == 0


def quantize_int4(w: torch.Tensor):
    """w (N, K) float -> (q (N, K) int32 in [0, 15], scales_and_zeros (K/32, N, 2) bf16),
    w ~ (q - 8) * s + z per group."""
    w = w.detach().float()
    N, K = w.shape
    g = w.view(N, K // GROUP, GROUP)
    lo, hi = g.amin(dim=2), g.amax(dim=2)  # (N, K/32)
    s = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((g - lo[..., None]) / s[..., None]).round().clamp(0, 15).to(torch.int32).view(N, K)
    z = lo + 8 * s
    return q, torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W dequantized group by group from 4-bit codes, in torch's packed CPU layout."""

    def __init__(self, q, scales_and_zeros, bias=None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # (N, K/2) uint8
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (K/32, N, 2) bf16
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        return cls(*quantize_int4(linear.weight), _frozen(linear.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, GROUP,
                                              self.scales_and_zeros)
        return _finish(y, x, self.bias)


def dequantize_int4(q, scales_and_zeros) -> torch.Tensor:
    """(q - 8) * s + z per group, from the unpacked codes: the formula the kernel implements."""
    N, K = q.shape
    s, z = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # each (N, K/32)
    return ((q.view(N, K // GROUP, GROUP).float() - 8) * s[..., None] + z[..., None]).view(N, K)


# -----------------------------------------------------------------------------
# The embedding table, shared with a tied head

class Int8Embedding(nn.Module):
    """Token embeddings from an int8 table Q (V, C) with per-row scales s: e_t = Q_t * s_t."""

    def __init__(self, qweight, scales, dtype):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, C)"""
        return F.embedding(ids, self.qweight).to(self.dtype) * self.scales[ids, None].to(self.dtype)


# -----------------------------------------------------------------------------
# Float weights, through oneDNN

# torch.compile's CPU backend calls this oneDNN matmul for Linears; eager F.linear in fp32 calls the BLAS
# library torch was built with, which on some CPUs reads a weight markedly slower at small batch (README,
# "Fast decoding on a CPU"). bf16 F.linear runs on oneDNN already: the module is there for gemv.
HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
FLOATS = (torch.float32, torch.bfloat16)  # the weights use_onednn takes


class OneDNNLinear(nn.Module):
    """y = x W^T (+ b): an nn.Linear's own weight and bias (the same Parameters, so a tied head stays
    tied and state_dict names do not change), multiplied by oneDNN (by gemv for one row under
    torch.compile). Inference only (no autograd)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.out_features, self.in_features = linear.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_gemv(x):
            y = gemv(x, self.weight).to(x.dtype)
            return y if self.bias is None else y + self.bias
        if torch.compiler.is_compiling():  # an opaque call: inductor's own lowering of it wants frozen weights
            return onednn_linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@torch.library.custom_op("astrai::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's matmul as an operator torch.compile calls as it is (x (..., K) -> (..., N))."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def use_onednn(model):
    """Every fp32 / bf16 nn.Linear of an inference model on a CPU (all of them, or those quantize left
    in float) computed by oneDNN, or by gemv inside torch.compile at one row; returns model. A no-op
    where oneDNN is missing or the model is not on a CPU."""
    if not HAS_ONEDNN:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in FLOATS and child.weight.device.type == "cpu":
                setattr(parent, name, OneDNNLinear(child))
    return model


# -----------------------------------------------------------------------------
# The model

def quantize(model, kind: str):
    """Replace model's weights by `kind` ("int8" | "int4") in place, for inference; returns model.
    int4 layers the CPU kernel cannot take (shape, or a non-CPU device) are int8 instead."""
    if kind not in KINDS:
        raise ValueError(f"quantize: kind must be one of {KINDS}, got {kind!r}")
    if getattr(model, "quantized", None):
        raise ValueError(f"this model is already quantized ({model.quantized})")
    dtype = model.model.norm.weight.dtype
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and name != "kv_b_proj":
                    int4 = kind == "int4" and int4_fits(child) and child.weight.device.type == "cpu"
                    setattr(parent, name, (Int4Linear if int4 else Int8Linear).from_linear(child))
    head = Int8Linear.from_linear(model.lm_head)
    if model.config.tie_word_embeddings:  # one table for both: the head's rows are the tokens' embeddings
        table, scales = head.qweight, head.scales
    else:
        table, scales = quantize_int8(model.model.embed_tokens.weight)
    model.lm_head = head
    model.model.embed_tokens = Int8Embedding(table, scales, dtype)
    model.quantized = kind
    return model


def pick_dtype(device, batch_sizes=(1, 8), quantized=None):
    """--dtype auto -> (dtype, why): bf16 on CUDA; on a CPU, fp32 activations under quantized weights
    (the kernels take bf16 inside; the elementwise ops are faster in fp32 on a CPU); else, on a CPU that
    computes bf16 natively (AVX512-BF16 or AMX), bf16 when a 32 MB weight's matmul measures faster than
    fp32 at each of batch_sizes (the decode batch sizes in use), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return (torch.bfloat16, "CUDA computes bf16") if torch.cuda.is_bf16_supported() else \
            (torch.float32, "this GPU has no bf16")
    if quantized:
        return torch.float32, f"auto: {quantized} weights, fp32 activations"
    if device.type != "cpu" or not torch.backends.mkldnn.is_available() \
            or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32, "no native bf16 on this device"
    w = torch.randn(4096, 2048)
    fp32 = OneDNNLinear(nn.Linear(2048, 4096, bias=False)) if HAS_ONEDNN else nn.Linear(2048, 4096, bias=False)
    with torch.inference_mode():  # fp32 timed through the kernel use_onednn gives it
        ratios = [_seconds(fp32, torch.randn(b, 2048)) / _seconds(F.linear, torch.randn(b, 2048).bfloat16(),
                                                                  w.bfloat16()) for b in batch_sizes]
    faster = all(r > 1 for r in ratios)
    measured = ", ".join(f"{r:.2f}x at batch {b}" for b, r in zip(batch_sizes, ratios))
    return (torch.bfloat16 if faster else torch.float32), f"auto: bf16 matmul speed vs fp32 {measured}"


def _seconds(fn, *args, repeats=5):
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers, each storage counted once (a tied table once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _frozen(bias):
    return None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)


def _float(bias):
    return None if bias is None else bias.float()


def _finish(y, x, bias):
    """The kernel's (M, N) bf16 output as (..., N) in x's dtype, plus the bias. (On the decode path of every
    layer: the kernels above are called through torch._weight_*, cheaper to call than torch.ops.aten's.)"""
    y = y.view(x.shape[:-1] + y.shape[1:]).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)
