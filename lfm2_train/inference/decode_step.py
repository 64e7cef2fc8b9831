"""The fast path's whole decode step as one native call (`csrc/decode_step.c`).

Why: with the matrix-vector products in native kernels, what was left of a decode step driven from Python were
~40 small torch ops per layer (norms, rotary, cache writes, casts, residual adds) at several microseconds each:
5-7 ms of a 15-30 ms LFM2-350M step. `DecodeStep` describes the model once to the C side (ctypes structures
pointing at the fast path's own weight tensors, no copy) and each token is then one call that runs every
layer and the final norm; embedding and LM head stay in Python (one op each).

Numbers: the residual stream and activations stay fp32 inside the step (the layer-by-layer path rounds them
to the activation dtype between ops, so bf16 decode through the step is closer to the fp32 model, not
further); each projection rounds or quantizes its input exactly as its kernel does on the layer-by-layer path.

Used when every dense projection has a native kernel (fp32, bf16, int8, w8a8, q4_0 weights), the model has no
MoE layer and the batch has at most `GEMM_MIN_ROWS` rows; otherwise the fast path runs layer by layer.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from . import native

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p

# csrc/decode_step.c: LFM2_LIN_* and LFM2_KV_*
LIN_F32, LIN_BF16, LIN_BF16_DP, LIN_I8, LIN_W8A8, LIN_Q4_0 = range(6)
KV_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class CLinear(ctypes.Structure):
    _fields_ = [("kind", _I64), ("isa", _I64), ("N", _I64), ("K", _I64), ("w", _PTR), ("scale", _PTR),
                ("wsum", _PTR), ("q4scales", _PTR)]


class CLayer(ctypes.Structure):
    _fields_ = [("attention", _I64), ("n_heads", _I64), ("n_kv", _I64), ("head_dim", _I64),
                ("scale", ctypes.c_double), ("operator_norm", _PTR), ("ffn_norm", _PTR), ("q_norm", _PTR),
                ("k_norm", _PTR), ("conv_taps", _PTR), ("mix_in", CLinear), ("mix_out", CLinear),
                ("w13", CLinear), ("w2", CLinear)]


class CModel(ctypes.Structure):
    _fields_ = [("n_layers", _I64), ("d", _I64), ("conv_k", _I64), ("kv_dtype", _I64),
                ("eps", ctypes.c_double), ("layers", ctypes.POINTER(CLayer)), ("final_norm", _PTR),
                ("rope_cos", _PTR), ("rope_sin", _PTR)]


_STEP_ERRORS = {-1: "allocating its scratch memory failed", -2: "a projection kind this build lacks"}


def describe_linear(lin: object) -> CLinear | None:
    """The C description of one fast-path projection (by its native kernel object), or None without one."""
    gemv = getattr(lin, "gemv", None)
    if isinstance(gemv, native.GemvW8A8):
        return CLinear(LIN_W8A8, gemv._isa_code, gemv.N, gemv.K, gemv.q.data_ptr(), gemv.scale.data_ptr(),
                       gemv.wsum.data_ptr(), None)
    if isinstance(gemv, native.GemvQ4):
        return CLinear(LIN_Q4_0, gemv._isa_code, gemv.N, gemv.K, gemv.packed.data_ptr(), None, None,
                       gemv.scales.data_ptr())
    if not isinstance(gemv, native.Gemv):
        return None
    dtype = gemv.weight.dtype
    if dtype == torch.int8:
        return CLinear(LIN_I8, 0, gemv.N, gemv.K, gemv.weight.data_ptr(), gemv.scale.data_ptr(), None, None)
    kind = LIN_F32 if dtype == torch.float32 else LIN_BF16_DP if gemv.isa == "avx512" else LIN_BF16
    return CLinear(kind, 0, gemv.N, gemv.K, gemv.weight.data_ptr(), None, None, None)


class DecodeStep:
    """Every layer of a `FastLFM2` for one new token per row, in one native call (see the module docstring).

    Build with `DecodeStep.build(fast)`, which returns None when the model cannot run this way. The
    structures point into `fast`'s tensors, which must outlive this object (the fast path owns both).
    """

    def __init__(self, fast: Any, layers: list[CLayer]) -> None:
        self.fast = fast
        self._layers = (CLayer * len(layers))(*layers)
        cfg = fast.config
        self._model = CModel(len(layers), cfg.hidden_size, fast.kernel, 0, fast.eps,
                             ctypes.cast(self._layers, ctypes.POINTER(CLayer)), fast.final_norm.data_ptr(), None,
                             None)
        self._fn = native.require().lfm2_decode_step

    @classmethod
    def build(cls, fast: Any) -> DecodeStep | None:
        if not fast.use_native or fast.final_norm.dtype != torch.float32:
            return None
        layers = []
        for layer in fast.layers:
            if layer.moe:
                return None
            w13, w2 = describe_linear(layer.w13), describe_linear(layer.w2)
            mix_out = describe_linear(layer.out_proj)
            mix_in = describe_linear(layer.qkv if layer.is_attention else layer.in_proj)
            if None in (w13, w2, mix_out, mix_in):
                return None
            c = CLayer(attention=int(layer.is_attention), operator_norm=layer.operator_norm.data_ptr(),
                       ffn_norm=layer.ffn_norm.data_ptr(), mix_in=mix_in, mix_out=mix_out, w13=w13, w2=w2)
            if layer.is_attention:
                c.n_heads, c.n_kv, c.head_dim, c.scale = layer.n_heads, layer.n_kv, layer.head_dim, layer.scale
                c.q_norm, c.k_norm = layer.q_norm.data_ptr(), layer.k_norm.data_ptr()
            else:
                c.conv_taps = layer.conv_w.data_ptr()
            layers.append(c)
        return cls(fast, layers)

    def __call__(self, state: Any, h: torch.Tensor) -> torch.Tensor:
        """h (B, d) fp32 contiguous embeddings of one new token per row -> final-normed hidden (B, d), in place.

        Writes the tokens into `state` (KV caches, conv windows) but leaves its counters to the caller.
        """
        fast = self.fast
        n = len(fast.layers)
        keys = (_PTR * n)(*[state.keys[i].data_ptr() if i in state.keys else None for i in range(n)])
        values = (_PTR * n)(*[state.values[i].data_ptr() if i in state.values else None for i in range(n)])
        conv = (_PTR * n)(*[state.conv[i].data_ptr() if i in state.conv else None for i in range(n)])
        for t in (*state.keys.values(), *state.values.values(), *state.conv.values()):
            if not t.is_contiguous():  # a reordered state is contiguous again (index_select); checked anyway
                raise ValueError("DecodeStep needs contiguous KV caches and conv windows")
        kv = next(iter(state.keys.values()), None)
        m = self._model
        m.kv_dtype = KV_DTYPES[kv.dtype] if kv is not None else 0
        m.rope_cos, m.rope_sin = fast._cos.data_ptr(), fast._sin.data_ptr()
        positions = state.next_position.contiguous()
        if int(positions.max()) >= fast._cos.shape[0]:
            raise ValueError(f"RoPE table holds {fast._cos.shape[0]} positions; a row is at {int(positions.max())}")
        valid = state.key_valid if state.has_padding else None
        rc = self._fn(ctypes.byref(m), h.data_ptr(), h.shape[0], keys, values, conv, state.max_length,
                      state.length, positions.data_ptr(), valid.data_ptr() if valid is not None else None)
        if rc:
            raise RuntimeError(f"native decode step failed: {_STEP_ERRORS.get(rc, rc)}")
        return h

