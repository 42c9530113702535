#!/usr/bin/python3
"""DeepSeek-V3 training in plain PyTorch: the peer that bench/bench_train.sh runs beside
`dsv3 train`. The same model and objective as src/model/training.cpp, written from the paper
and the C++ (not from dsv3 code paths): MLA (naive form, interleaved RoPE), DeepSeekMoE with
sigmoid, group-limited routing and the aux-loss-free bias, an MTP module (depth 1), the
sequence-wise balance loss, AdamW with dsv3's schedule, clipping, the bias update.
float32 on the CPU; reads dsv3's token shards (docs/formats.md). Uses torch and numpy only.

  torch_deepseek_v3.py --config configs/bench-20m.json --data SHARDS --steps 30 --batch 8 --seq 256 --threads 2

Prints one line per step, then the tokens/s over the steps after --warmup-steps and the
first and last next-token losses as `result:` lines for the benchmark to read.
"""
import argparse
import ctypes
import glob
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------
# Data: dsv3 token shards, windows of S+1 tokens, shuffled as dsv3's BatchSampler does.

def read_shard(path):
    """uint32 ids of one shard: 'DSV3TOKS', u32 version, u32 header bytes, u32 vocab,
    u32 reserved, u64 n_tokens, then the ids."""
    with open(path, "rb") as f:
        header = f.read(32)
    if header[:8] != b"DSV3TOKS":
        raise ValueError(f"{path}: not a dsv3 token shard")
    version, header_bytes, vocab, _ = np.frombuffer(header[8:24], dtype="<u4")
    (n_tokens,) = np.frombuffer(header[24:32], dtype="<u8")
    ids = np.fromfile(path, dtype="<u4", offset=int(header_bytes), count=int(n_tokens))
    return ids, int(vocab)


class Mt19937_64:
    """std::mt19937_64, so that the windows come in dsv3's order."""
    N, M, MASK = 312, 156, (1 << 64) - 1

    def __init__(self, seed):
        self.mt = [seed & self.MASK]
        for i in range(1, self.N):
            prev = self.mt[-1]
            self.mt.append((6364136223846793005 * (prev ^ (prev >> 62)) + i) & self.MASK)
        self.index = self.N

    def __call__(self):
        if self.index >= self.N:
            mt = self.mt
            for i in range(self.N):
                x = (mt[i] & 0xFFFFFFFF80000000) | (mt[(i + 1) % self.N] & 0x7FFFFFFF)
                mt[i] = mt[(i + self.M) % self.N] ^ (x >> 1) ^ (0xB5026F5AA96619E9 if x & 1 else 0)
            self.index = 0
        y = self.mt[self.index]
        self.index += 1
        y ^= (y >> 29) & 0x5555555555555555
        y ^= (y << 17) & 0x71D67FFFEDA60000
        y ^= (y << 37) & 0xFFF7EEE000000000
        y ^= y >> 43
        return y & self.MASK


class BatchSampler:
    """Windows of seq+1 tokens laid end to end in each shard (overlapping by one token),
    visited in a Fisher-Yates order seeded with seed * 1000003 + epoch."""

    def __init__(self, streams, seq, seed):
        self.streams, self.seq, self.seed = streams, seq, seed
        self.first = []
        self.windows = 0
        for s in streams:
            self.first.append(self.windows)
            self.windows += (len(s) - 1) // seq if len(s) > 0 else 0
        if self.windows <= 0:
            raise ValueError(f"not enough tokens for one sequence of {seq + 1}")
        self.epoch, self.index = 0, 0
        self.shuffle()

    def shuffle(self):
        rng = Mt19937_64((self.seed * 1000003 + self.epoch) & Mt19937_64.MASK)
        order = list(range(self.windows))
        for i in range(self.windows - 1, 0, -1):
            j = rng() % (i + 1)
            order[i], order[j] = order[j], order[i]
        self.order = order

    def window(self, w):
        s = max(i for i, f in enumerate(self.first) if f <= w)
        start = (w - self.first[s]) * self.seq
        return self.streams[s][start:start + self.seq + 1]

    def next_batch(self, batch):
        rows = []
        for _ in range(batch):
            rows.append(self.window(self.order[self.index]))
            self.index += 1
            if self.index == self.windows:
                self.index, self.epoch = 0, self.epoch + 1
                self.shuffle()
        w = torch.from_numpy(np.stack(rows).astype(np.int64))
        return w[:, :-1], w[:, 1:]  # inputs, targets: [B, S]


# ---------------------------------------------------------------------------------------
# The model (Hugging Face tensor names).

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(c, seq):
    """cos, sin [seq, rope_dim/2]: angle = float32(pos) * float32(theta^(-2i/rope_dim))."""
    R = c["qk_rope_head_dim"]
    inv_freq = torch.tensor([1.0 / c["rope_theta"] ** (float(np.float32(2 * i) / np.float32(R))) for i in range(R // 2)],
                            dtype=torch.float32)
    angle = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cos(angle.double()).float(), torch.sin(angle.double()).float()


def apply_rope(x, cos, sin):
    """Rotates interleaved pairs (x[2i], x[2i+1]) as DeepSeek's inference/model.py does.
    x [B, S, heads, R]; cos, sin [S, R/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class MLA(nn.Module):
    """Multi-head latent attention (§2.1.1), naive form: per-head keys and values are
    re-expanded from the compressed latent c_kv."""

    def __init__(self, c):
        super().__init__()
        dim, H = c["hidden_size"], c["num_attention_heads"]
        self.H, self.D, self.R, self.V = H, c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.C, Lq = c["kv_lora_rank"], c["q_lora_rank"]
        self.scale = 1.0 / math.sqrt(self.D + self.R)  # no YaRN: rope_scaling is null
        self.q_a_proj = nn.Linear(dim, Lq, bias=False)                    # W_DQ
        self.q_a_layernorm = RMSNorm(Lq, c["rms_norm_eps"])
        self.q_b_proj = nn.Linear(Lq, H * (self.D + self.R), bias=False)  # [W_UQ; W_QR]
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.C + self.R, bias=False)  # [W_DKV; W_KR]
        self.kv_a_layernorm = RMSNorm(self.C, c["rms_norm_eps"])
        self.kv_b_proj = nn.Linear(self.C, H * (self.D + self.V), bias=False)  # [W_UK; W_UV]
        self.o_proj = nn.Linear(H * self.V, dim, bias=False)               # W_O

    def forward(self, x, cos, sin, causal_mask):
        B, S, _ = x.shape
        H, D, R, V = self.H, self.D, self.R, self.V
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, S, H, D + R)
        q_nope, q_pe = q.split([D, R], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.C, R], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.view(B, S, 1, R), cos, sin)  # one RoPE key shared by the heads
        k_nope, v = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, S, H, D + V).split([D, V], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)                       # [B, H, S, D+R]
        k = torch.cat([k_nope, k_pe.expand(B, S, H, R)], dim=-1).transpose(1, 2)  # [B, H, S, D+R]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        p = torch.softmax(scores.masked_fill(causal_mask, float("-inf")), dim=-1)
        o = torch.matmul(p, v.transpose(1, 2))                                      # [B, H, S, V]
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * V))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate x) * up x)."""

    def __init__(self, dim, inter):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """DeepSeekMoE (§2.1.2): shared experts for every token plus top-k routed experts chosen
    on sigmoid affinities + the correction bias, within the top groups."""

    def __init__(self, c):
        super().__init__()
        dim = c["hidden_size"]
        self.E, self.k = c["n_routed_experts"], c["num_experts_per_tok"]
        self.n_group, self.topk_group = c["n_group"], c["topk_group"]
        self.scaling = c["routed_scaling_factor"]
        self.gate = nn.Linear(dim, self.E, bias=False)
        # b_i: only selects (aux-loss-free balancing); no gradient, updated by the sign rule.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.E))
        self.experts = nn.ModuleList(MLP(dim, c["moe_intermediate_size"]) for _ in range(self.E))
        self.shared_experts = MLP(dim, c["moe_intermediate_size"] * c["n_shared_experts"])

    def route(self, s):
        """s [N, E] sigmoid affinities -> chosen experts [N, k] and their gates [N, k]."""
        N = s.shape[0]
        choice = s.detach() + self.e_score_correction_bias
        # noaux_tc: a group's score is the sum of its top-2 biased scores; experts outside the
        # topk_group best groups are excluded (-inf, as the official code does).
        groups = choice.view(N, self.n_group, -1)
        group_scores = groups.topk(2, dim=-1).values.sum(-1)
        kept = group_scores.topk(self.topk_group, dim=-1).indices
        dropped = torch.ones(N, self.n_group, dtype=torch.bool).scatter_(1, kept, False)
        choice = groups.masked_fill(dropped[:, :, None], float("-inf")).view(N, self.E)
        experts = choice.topk(self.k, dim=-1).indices
        g = s.gather(1, experts)  # the bias selects; the gates use the raw affinities
        return experts, g / g.sum(-1, keepdim=True) * self.scaling

    def forward(self, x, seq_len, alpha):
        """x [N, dim] (N = B * seq_len) -> (out [N, dim], balance loss, tokens per expert)."""
        N, dim = x.shape
        s = torch.sigmoid(self.gate(x))
        experts, gates = self.route(s)
        out = self.shared_experts(x)
        # Tokens grouped per expert: each expert runs once on all of its tokens.
        slots = experts.reshape(-1)
        order = slots.argsort()
        counts = torch.bincount(slots, minlength=self.E)
        token = order // self.k
        xs = x[token]
        ys = [self.experts[e](chunk) for e, chunk in enumerate(xs.split(counts.tolist())) if chunk.shape[0] > 0]
        ys = torch.cat(ys) * gates.reshape(-1)[order, None]
        out = out.index_add(0, token, ys)
        # Complementary sequence-wise balance loss: alpha * sum_i f_i P_i per sequence,
        # f_i = E / (k S) * (tokens of the sequence sent to i), P_i = mean of s_i / sum(s).
        balance = x.new_zeros(())
        if alpha > 0:
            B = N // seq_len
            P = (s / s.sum(-1, keepdim=True)).view(B, seq_len, self.E).mean(1)
            chosen = F.one_hot(experts, self.E).sum(1).view(B, seq_len, self.E).sum(1).to(x.dtype)
            f = self.E / (self.k * seq_len) * chosen
            balance = alpha * (f * P).sum(-1).mean()
        return out, balance, counts


class Block(nn.Module):
    """h += MLA(input_layernorm(h)); h += FFN(post_attention_layernorm(h))."""

    def __init__(self, c, moe):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = MLA(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = MoE(c) if moe else MLP(c["hidden_size"], c["intermediate_size"])
        self.is_moe = moe

    def forward(self, h, cos, sin, causal_mask, alpha):
        B, S, dim = h.shape
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, causal_mask)
        x = self.post_attention_layernorm(h)
        if not self.is_moe:
            return h + self.mlp(x), x.new_zeros(()), None
        out, balance, counts = self.mlp(x.reshape(B * S, dim), S, alpha)
        return h + out.view(B, S, dim), balance, counts


class MTPModule(nn.Module):
    """Multi-token prediction at depth 1 (§2.2): h' = Block(eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]));
    the embedding and the output head are the main model's."""

    def __init__(self, c):
        super().__init__()
        dim = c["hidden_size"]
        self.enorm = RMSNorm(dim, c["rms_norm_eps"])
        self.hnorm = RMSNorm(dim, c["rms_norm_eps"])
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = Block(c, moe=True)
        self.shared_head_norm = RMSNorm(dim, c["rms_norm_eps"])


class DeepSeekV3(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        dim = c["hidden_size"]
        self.embed_tokens = nn.Embedding(c["vocab_size"], dim)
        self.layers = nn.ModuleList(Block(c, moe=l >= c["first_k_dense_replace"]) for l in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(dim, c["rms_norm_eps"])
        self.lm_head = nn.Linear(dim, c["vocab_size"], bias=False)
        self.mtp = nn.ModuleList(MTPModule(c) for _ in range(c["num_nextn_predict_layers"]))

    def forward(self, tokens, targets, mtp_weight, alpha):
        """DeepSeek-V3's loss: next-token CE + mtp_weight * MTP CE + balance losses.
        Returns (total, main CE, MTP CE, tokens per expert of each main-model MoE layer)."""
        B, S = tokens.shape
        cos, sin = rope_tables(self.c, S)
        causal_mask = torch.ones(S, S, dtype=torch.bool).triu(1)
        h = self.embed_tokens(tokens)
        balance, loads = h.new_zeros(()), []
        for layer in self.layers:
            h, b, counts = layer(h, cos, sin, causal_mask, alpha)
            balance = balance + b
            loads.append(counts)
        vocab = self.c["vocab_size"]
        main = F.cross_entropy(self.lm_head(self.norm(h)).view(-1, vocab), targets.reshape(-1))
        mtp_loss = h.new_zeros(())
        if mtp_weight > 0 and len(self.mtp) > 0:
            m = self.mtp[0]
            # Position i predicts token i+2 from emb(t_{i+1}) and h_i (the residual stream
            # before the final norm); the last position has no t_{i+1} in the window: its
            # input is its own token and its loss is ignored.
            next_tokens = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
            mtp_targets = torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], -1)], dim=1)
            x = m.eh_proj(torch.cat([m.enorm(self.embed_tokens(next_tokens)), m.hnorm(h)], dim=-1))
            x, b, _ = m.block(x, cos, sin, causal_mask, alpha)
            balance = balance + b
            logits = self.lm_head(m.shared_head_norm(x))
            mtp_loss = F.cross_entropy(logits.view(-1, vocab), mtp_targets.reshape(-1), ignore_index=-1)
        return main + mtp_weight * mtp_loss + balance, main, mtp_loss, loads


def init_weights(model, std, seed):
    """Matrices N(0, std^2), norm weights 1, correction biases 0 (the paper's init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std, generator=g)
            else:
                p.fill_(1.0)


def lr_at(step, steps, lr, min_lr, warmup_frac=0.05, decay_start_frac=0.6):
    """dsv3's schedule: linear warmup, constant, cosine decay to min_lr (step counts from 1)."""
    warmup, decay_start, decay_end = int(steps * warmup_frac), int(steps * decay_start_frac), steps
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if step < decay_start or decay_end <= decay_start:
        return lr
    if step >= decay_end:
        return min_lr
    t = (step - decay_start) / (decay_end - decay_start)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def update_balance_bias(model, loads, gamma):
    """b_i += gamma * sign(mean load - load_i), per main-model MoE layer (§2.1.2); returns MaxVio."""
    max_vio = 0.0
    for layer, load in zip(model.layers, loads):
        if load is None:
            continue
        load = load.to(torch.float32)
        mean = load.mean()
        max_vio = max(max_vio, float(load.max() / mean - 1))
        layer.mlp.e_score_correction_bias += gamma * torch.sign(mean - load)
    return max_vio


def blas_summary():
    """Which BLAS this process multiplies with: torch's BLAS_INFO, the libraries mapped, and
    for OpenBLAS the core type it chose (OPENBLAS_CORETYPE) and its threads."""
    config = torch.__config__.show()
    blas_info = config.split("BLAS_INFO=")[1].split(",")[0] if "BLAS_INFO=" in config else "?"
    capability = config.split("CPU capability usage:")[1].split()[0] if "CPU capability usage:" in config else "?"
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1] for line in f if "blas" in line or "mkl" in line})
    text = f"BLAS_INFO={blas_info}, ATen CPU capability {capability}, libraries {' '.join(os.path.basename(l) for l in libs)}"
    if any("openblas" in l for l in libs):
        ob = ctypes.CDLL("libopenblas.so.0")  # the copy already loaded through libblas.so.3
        ob.openblas_get_corename.restype = ctypes.c_char_p
        ob.openblas_get_config.restype = ctypes.c_char_p
        text += (f"; {ob.openblas_get_config().decode()}: core {ob.openblas_get_corename().decode()}, "
                 f"{ob.openblas_get_num_threads()} threads (OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--data", required=True, help="folder of dsv3 token shards (train-*.bin)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lr", type=float, default=2.2e-4)
    ap.add_argument("--min-lr", type=float, default=2.2e-5)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--gamma", type=float, default=0.001)
    ap.add_argument("--alpha", type=float, default=1e-4)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--init-std", type=float, default=0.006)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the tokens/s")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    c = json.load(open(args.config))
    if c.get("rope_scaling"):
        raise SystemExit("this peer implements RoPE without YaRN only (rope_scaling must be null)")
    if c["scoring_func"] != "sigmoid" or c["topk_method"] != "noaux_tc":
        raise SystemExit("this peer implements sigmoid / noaux_tc routing only")
    paths = sorted(glob.glob(os.path.join(args.data, "train-*.bin")))
    if not paths:
        raise SystemExit(f"{args.data}: no train-*.bin shards")
    streams = []
    for p in paths:
        ids, vocab = read_shard(p)
        if vocab > c["vocab_size"]:
            raise SystemExit(f"{p}: ids up to {vocab} but vocab_size is {c['vocab_size']}")
        streams.append(ids)
    sampler = BatchSampler(streams, args.seq, args.seed)

    model = DeepSeekV3(c)
    init_weights(model, args.init_std, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    n_main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    groups = [{"params": [p for p in params if p.dim() == 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() != 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    print(f"torch {torch.__version__}: {n_main / 1e6:.2f}M parameters (main model), {args.steps} steps of "
          f"{args.batch} x {args.seq} tokens, {torch.get_num_threads()} threads", flush=True)

    torch.mm(torch.ones(64, 64), torch.ones(64, 64))  # loads the BLAS
    print(f"blas: {blas_summary()}", flush=True)

    times, losses = [], []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        tokens, targets = sampler.next_batch(args.batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.min_lr)
        opt.zero_grad(set_to_none=False)
        total, main_loss, mtp_loss, loads = model(tokens, targets, args.mtp_weight, args.alpha)
        total.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.clip))
        opt.step()
        max_vio = update_balance_bias(model, loads, args.gamma)
        dt = time.perf_counter() - t0
        times.append(dt)
        losses.append(float(main_loss))
        print(f"step {step}/{args.steps} loss {float(main_loss):.4f} mtp {float(mtp_loss):.4f} "
              f"gnorm {grad_norm:.2f} maxvio {max_vio:.2f} {args.batch * args.seq / dt:.0f} tok/s", flush=True)

    timed = times[args.warmup_steps:] or times
    tok_s = len(timed) * args.batch * args.seq / sum(timed)
    print(f"result: tokens_per_s {tok_s:.1f} (steps {len(times) - len(timed) + 1}-{len(times)})")
    print(f"result: first_loss {losses[0]:.4f}")
    print(f"result: last_loss {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
