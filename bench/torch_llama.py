"""A Llama in plain PyTorch, for bench/torch_baseline.py on a machine whose torch has no transformers
beside it (the GPU machines' torch venv may lack it, and has no network to fetch it).

The same computation as transformers' LlamaForCausalLM with attn_implementation="sdpa": RMSNorm
pre-norm, rotate-half RoPE, grouped-query attention through scaled_dot_product_attention (causal,
enable_gqa, no repeated K/V), SwiGLU, an untied LM head, and a mean cross-entropy over shifted labels.
`python3 bench/torch_llama.py` checks that on the CPU: the same weights give transformers' loss.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, ff: int, heads: int, kv_heads: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.input_layernorm = nn.RMSNorm(d, eps=eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=eps)
        self.gate_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF layout: pairs are (i, i + head_dim/2))."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Llama(nn.Module):
    def __init__(self, vocab: int, d: int, ff: int, layers: int, heads: int, kv_heads: int,
                 eps: float = 1e-5, theta: float = 10000.0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, ff, heads, kv_heads, eps) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=eps)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        hd = d // heads
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd), persistent=False)
        for m in self.modules():  # HF's initialisation: N(0, 0.02), RMSNorm weights 1
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of `ids` against themselves shifted by one."""
        pos = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.embed_tokens(ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x)).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def check_against_transformers():
    """Copies a small random HF Llama's weights into this one and compares the loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    hf = LlamaForCausalLM(cfg).eval()
    ours = Llama(300, 64, 160, 2, 8, 2).eval()
    state = {k.removeprefix("model.").replace("self_attn.", "").replace("mlp.", ""): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not missing and not [u for u in unexpected if "rotary" not in u], (missing, unexpected)
    ids = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        want, got = hf(input_ids=ids, labels=ids).loss.item(), ours(ids).item()
    print(f"transformers loss {want:.6f}, plain PyTorch loss {got:.6f}")
    assert abs(want - got) < 1e-5, "the plain Llama does not compute what transformers does"


if __name__ == "__main__":
    check_against_transformers()
