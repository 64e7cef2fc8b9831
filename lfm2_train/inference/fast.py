"""A fast CPU inference path for LFM2, built from a trained model's weights (the training model is untouched).

Why a second implementation: the training model is written for autograd, packing and distributed wrappers;
decode on a CPU is instead bound by the bytes of weights streamed per token and by per-op overhead. Here:
- weights are re-laid out once: fused QKV and fused w1|w3 (one matrix-vector product instead of three / two),
  optionally quantized (`quant.py`: weight-only int8, W8A8 or q4_0; `quant=`);
- all state is preallocated (KV for attention layers -- fp16 under quantized weights, `kv_dtype=` -- a
  (k-1)-token window for conv layers, RoPE tables), no layout objects, no mask building without padding;
- with the native kernels (`native.py`, `csrc/`; `kernels=`), a decode step is one native call that runs every
  layer (`decode_step.py`); otherwise (MoE layers, more than GEMM_MIN_ROWS rows, no kernels) it is a straight
  sequence of tensor ops with native matrix-vector products, attention, norms and conv steps where they
  build, torch ops elsewhere (batched products over the KV heads for attention);
- the weights decode streams, and the KV caches, live in huge-page-advised memory (`pages.py`);
- prefill's GEMMs go through oneDNN (`native.gemm`); bf16 stays bf16 on CPUs with bf16 matrix hardware and is
  upcast to fp32 elsewhere (CPUs without it, e.g. AVX2, run bf16 GEMMs several times slower than fp32),
  while the matrix-vector products of decode read bf16 (half the bytes);
- prefill runs in chunks (`prefill_chunk` tokens), so activations stay cache-sized.

Public API (used by generation, eval and search):
    fast = FastLFM2.from_model(model, dtype=torch.bfloat16, quant=None)    # quant: int8 | w8a8 | q4_0
    state = fast.new_state(batch_size, max_length)
    logits = fast.prefill(state, ids, attention_mask)   # (B, V) fp32, last position
    logits = fast.decode(state, next_ids)                # (B, V) fp32
    fast.logits(ids, attention_mask)                     # (B, T, V) fp32, every position (scoring)
    fast.generate(prompts, SamplingConfig(...))          # same contract as `inference.generate`
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import ATTENTION, LFM2Config, LFM2ForCausalLM
from ..model.cache import reorder_rows
from . import native, pages
from .decode_step import DecodeStep
from .decoding import GenerationOutput, run_generation
from .quant import QUANT_MODES, QuantLinear, make_quantized
from .sampling import SamplingConfig

LinearFn = Callable[[torch.Tensor], torch.Tensor]
# Products with more rows than this count as GEMMs (prefill) rather than matrix-vector products (decode).
GEMM_MIN_ROWS = 16
KERNELS = ("auto", "native", "torch")
# The LM head's quantization under each `quant` unless `head_quant` says otherwise: 8 bits under 4-bit
# weights. The head decides every token, and 4-bit steps there cost the most greedy agreement (tiny chain
# model: q4_0 head 94.1%, w8a8 head 98.1% of 320 steps agree with fp32); llama.cpp's q4_0 files likewise
# keep `output.weight` at 6-8 bits unless `--pure`. LFM2-350M: 200 -> 230 MB read per token.
HEAD_QUANT = {"q4_0": "w8a8"}


class DenseLinear:
    """`x @ W.T` with W stored once, row-major, in the fast path's dtype.

    Decode (few rows): the native matrix-vector kernel with `use_native` (fp32 accumulation, fp32 or bf16
    weights read as stored), else `F.linear`. Prefill (many rows): `native.gemm`; bf16 weights are upcast to fp32
    first, because CPUs without native bf16 (AVX2) run bf16 GEMMs several times slower than fp32.
    """

    def __init__(self, weight: torch.Tensor, use_native: bool = False) -> None:
        # Streamed once per decode step by the native kernels: from huge pages (`pages`).
        self.weight = pages.copy(weight) if use_native else weight.detach().contiguous()
        # 16-bit prefill GEMMs run in fp32 on upcast operands unless the CPU has bf16 matrix hardware
        # (the result is rounded to the activation dtype either way; the sums are fp32 in both).
        half = self.weight.dtype in (torch.bfloat16, torch.float16)
        self.upcast_gemm = half and not (self.weight.dtype == torch.bfloat16 and native.bf16_gemm_in_hardware())
        native_dtype = self.weight.dtype in (torch.float32, torch.bfloat16)
        self.gemv = native.Gemv(self.weight) if use_native and native_dtype else None

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= GEMM_MIN_ROWS:
            if self.gemv is not None:
                y = self.gemv(x.reshape(rows, x.shape[-1]))
                y = y if x.dtype == torch.float32 else y.to(x.dtype)
                return y.view(*x.shape[:-1], self.weight.shape[0])
            return F.linear(x, self.weight)
        if self.upcast_gemm or x.dtype != self.weight.dtype:
            return native.gemm(x.float(), self.weight.float()).to(x.dtype)
        return native.gemm(x, self.weight)


def _make_linear(weight: torch.Tensor, dtype: torch.dtype, quant: str | None, use_native: bool
                 ) -> DenseLinear | QuantLinear:
    return make_quantized(weight, quant, use_native) if quant else DenseLinear(weight.to(dtype), use_native)


def resolve_kernels(kernels: str) -> bool:
    """`auto` | `native` | `torch` -> whether decode uses the native kernels (`native` fails loudly)."""
    if kernels not in KERNELS:
        raise ValueError(f"FastLFM2 kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "native":
        native.require()
        return True
    return kernels == "auto" and native.available()


def _native_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`native.rms_norm` for any float x: bf16 / fp16 activations are normalized in fp32 (fp32 weight) and
    rounded once at the end (the reference rounds before the weight too; within the bf16 tolerance)."""
    if x.dtype == torch.float32:
        return native.rms_norm(x, weight, eps)
    return native.rms_norm(x.float(), weight, eps).to(x.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (fp32 statistics, cast back before the weight)."""
    dtype = x.dtype
    if dtype == torch.float32:  # fewer op calls (decode pays a few us per call); equal up to rounding
        return weight * (x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True).mul_(1 / x.shape[-1]).add_(eps)))
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on x (B, T, heads, D) with cos/sin (B, T, 1, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class FastState:
    """Preallocated decode state for `batch_size` rows of up to `max_length` tokens."""

    batch_size: int
    max_length: int
    keys: dict[int, torch.Tensor]  # layer -> (B, G, max_length, D)
    values: dict[int, torch.Tensor]
    conv: dict[int, torch.Tensor]  # layer -> (B, k-1, d): the last k-1 gated inputs, oldest first
    key_valid: torch.Tensor  # (B, max_length) bool: False for left padding
    next_position: torch.Tensor  # (B,) RoPE position of each row's next token
    length: int = 0
    has_padding: bool = False

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only / reorder rows (e.g. drop finished sequences from a batch)."""
        reorder_rows(self, index)

    @property
    def nbytes(self) -> int:
        """Bytes of KV + conv state (what grows with the context for attention layers)."""
        tensors = [*self.keys.values(), *self.values.values(), *self.conv.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def _check_room(state: FastState, T: int) -> None:
    if state.length + T > state.max_length:
        raise ValueError(f"FastState holds {state.max_length} tokens; {state.length} used, {T} more requested")


class _Layer:
    """One decoder layer's weights, re-laid out for inference."""

    def __init__(self, model: LFM2ForCausalLM, idx: int, dtype: torch.dtype, act: torch.dtype, quant: str | None,
                 use_native: bool) -> None:
        cfg = model.config
        norm = torch.float32 if use_native else act  # the native RMSNorm takes fp32 weights

        def linear(weight: torch.Tensor) -> DenseLinear | QuantLinear:
            return _make_linear(weight.detach(), dtype, quant, use_native)

        layer = model.model.layers[idx]
        self.is_attention = cfg.layer_types[idx] == ATTENTION
        self.operator_norm = layer.operator_norm.weight.detach().to(norm)
        self.ffn_norm = layer.ffn_norm.weight.detach().to(norm)
        if self.is_attention:
            a = layer.self_attn
            self.n_heads, self.n_kv, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
            self.scale = a.scale
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dim=0).detach()
            self.qkv = linear(qkv)
            self.out_proj = linear(a.out_proj.weight)
            self.q_norm = a.q_layernorm.weight.detach().to(norm)
            self.k_norm = a.k_layernorm.weight.detach().to(norm)
        else:
            c = layer.conv
            if c.in_proj.bias is not None or c.out_proj.bias is not None or c.conv.bias is not None:
                raise NotImplementedError("FastLFM2 does not support conv_bias=true checkpoints (none are released)")
            self.in_proj = linear(c.in_proj.weight)
            self.out_proj = linear(c.out_proj.weight)
            self.conv_w = c.conv.weight.detach()[:, 0, :].t().float().contiguous()  # (k, d), oldest tap first
        self.moe = cfg.is_moe_layer(idx)
        ff = layer.feed_forward
        if self.moe:
            # Router and experts keep the float dtype (quantization covers the dense products).
            self.gate = ff.gate.weight.detach().to(act)
            self.expert_bias = ff.expert_bias.detach().float() if ff.use_expert_bias else None
            self.top_k, self.norm_topk, self.routed_scale = ff.top_k, ff.norm_topk, ff.scaling
            self.e_w1 = ff.experts.w1.detach().to(act)
            self.e_w3 = ff.experts.w3.detach().to(act)
            self.e_w2 = ff.experts.w2.detach().to(act)
        else:
            self.ff_dim = ff.w1.weight.shape[0]
            self.w13 = linear(torch.cat([ff.w1.weight, ff.w3.weight], dim=0))
            self.w2 = linear(ff.w2.weight)

    def linears(self) -> list[DenseLinear | QuantLinear]:
        names = ("qkv", "in_proj", "out_proj", "w13", "w2")
        return [getattr(self, n) for n in names if hasattr(self, n)]

    def float_weights(self) -> list[torch.Tensor]:
        names = ("operator_norm", "ffn_norm", "q_norm", "k_norm", "conv_w", "gate", "e_w1", "e_w3", "e_w2")
        return [getattr(self, n) for n in names if hasattr(self, n)]


class FastLFM2:
    """Inference-only LFM2 on plain tensors; see the module docstring for what makes it fast."""

    def __init__(self, model: LFM2ForCausalLM, dtype: torch.dtype, quant: str | None, prefill_chunk: int,
                 kernels: str = "auto", kv_dtype: torch.dtype | None = None, fused: bool = True,
                 head_quant: str | None = "auto") -> None:
        cfg: LFM2Config = model.config
        if prefill_chunk < 1:
            raise ValueError(f"FastLFM2 prefill_chunk must be >= 1, got {prefill_chunk}")
        self.config = cfg
        if quant is not None and quant not in QUANT_MODES:
            raise ValueError(f"FastLFM2 quant must be None or one of {QUANT_MODES}, got {quant!r}")
        self.dtype = dtype  # float dtype of unquantized weights and of activations
        self.quant = quant
        if head_quant == "auto":
            head_quant = HEAD_QUANT.get(quant, quant) if quant is not None else None
        if head_quant is not None and head_quant not in QUANT_MODES:
            raise ValueError(f"FastLFM2 head_quant must be 'auto', None or one of {QUANT_MODES}, got {head_quant!r}")
        self.head_quant = head_quant
        self.int8 = quant == "int8"
        # Quantized modes keep activations / state in `dtype` (fp32 by default); only the projections change.
        self.act_dtype = dtype
        # The KV cache: fp16 by default for quantized fp32 modes (half the bytes a long-context step reads;
        # llama.cpp's default too, and its rounding is far below the weights'), else the activation dtype.
        if kv_dtype is None:
            kv_dtype = torch.float16 if quant is not None and dtype == torch.float32 else dtype
        if kv_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"FastLFM2 kv_dtype must be a float dtype, got {kv_dtype}")
        self.kv_dtype = kv_dtype
        self.prefill_chunk = prefill_chunk
        self.use_native = resolve_kernels(kernels)  # before any weight is copied: `native` may refuse
        # RMSNorm and the conv step in one native call each (fp32 inside, also for bf16 activations):
        # decode's many small ops are slow once streaming the weights has flushed the caches. The conv
        # window is then kept in fp32 (the native step updates it in place).
        self.native_small_ops = self.use_native
        self._norm = _native_rms_norm if self.native_small_ops else _rms_norm
        self.conv_dtype = torch.float32 if self.native_small_ops else self.act_dtype
        self.eps = cfg.norm_eps
        self.kernel = cfg.conv_L_cache
        self.device = model.model.embed_tokens.weight.device
        if self.device.type != "cpu":
            raise ValueError(f"FastLFM2 is a CPU path; the model is on {self.device}")
        with torch.no_grad():
            self.layers = [_Layer(model, i, dtype, self.act_dtype, quant, self.use_native)
                           for i in range(cfg.num_hidden_layers)]
            self.final_norm = model.model.embedding_norm.weight.detach().to(
                torch.float32 if self.native_small_ops else self.act_dtype)
            embed = model.model.embed_tokens.weight.detach()
            head = model.lm_head.weight.detach()
            self.head = _make_linear(head, dtype, head_quant, self.use_native)
            tied = head.data_ptr() == embed.data_ptr()
            # Tied and quantized: look embeddings up in the quantized head (one table); float: share the tensor.
            if tied and not isinstance(self.head, DenseLinear):
                self.embed_q: QuantLinear | None = self.head
                self.embed = None
            elif tied:
                self.embed_q, self.embed = None, self.head.weight
            else:
                self.embed_q, self.embed = None, embed.to(self.act_dtype)
        self.inv_freq = model.model.rotary.inv_freq.detach().float()
        self._cos = self._sin = torch.empty(0)
        # Decode as one native call per token where every projection has a kernel (decode_step.py).
        self.step = DecodeStep.build(self) if fused else None

    @classmethod
    def from_model(cls, model: LFM2ForCausalLM, *, dtype: torch.dtype | None = None, quant: str | None = None,
                   int8: bool = False, prefill_chunk: int = 512, kernels: str = "auto",
                   kv_dtype: torch.dtype | None = None, fused: bool = True, head_quant: str | None = "auto"
                   ) -> FastLFM2:
        """Copy `model`'s weights into the inference layout.

        `dtype`: float dtype of weights and activations (default: the model's). `quant`: quantize every dense
        projection and the LM head (MoE experts and the router stay float): "int8" (weight-only, per-row
        scales), "w8a8" (int8 weights and per-token int8 activations) or "q4_0" (4-bit blocks of 32); see
        `inference.quant`. Activations between the projections stay in `dtype`. `int8=True` is the older
        spelling of quant="int8".
        `kernels`: matrix-vector products of decode through the native kernels (`native`: required; `auto`:
        when they build on this machine) or through `F.linear` (`torch`); see `inference.native`.
        `head_quant`: the LM head's (and a tied embedding's) quantization: "auto" (default) is `quant`, except
        w8a8 under q4_0 (`HEAD_QUANT`); None keeps it in `dtype`; or any `quant` value.
        `kv_dtype`: the KV cache's dtype (default: fp16 for quantized fp32 modes, else `dtype`).
        `fused`: with native kernels, run each decode step as one native call (`inference.decode_step`) when
        the model allows it (no MoE layer); False keeps the layer-by-layer path (tests compare the two).
        """
        if dtype is None:
            dtype = model.model.embed_tokens.weight.dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"FastLFM2 dtype must be a float dtype, got {dtype}")
        if int8 and quant not in (None, "int8"):
            raise ValueError(f"FastLFM2: int8=True means quant='int8'; it contradicts quant={quant!r}")
        return cls(model, dtype, "int8" if int8 else quant, prefill_chunk, kernels, kv_dtype, fused, head_quant)

    # ------------------------------------------------------------------ sizes
    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (every projection and the LM head; MoE: all experts)."""
        total = self.head.nbytes + self.final_norm.numel() * self.final_norm.element_size()
        for layer in self.layers:
            total += sum(lin.nbytes for lin in layer.linears())
            total += sum(t.numel() * t.element_size() for t in layer.float_weights())
        return total

    # ------------------------------------------------------------------ state
    def new_state(self, batch_size: int, max_length: int) -> FastState:
        cfg = self.config
        keys, values, conv = {}, {}, {}
        for i, layer in enumerate(self.layers):
            if layer.is_attention:
                shape = (batch_size, layer.n_kv, max_length, layer.head_dim)
                keys[i] = pages.empty(shape, self.kv_dtype)  # zeroed; streamed by every decode step
                values[i] = pages.empty(shape, self.kv_dtype)
            else:
                conv[i] = torch.zeros(batch_size, self.kernel - 1, cfg.hidden_size, dtype=self.conv_dtype)
        self._rope_table(max_length)
        return FastState(batch_size=batch_size, max_length=max_length, keys=keys, values=values, conv=conv,
                         key_valid=torch.ones(batch_size, max_length, dtype=torch.bool),
                         next_position=torch.zeros(batch_size, dtype=torch.long))

    def _rope_table(self, n: int) -> None:
        """cos/sin for positions < n, computed exactly as the model computes them per call."""
        if self._cos.shape[0] >= n:
            return
        freqs = torch.arange(n, dtype=torch.long).float()[:, None] * self.inv_freq  # (n, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos, self._sin = emb.cos(), emb.sin()

    # ------------------------------------------------------------------ public steps
    @torch.inference_mode()
    def prefill(self, state: FastState, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Feed (B, T) tokens (left padding marked 0 in `attention_mask`) in chunks of `prefill_chunk`.

        Returns fp32 logits of the last position (B, V), or of every position (B, T, V) with `all_logits`.
        """
        if ids.dim() != 2 or ids.shape[0] != state.batch_size:
            raise ValueError(f"prefill ids must be (batch={state.batch_size}, T), got {tuple(ids.shape)}")
        valid = None
        if attention_mask is not None:
            if attention_mask.shape != ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != ids {tuple(ids.shape)}")
            valid = attention_mask.to(torch.bool)
            if bool(valid.all()):
                valid = None
        T = ids.shape[1]
        outs = []
        for start in range(0, T, self.prefill_chunk):
            end = min(T, start + self.prefill_chunk)
            chunk_valid = valid[:, start:end] if valid is not None else None
            h = self._forward(state, ids[:, start:end], chunk_valid)  # (B, C, d) final-normed
            if all_logits:
                outs.append(self.head(h).float())
        if all_logits:
            return torch.cat(outs, dim=1)
        return self.head(h[:, -1]).float()

    @torch.inference_mode()
    def decode(self, state: FastState, ids: torch.Tensor) -> torch.Tensor:
        """One token per row: ids (B,) or (B, 1) -> fp32 logits (B, V)."""
        B = state.batch_size
        if self.step is None or B > GEMM_MIN_ROWS:
            h = self._forward(state, ids.reshape(B, 1), None)
            return self.head(h[:, -1]).float()
        _check_room(state, 1)
        h = self._embed(ids.reshape(B)).float().contiguous()  # (B, d) fp32: the step's residual stream
        self.step(state, h)
        state.length += 1
        state.next_position += 1
        return self.head(h.to(self.act_dtype)).float()

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) fp32 for every position of a fresh batch (log-likelihood scoring)."""
        state = self.new_state(ids.shape[0], ids.shape[1])
        return self.prefill(state, ids, attention_mask, all_logits=True)

    def generate(self, prompts: list[list[int]] | list[int], cfg: SamplingConfig | None = None,
                 **overrides: object) -> GenerationOutput:
        """`inference.generate` on this fast path (same arguments, same `GenerationOutput`)."""
        return run_generation(self, prompts, cfg, **overrides)

    # ------------------------------------------------------------------ the network
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed_q is not None:
            return self.embed_q.rows(ids).to(self.act_dtype)
        return self.embed[ids].to(self.act_dtype)

    def _forward(self, state: FastState, ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """ids (B, T) -> final-normed hidden (B, T, d); writes the tokens into `state`."""
        B, T = ids.shape
        P = state.length
        _check_room(state, T)
        if valid is not None:
            steps = (valid.long().cumsum(1) - 1).clamp(min=0)
            state.key_valid[:, P:P + T] = valid
            state.has_padding = state.has_padding or not bool(valid.all())
        else:
            steps = torch.arange(T).expand(B, T)
        positions = state.next_position[:, None] + steps  # (B, T)
        cos = self._cos[positions].to(self.act_dtype)[:, :, None]  # (B, T, 1, D)
        sin = self._sin[positions].to(self.act_dtype)[:, :, None]
        mask = self._attention_mask(state, T) if T > 1 or state.has_padding else None
        valid_f = valid[:, :, None].to(self.act_dtype) if valid is not None else None

        h = self._embed(ids)  # (B, T, d)
        for i, layer in enumerate(self.layers):
            x = self._norm(h, layer.operator_norm, self.eps)
            if layer.is_attention:
                h = h + self._attention(layer, x, state.keys[i], state.values[i], P, cos, sin, mask)
            else:
                h = h + self._conv(layer, x, state.conv[i], valid_f)
            x = self._norm(h, layer.ffn_norm, self.eps)
            h = h + (self._moe(layer, x) if layer.moe else self._ffn(layer, x))
        state.length = P + T
        state.next_position += valid.sum(1) if valid is not None else T
        return self._norm(h, self.final_norm, self.eps)

    def _attention_mask(self, state: FastState, T: int) -> torch.Tensor | None:
        """(B, 1, T, P+T) bool, True = may attend; None when plain causal (SDPA's is_causal) is exact."""
        P = state.length
        if P == 0 and not state.has_padding:
            return None
        q_pos = torch.arange(P, P + T)
        k_pos = torch.arange(P + T)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None] & state.key_valid[:, None, : P + T]  # (B, T, P+T)
        allowed |= (k_pos[None, :] == q_pos[:, None])[None]  # a padded query sees itself: no empty softmax row
        return allowed[:, None]

    def _attention(self, layer: _Layer, x: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, P: int,
                   cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, G, D = layer.n_heads, layer.n_kv, layer.head_dim
        q, k, v = layer.qkv(x).split([H * D, G * D, G * D], dim=-1)
        q = _rotate(self._norm(q.view(B, T, H, D), layer.q_norm, self.eps), cos, sin)  # (B, T, H, D)
        k = _rotate(self._norm(k.view(B, T, G, D), layer.k_norm, self.eps), cos, sin)  # (B, T, G, D)
        kc[:, :, P:P + T] = k.transpose(1, 2)
        vc[:, :, P:P + T] = v.view(B, T, G, D).transpose(1, 2)
        keys, values = kc[:, :, : P + T], vc[:, :, : P + T]  # (B, G, S, D)
        if T == 1 and self.use_native and kc.is_contiguous() and vc.is_contiguous():
            allowed = mask.view(B, P + 1) if mask is not None else None
            out = native.decode_attention(q.view(B, H, D), kc, vc, P + 1, layer.scale, allowed)
            out = out.to(self.act_dtype).view(B, 1, H * D)
        elif T == 1:
            # GQA decode as two batched products over KV heads: q rows of one group share a K/V head.
            qg = q.view(B, G, H // G, D)  # head h uses kv head h // (H/G), as repeat_interleave does
            keys, values = keys.to(qg.dtype), values.to(qg.dtype)
            scores = torch.matmul(qg, keys.transpose(-1, -2)) * layer.scale  # (B, G, H/G, S)
            if mask is not None:
                scores = scores.masked_fill(~mask.view(B, 1, 1, P + 1), float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
            out = torch.matmul(probs, values).reshape(B, 1, H * D)  # (B, 1, H*D)
        else:
            qt = q.transpose(1, 2)
            if self.act_dtype != torch.float32 or keys.dtype != torch.float32:  # 16-bit attention is slow on CPUs
                qt, keys, values = qt.float(), keys.float(), values.float()
            out = F.scaled_dot_product_attention(qt, keys, values, attn_mask=mask, is_causal=mask is None,
                                                 scale=layer.scale, enable_gqa=H != G)
            out = out.to(self.act_dtype).transpose(1, 2).reshape(B, T, H * D)
        return layer.out_proj(out)

    def _conv(self, layer: _Layer, x: torch.Tensor, state: torch.Tensor, valid: torch.Tensor | None
              ) -> torch.Tensor:
        T = x.shape[1]
        k = self.kernel
        if T == 1 and valid is None and self.native_small_ops and state.is_contiguous():  # decode: one call
            bcx = layer.in_proj(x)  # (B, 1, 3d)
            out = native.conv_step(bcx.view(bcx.shape[0], -1).float(), state, layer.conv_w)
            return layer.out_proj(out.to(x.dtype)[:, None])
        b, c, xx = layer.in_proj(x).chunk(3, dim=-1)  # each (B, T, d)
        y = b * xx
        if valid is not None:
            y = y * valid  # padding contributes nothing, now or as history
        full = torch.cat([state, y.to(state.dtype)], dim=1)  # (B, k-1+T, d): history then this chunk
        w = layer.conv_w  # (k, d) fp32
        if T == 1:
            z = (full.float() * w).sum(1, keepdim=True)  # (B, 1, d), fp32 accumulation
        else:
            ff = full.float()
            z = ff[:, k - 1:] * w[k - 1]
            for lag in range(1, k):
                z = z + ff[:, k - 1 - lag: k - 1 - lag + T] * w[k - 1 - lag]
        state.copy_(full[:, -(k - 1):])
        return layer.out_proj(c * z.to(x.dtype))

    def _ffn(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        a, g = layer.w13(x).split(layer.ff_dim, dim=-1)
        return layer.w2(F.silu(a) * g)

    def _moe(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        scores = torch.sigmoid(F.linear(flat, layer.gate))  # (N, E)
        if layer.expert_bias is not None:
            chosen = torch.topk(scores + layer.expert_bias, layer.top_k, dim=-1).indices
            weights = scores.gather(-1, chosen)
        else:
            weights, chosen = torch.topk(scores, layer.top_k, dim=-1)
        if layer.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-6)
        weights = weights * layer.routed_scale
        N, k = chosen.shape
        flat_expert = chosen.flatten()
        order = flat_expert.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat_expert, minlength=layer.e_w1.shape[0]).tolist()
        out = torch.zeros_like(flat)
        flat_w = weights.flatten()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows, tokens = order[start:start + n], token_of[start:start + n]
            xe = flat[tokens]
            ye = F.linear(F.silu(F.linear(xe, layer.e_w1[e])) * F.linear(xe, layer.e_w3[e]), layer.e_w2[e])
            out.index_add_(0, tokens, ye * flat_w[rows, None].to(ye.dtype))
            start += n
        return out.view(B, T, d)
