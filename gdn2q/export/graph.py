"""The exported graph: tokens [B, T] and the past state in, logits [B, T, vocab] and the present state out.

It follows GDN2_SPEC.md 1.3-1.4 and 3. Inputs: ``input_ids`` [B, T] int64, ``position_ids`` [B, T] int64
(only for models with attention layers: RoPE angle and the window mask), and per layer the past state. Per
GDN-2 layer: ``recurrent_state`` [B, HV, K, V] (fp32, or int8 codes plus ``recurrent_state_scale``
[B, HV, K] fp32: value = code * scale, one scale per (head, key row) as in gdn2q/quant/state.py, dequantized on
entry and re-quantized with nearest rounding on exit), ``conv_state`` [B, 2*key_dim + value_dim, W] (the q, k,
v conv windows of the PyTorch state concatenated along channels, oldest token first). Per attention layer:
``key`` / ``value`` [B, kv_heads, window, head_dim] after RoPE; slot j holds the token at position
p - window + j (p = the row's first new position), and slots before position 0 are masked out, so a fresh
sequence starts from zeros at position 0.

Two forms of the recurrence: ``prefill="graph"`` (the default: T dynamic, the per-token update inside an ONNX
Scan, every dense op on all T tokens at once; decode calls it with T = 1) and ``prefill="step"`` (T = 1, the
update written inline, no control-flow op: for runtimes without Scan; prompts go token by token). The state is
dequantized once before and quantized once after each call, as PyTorch's decode state does.
The q/k/v/b/w/f/g projections of a GDN-2 layer (and gate/up of the MLP, q/k/v of attention) read the same
input, so their weights are concatenated into one MatMul: fewer, larger ops for onnxruntime.
"""

from __future__ import annotations

import numpy as np
import torch

from gdn2q.config import GDN2Config
from gdn2q.errors import UnsupportedError
from gdn2q.export.builder import ELEM_TYPES, GraphBuilder, value_info
from gdn2q.export.spec import PREFILL_MODES, ExportSpec, StateTensor
from gdn2q.ops.naive import L2_EPS
from gdn2q.quant.state import QMAX, TINY, StateQuantConfig

MASKED = -1e30  # additive mask for key slots a query may not see (finite: no inf - inf NaN)


def _bitsandbytes_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """Dense weight of a bitsandbytes Linear8bitLt / Linear4bit, through bitsandbytes' own dequantizers."""
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    import bitsandbytes.functional as bnbf

    w = module.weight
    if getattr(w, "quant_state", None) is not None:
        return bnbf.dequantize_4bit(w.data, w.quant_state)
    if getattr(w, "SCB", None) is not None:
        return bnbf.int8_vectorwise_dequant(w.CB if w.CB is not None else w.data, w.SCB)
    return None


def dense_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every weight of the model as fp32 numpy: quantized weights (torchao tensor subclasses, bitsandbytes
    modules) are dequantized, so the graph computes the function the quantized PyTorch model computes."""
    out = {}
    for name, module in model.named_modules():
        w = _bitsandbytes_weight(module)
        if w is not None:
            out[f"{name}.weight"] = w.detach().float().cpu().numpy()
    for name, t in model.state_dict().items():
        if name in out:
            continue
        if type(t) is not torch.Tensor and hasattr(t, "dequantize"):
            try:
                t = t.dequantize()
            except Exception as e:  # tensor subclasses raise library-specific errors
                raise UnsupportedError(f"tensor {name} ({type(t).__name__}) cannot be dequantized for ONNX export "
                                       f"({e}); export the unquantized checkpoint with --weights int8|int4") from e
        if not t.is_floating_point():
            if name.endswith(".weight"):
                raise UnsupportedError(f"tensor {name} is stored as {t.dtype} by a quantized layer the exporter "
                                       "cannot dequantize; export the unquantized checkpoint with --weights int8|int4")
            continue
        out[name] = t.detach().float().cpu().numpy()
    return out


def onnx_state_format(fmt: StateQuantConfig) -> str:
    """Map a PyTorch state format to the ONNX one ("fp32" | "int8"), or name what the graph cannot express."""
    if fmt.conv != "fp32":
        raise UnsupportedError(f"conv-window state format {fmt.conv} cannot be expressed in the ONNX graph (its "
                               "conv_state is fp32); pass --state fp32 or --state int8 to export with fp32 windows")
    if fmt.dtype == "fp32":
        return "fp32"
    if fmt.dtype == "int8" and (fmt.granularity, fmt.rounding, fmt.scales) == ("row", "nearest", "dynamic"):
        return "int8"
    raise UnsupportedError(
        f"recurrent-state format {fmt.dtype}/{fmt.granularity}/{fmt.rounding}/{fmt.scales} cannot be expressed "
        "in the ONNX graph (it stores fp32, or int8 with per-row dynamic scales and nearest rounding); "
        "pass --state fp32 or --state int8")


def delta_rule_update(b: GraphBuilder, S: str, q: str, k: str, v: str, alpha: str, erase: str, write: str):
    """One token for every (batch, head), GDN2_SPEC.md 1.3 steps 3-7: q, k, alpha, erase [B, HV, K],
    v, write [B, HV, V] (q, k normalised), S [B, HV, K, V] -> (new S, o [B, HV, V])."""
    S = b.op("Mul", S, b.unsqueeze(alpha, -1))                                    # decay each key row
    r = b.op("MatMul", b.unsqueeze(b.op("Mul", erase, k), 2), S)                  # read along erase dir [B,HV,1,V]
    u = b.op("Sub", b.unsqueeze(b.op("Mul", write, v), 2), r)                     # gated write target - read
    S = b.op("Add", S, b.op("Mul", b.unsqueeze(k, -1), u))                        # rank-1 write along k
    o = b.op("Squeeze", b.op("MatMul", b.unsqueeze(q, 2), S), b.ints(2))          # read after the write
    return S, o


def scan_body(HV: int, K: int, V: int, row_scale: bool):
    """The Scan body: carried state S (and, for an int8 state, its pending row scales, see
    :meth:`ModelGraph._load_recurrent`) plus one token's q, k, v, alpha, erase, write -> S (, scales), o."""
    b = GraphBuilder(const_prefix="scan_const")
    b.scope = "scan"
    f32 = ELEM_TYPES["float32"]
    carried = [("S_in", ["batch", HV, K, V])] + ([("scale_in", ["batch", HV, K])] if row_scale else [])
    tokens = [(n, ["batch", HV, V if n in ("v_t", "write_t") else K])
              for n in ("q_t", "k_t", "v_t", "alpha_t", "erase_t", "write_t")]
    alpha = "alpha_t"
    if row_scale:  # the first token applies the pending scales with its decay; later tokens see ones
        alpha = b.op("Mul", alpha, "scale_in")
        b.output(b.op("Expand", b.const(1.0), b.op("Shape", "scale_in")), "scale_out")
    S, o = delta_rule_update(b, "S_in", "q_t", "k_t", "v_t", alpha, "erase_t", "write_t")
    b.output(S, "S_out")
    b.output(o, "o_t")
    outputs = [("S_out", ["batch", HV, K, V])] + ([("scale_out", ["batch", HV, K])] if row_scale else [])
    outputs.append(("o_t", ["batch", HV, V]))
    return b.graph([value_info(n, f32, d) for n, d in carried + tokens],
                   [value_info(n, f32, d) for n, d in outputs], "delta_rule_token")


class ModelGraph:
    """Builds the ONNX model of one GDN2ForCausalLM (``prefill`` "graph": T dynamic, recurrence in a Scan;
    "step": T = 1, recurrence inline, no control-flow op, for runtimes without Scan)."""

    def __init__(self, config: GDN2Config, weights: dict[str, np.ndarray], state: str = "fp32",
                 prefill: str = "graph"):
        if state not in ("fp32", "int8"):
            raise UnsupportedError(f"--state {state}: the ONNX graph stores the recurrent state as fp32 or int8")
        if prefill not in PREFILL_MODES:
            raise UnsupportedError(f"--prefill {prefill}: choose one of {', '.join(PREFILL_MODES)}")
        self.c = config
        self.w = weights
        self.state = state
        self.prefill = prefill
        self.b = GraphBuilder()
        self.inputs: list = []
        self.outputs: list = []
        self.state_tensors: list[StateTensor] = []
        self._rope_cache: dict[float, tuple[str, str]] = {}
        self._masks: dict[int | None, str] = {}

    # ---- helpers ----
    def _get(self, key: str) -> np.ndarray:
        if key not in self.w:
            raise UnsupportedError(f"tensor {key} is missing from the model; the ONNX export needs the fla layout")
        return self.w[key]

    def _state(self, layer: int, name: str, dtype: str, shape: list, out_shape: list | None = None) -> str:
        t = StateTensor(layer, name, dtype, shape)
        self.state_tensors.append(t)
        self.inputs.append(value_info(t.input_name, ELEM_TYPES[dtype], shape))
        self.outputs.append(value_info(t.output_name, ELEM_TYPES[dtype], out_shape or shape))
        return t.input_name

    def _fused_linear(self, x: str, prefix: str, keys: list[str], hint: str) -> list[str]:
        mats = [self._get(f"{prefix}.{k}.weight") for k in keys]
        y = self.b.linear(x, f"{prefix}.{hint}.weight", np.concatenate(mats, axis=0), hint)
        return self.b.split(y, [m.shape[0] for m in mats]) if len(mats) > 1 else [y]

    # ---- graph ----
    def build(self):
        c, b = self.c, self.b
        T: int | str = 1 if self.prefill == "step" else "seq"
        self.inputs.append(value_info("input_ids", ELEM_TYPES["int64"], ["batch", T]))
        if c.attn is not None:
            self.inputs.append(value_info("position_ids", ELEM_TYPES["int64"], ["batch", T]))
        b.scope = "model/embeddings"
        emb = b.weight("model.embeddings.weight", self._get("model.embeddings.weight"))
        x = b.op("Gather", emb, "input_ids", axis=0)                                   # [B, T, d]
        for i in range(c.num_hidden_layers):
            b.scope = f"model/layers.{i}"
            p = f"model.layers.{i}"
            h = b.rms_norm(x, self._get(f"{p}.attn_norm.weight"), c.norm_eps, f"{p}.attn_norm.weight")
            mix = self._attention(h, i) if c.is_attention_layer(i) else self._gdn2(h, i)
            x = b.op("Add", x, mix)
            h = b.rms_norm(x, self._get(f"{p}.mlp_norm.weight"), c.norm_eps, f"{p}.mlp_norm.weight")
            gate, up = self._fused_linear(h, f"{p}.mlp", ["gate_proj", "up_proj"], "gate_up_proj")
            x = b.op("Add", x, b.linear(b.op("Mul", b.silu(gate), up), f"{p}.mlp.down_proj.weight",
                                        self._get(f"{p}.mlp.down_proj.weight"), "mlp/down_proj"))
        b.scope = "model/norm"
        x = b.rms_norm(x, self._get("model.norm.weight"), c.norm_eps, "model.norm.weight")
        b.scope = "lm_head"
        b.output(b.linear(x, "lm_head.weight", self._get("lm_head.weight"), "lm_head"), "logits")
        outputs = [value_info("logits", ELEM_TYPES["float32"], ["batch", T, c.vocab_size])] + self.outputs
        name = "gdn2_decode_step" if self.prefill == "step" else "gdn2_tokens"
        model = b.model(self.inputs, outputs, name, doc=f"GDN-2 {name} exported by gdn2q (see gdn2q_onnx.json)")
        spec = ExportSpec(weights="fp32", state=self.state, vocab_size=c.vocab_size, num_layers=c.num_hidden_layers,
                          layer_types=["attention" if c.is_attention_layer(i) else "gdn2"
                                       for i in range(c.num_hidden_layers)],
                          state_tensors=self.state_tensors, uses_position_ids=c.attn is not None,
                          eos_token_id=c.eos_token_id, bos_token_id=c.bos_token_id, prefill=self.prefill)
        return model, spec

    def _gdn2(self, h: str, i: int) -> str:
        c, b = self.c, self.b
        p = f"model.layers.{i}.attn"
        H, K, HV, V = c.num_heads, c.head_dim, c.value_heads, c.head_v_dim
        kd, vd = c.key_dim, c.value_dim
        qkv, b_pre, w_pre, f_down, z_down = self._in_proj(h, p)                      # [B, T, *]
        if c.use_short_conv:
            qkv = self._short_conv(qkv, i, p, 2 * kd + vd)
        qkv = b.silu(qkv)
        q, k, v = b.split(qkv, [kd, kd, vd])
        q, k, v = b.reshape(q, 0, 0, H, K), b.reshape(k, 0, 0, H, K), b.reshape(v, 0, 0, HV, V)
        # gates: g = -exp(A_log)[head] * softplus(f + dt_bias) (log decay), b erase, w write
        f = b.linear(f_down, f"{p}.f_proj.1.weight", self._get(f"{p}.f_proj.1.weight"), "f_proj.1")
        f = b.op("Softplus", b.op("Add", f, b.weight(f"{p}.dt_bias", self._get(f"{p}.dt_bias"))))
        neg_a = -np.exp(self._get(f"{p}.A_log").astype(np.float32))[:, None]
        alpha = b.op("Exp", b.op("Mul", b.reshape(f, 0, 0, H, K), b.weight(f"{p}.neg_A", neg_a)))
        erase = b.reshape(b.op("Sigmoid", b_pre), 0, 0, H, K)
        if c.allow_neg_eigval:
            erase = b.op("Mul", erase, b.const(2.0))
        write = b.reshape(b.op("Sigmoid", w_pre), 0, 0, HV, V)
        G = HV // H
        if G > 1:  # grouped value attention: value head j reads q/k head j // G
            q, k, alpha, erase = (b.reshape(b.op("Expand", b.unsqueeze(t, 3), b.ints(1, 1, 1, G, 1)), 0, 0, HV, K)
                                  for t in (q, k, alpha, erase))
        q = b.op("Mul", self._l2norm(q), b.const(K ** -0.5))
        k = self._l2norm(k)
        S0, row_scale = self._load_recurrent(i, HV, K, V)
        if self.prefill == "step":
            q, k, v, alpha, erase, write = (b.reshape(t, 0, HV, -1) for t in (q, k, v, alpha, erase, write))
            if row_scale:
                alpha = b.op("Mul", alpha, row_scale)
            S, o = delta_rule_update(b, S0, q, k, v, alpha, erase, write)
            o = b.unsqueeze(o, 1)                                                          # [B, 1, HV, V]
        else:
            carried = [S0] + ([row_scale] if row_scale else [])
            outs = b.op("Scan", *carried, q, k, v, alpha, erase, write, n_out=len(carried) + 1,
                        body=scan_body(HV, K, V, bool(row_scale)), num_scan_inputs=6, scan_input_axes=[1] * 6,
                        scan_output_axes=[1])
            S, o = outs[0], outs[-1]
        self._store_recurrent(i, S)
        z = b.op("Add", b.linear(z_down, f"{p}.g_proj.1.weight", self._get(f"{p}.g_proj.1.weight"), "g_proj.1"),
                 b.weight(f"{p}.g_proj.1.bias", self._get(f"{p}.g_proj.1.bias")))
        n = b.rms_norm(o, self._get(f"{p}.o_norm.weight"), c.norm_eps, f"{p}.o_norm.weight")
        z = b.reshape(z, 0, 0, HV, V)
        gate = b.op("Sigmoid", z) if c.output_gate_activation == "sigmoid" else b.silu(z)
        o = b.reshape(b.op("Mul", n, gate), 0, 0, vd)
        return b.linear(o, f"{p}.o_proj.weight", self._get(f"{p}.o_proj.weight"), "attn/o_proj")

    def _short_conv(self, qkv: str, i: int, p: str, C: int) -> str:
        """Depthwise causal conv over (conv_state window, oldest first) + the T new raw projections [B, T, C].

        Written as a sum of W shifted slices times one tap each: onnxruntime's grouped Conv runs one tiny GEMM per
        channel, several times slower at decode sizes.
        """
        b, W = self.b, self.c.conv_size
        conv_in = self._state(i, "conv_state", "float32", ["batch", C, W])
        full = b.op("Concat", b.transpose(conv_in, 0, 2, 1), qkv, axis=1)                 # [B, W + T, C]
        b.output(b.transpose(b.slice(full, -W, None, 1), 0, 2, 1), f"present.{i}.conv_state")
        taps = np.concatenate([self._get(f"{p}.{n}_conv1d.weight")[:, 0, :] for n in "qkv"], axis=0)  # [C, W]
        y = None
        for j in range(W):  # tap j multiplies the token W-1-j steps before each output token
            shifted = b.slice(full, 1 + j, None if j == W - 1 else j + 1 - W, 1)             # [B, T, C]
            term = b.op("Mul", shifted, b.weight(f"{p}.qkv_conv1d.tap{j}", np.ascontiguousarray(taps[:, j])))
            y = term if y is None else b.op("Add", y, term)
        if self.c.conv_bias:
            y = b.op("Add", y, b.weight(f"{p}.qkv_conv1d.bias",
                                        np.concatenate([self._get(f"{p}.{n}_conv1d.bias") for n in "qkv"])))
        return y

    def _in_proj(self, h: str, p: str) -> list[str]:
        """One MatMul for the seven input projections: raw q|k|v (adjacent rows), b, w, f_down, z_down."""
        keys = ["q_proj", "k_proj", "v_proj", "b_proj", "w_proj", "f_proj.0", "g_proj.0"]
        mats = [self._get(f"{p}.{k}.weight") for k in keys]
        y = self.b.linear(h, f"{p}.in_proj.weight", np.concatenate(mats, axis=0), "in_proj")
        sizes = [sum(m.shape[0] for m in mats[:3])] + [m.shape[0] for m in mats[3:]]
        return self.b.split(y, sizes)

    def _l2norm(self, x: str) -> str:
        b = self.b
        ss = b.op("ReduceSum", b.op("Mul", x, x), b.ints(-1), keepdims=1)
        return b.op("Div", x, b.op("Sqrt", b.op("Add", ss, b.const(L2_EPS))))

    def _load_recurrent(self, i: int, HV: int, K: int, V: int) -> tuple[str, str | None]:
        """The past state, and for an int8 state its per-row scales still to apply.

        An int8 state is dequantized by the first token's decay: both multiply each key row by one number, so
        S = codes * (scale * alpha) costs one pass over the state instead of two (DESIGN.md's hint).
        """
        if self.state == "fp32":
            return self._state(i, "recurrent_state", "float32", ["batch", HV, K, V]), None
        codes = self._state(i, "recurrent_state", "int8", ["batch", HV, K, V])
        scale = self._state(i, "recurrent_state_scale", "float32", ["batch", HV, K])
        return self.b.op("Cast", codes, to=ELEM_TYPES["float32"]), scale

    def _store_recurrent(self, i: int, S: str) -> None:
        """fp32: pass through. int8: per-row absmax scale, nearest rounding (gdn2q/quant/state.py).

        QuantizeLinear rounds half to even like torch.round; it saturates at -128, but with scale = absmax / 127
        no value reaches beyond +-127, so the codes equal gdn2q's clamp(round(S / scale), -127, 127).
        """
        b = self.b
        if self.state == "fp32":
            b.output(S, f"present.{i}.recurrent_state")
            return
        amax = b.op("ReduceMax", b.op("Abs", S), b.ints(-1), keepdims=1)                     # [B, HV, K, 1]
        scale = b.op("Div", b.op("Max", amax, b.const(TINY)), b.const(QMAX["int8"]))
        codes = b.op("QuantizeLinear", S, scale, axis=3, block_size=self.c.head_v_dim,
                     output_dtype=ELEM_TYPES["int8"])
        b.output(codes, f"present.{i}.recurrent_state")
        b.output(b.op("Squeeze", scale, b.ints(-1)), f"present.{i}.recurrent_state_scale")

    def _rope_tables(self, D: int, theta: float) -> tuple[str, str]:
        """cos/sin [B, T, 1, D] at each token's position (rotate-half layout, fp32; gdn2q/model/attention.py)."""
        if theta not in self._rope_cache:
            b = self.b
            inv_freq = (1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))).numpy()
            pos = b.unsqueeze(b.op("Cast", "position_ids", to=ELEM_TYPES["float32"]), -1)   # [B, T, 1]
            ang = b.op("Mul", pos, b.const(inv_freq))                                       # [B, T, D/2]
            ang = b.unsqueeze(b.op("Concat", ang, ang, axis=-1), 2)                         # [B, T, 1, D]
            self._rope_cache[theta] = (b.op("Cos", ang), b.op("Sin", ang))
        return self._rope_cache[theta]

    def _rope(self, x: str, D: int, theta: float) -> str:
        b = self.b
        cos, sin = self._rope_tables(D, theta)
        x1, x2 = b.split(x, [D // 2, D // 2])
        rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
        return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))

    def _mask(self, window: int | None, past_key: str) -> str:
        """Additive mask [B, 1, 1, T, L + T] over (L past slots, T new tokens) for each new token.

        Past slot j holds position p0 - L + j (p0: the row's first new position); a query at position t sees
        key position s iff 0 <= s <= t and s > t - window.
        """
        if window not in self._masks:
            b = self.b
            qpos = "position_ids"                                                           # [B, T]
            L = b.op("Gather", b.op("Shape", past_key), b.const(2, np.int64), axis=0)     # scalar
            slots = b.op("Range", b.const(0, np.int64), L, b.const(1, np.int64))           # [L]
            p0 = b.slice(qpos, 0, 1, 1)                                                      # [B, 1]
            kpos = b.op("Concat", b.op("Add", b.op("Sub", p0, L), slots), qpos, axis=1)    # [B, L + T]
            kpos, q3 = b.unsqueeze(kpos, 1), b.unsqueeze(qpos, 2)                          # [B,1,L+T], [B,T,1]
            valid = b.op("And", b.op("GreaterOrEqual", kpos, b.const(0, np.int64)),
                         b.op("LessOrEqual", kpos, q3))
            if window is not None:
                valid = b.op("And", valid, b.op("Greater", kpos, b.op("Sub", q3, b.const(window, np.int64))))
            mask = b.op("Where", valid, b.const(0.0), b.const(MASKED))                     # [B, T, L + T]
            self._masks[window] = b.unsqueeze(mask, 1, 2)
        return self._masks[window]

    def _attention(self, h: str, i: int) -> str:
        c, b = self.c, self.b
        a = c.attn
        p = f"model.layers.{i}.attn"
        nh, kvh, D = a.num_heads, a.kv_heads, c.hidden_size // a.num_heads
        q, k, v = self._fused_linear(h, p, ["q_proj", "k_proj", "v_proj"], "qkv_proj")
        if a.qkv_bias:
            q, k, v = (b.op("Add", t, b.weight(f"{p}.{n}_proj.bias", self._get(f"{p}.{n}_proj.bias")))
                       for t, n in zip((q, k, v), "qkv", strict=True))
        q = b.transpose(self._rope(b.reshape(q, 0, 0, nh, D), D, a.rope_theta), 0, 2, 1, 3)    # [B, nh, T, D]
        k = b.transpose(self._rope(b.reshape(k, 0, 0, kvh, D), D, a.rope_theta), 0, 2, 1, 3)   # [B, kvh, T, D]
        v = b.transpose(b.reshape(v, 0, 0, kvh, D), 0, 2, 1, 3)
        win = a.window_size
        grows = "past_len + 1" if self.prefill == "step" else "past_len + seq"
        shape = ["batch", kvh, win or "past_len", D]
        out_shape = shape if win else ["batch", kvh, grows, D]
        past_k = self._state(i, "key", "float32", shape, out_shape)
        past_v = self._state(i, "value", "float32", shape, out_shape)
        keys = b.op("Concat", past_k, k, axis=2)                                            # [B, kvh, L + T, D]
        values = b.op("Concat", past_v, v, axis=2)
        b.output(b.slice(keys, -win, None, 2) if win else keys, f"present.{i}.key")
        b.output(b.slice(values, -win, None, 2) if win else values, f"present.{i}.value")
        qg = b.reshape(q, 0, kvh, nh // kvh, -1, D)                                         # [B, kvh, rep, T, D]
        scores = b.op("MatMul", qg, b.unsqueeze(b.transpose(keys, 0, 1, 3, 2), 2))          # [B,kvh,rep,T,L+T]
        scores = b.op("Add", b.op("Mul", scores, b.const(D ** -0.5)), self._mask(win, past_k))
        o = b.op("MatMul", b.op("Softmax", scores, axis=-1), b.unsqueeze(values, 2))        # [B,kvh,rep,T,D]
        o = b.reshape(b.transpose(b.reshape(o, 0, nh, -1, D), 0, 2, 1, 3), 0, 0, nh * D)
        return b.linear(o, f"{p}.o_proj.weight", self._get(f"{p}.o_proj.weight"), "attn/o_proj")


def build_graph(model: torch.nn.Module, state: str = "fp32", prefill: str = "graph"):
    """(onnx.ModelProto, ExportSpec) of ``model`` with fp32 weights."""
    return ModelGraph(model.config, dense_weights(model), state, prefill).build()
