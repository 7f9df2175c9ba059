"""Gumiho draft heads (arXiv 2503.10135): a serial transformer head, then parallel MLP heads.

The heads read the target's final hidden states (after its last RMSNorm, the
input of its LM head) and token embeddings, and predict tokens through the
target's own frozen LM head; they hold no embedding or LM head of their own.
Notation: ``h_p`` is the target's hidden state at position ``p`` (it predicts
``x_{p+1}``); a *pair* is ``(h_p, x_{p+1})``.

Serial head (drafts 1 .. ``serial_depth``, one after the other):

    u_p = fc([h_p ; norm_e(embed(x_{p+1}))])            # 2H -> H
    u   = u + attn(norm_1(u))                           # causal, over the last ``window`` pairs
    u   = u + mlp(norm_2(u))                            # SwiGLU, ``intermediate_size``
    z_p = norm_f(u_p)                                   # stands for h_{p+1}: predicts x_{p+2}

Attention has no position encoding (causal masking orders the window, as in
NoPE decoders). Drafting: the window holds the request's last ``window``
pairs, the newest ``(h_{n-2}, x_{n-1})``; ``z`` predicts draft ``d_1``; the
pair ``(z, d_1)`` is appended and the head runs again for ``d_2``; and so on.

MLP heads (drafts ``serial_depth + 1 ..``, all at once): head ``j`` maps the
last serial output ``z`` and the embedding of the last serial draft ``d``:

    v_j = z + W2_j silu(W1_j [z ; norm_e(embed(d))]);   logits_j = lm_head(norm_j(v_j))

and predicts the token ``j + 1`` places after ``d``.

Draft vocabulary: the heads' logits cover ``draft_vocab`` (the most frequent
training tokens, saved with the heads), i.e. the target's LM head rows of
those ids, so a SmolLM2 draft computes 8192 logits instead of 49152. Drafts
never leave that set; verification is exact whatever is drafted.

Training (tierserve/tools/train_draft.py), with the target's true features:
the serial head maps the pairs of a sequence in one causal pass (attention
limited to ``window`` pairs, as when drafting); ``z_t`` is scored by cross
entropy on ``x_{t+2}`` plus ``feature_weight`` x smooth-L1 to ``h_{t+1}``
(so ``z`` can stand in for a hidden state in the next pair, as EAGLE);
MLP head ``j`` gets ``(z_t, x_{t+2})`` and is scored on ``x_{t+3+j}``.
Targets outside the draft vocabulary are ignored.

Files: ``gumiho_config.json`` (``GumihoConfig``) and ``gumiho_heads.safetensors``
(the parameters and ``draft_vocab``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tierserve.errors import InvalidParameterError

CONFIG_FILE = "gumiho_config.json"
WEIGHTS_FILE = "gumiho_heads.safetensors"


@dataclass(frozen=True)
class GumihoConfig:
    hidden_size: int
    vocab_size: int           # the target's vocabulary
    num_heads: int = 8        # attention heads of the serial layer
    intermediate_size: int = 1024
    serial_depth: int = 2     # drafts from the serial head
    num_mlp_heads: int = 3    # drafts after them, in parallel
    window: int = 16          # pairs the serial head attends over
    draft_vocab_size: int = 0  # 0: the whole vocabulary
    rms_norm_eps: float = 1e-5
    feature_weight: float = 0.1
    target: str = ""          # the model the heads were trained for (informational)

    @property
    def max_drafts(self) -> int:
        return self.serial_depth + self.num_mlp_heads


class _Serial(nn.Module):
    def __init__(self, c: GumihoConfig):
        super().__init__()
        h = c.hidden_size
        if h % c.num_heads:
            raise InvalidParameterError("num_heads", f"must divide hidden_size {h}, got {c.num_heads}")
        self.num_heads = c.num_heads
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.norm_1 = nn.RMSNorm(h, eps=c.rms_norm_eps)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.o = nn.Linear(h, h, bias=False)
        self.norm_2 = nn.RMSNorm(h, eps=c.rms_norm_eps)
        self.gate_up = nn.Linear(h, 2 * c.intermediate_size, bias=False)
        self.down = nn.Linear(c.intermediate_size, h, bias=False)
        self.norm_f = nn.RMSNorm(h, eps=c.rms_norm_eps)

    def forward(self, pairs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``pairs`` [B, L, 2H] -> z [B, L, H]; ``mask`` [L, L] bool (True: may attend)."""
        u = self.fc(pairs)
        b, n, h = u.shape
        q, k, v = self.qkv(self.norm_1(u)).view(b, n, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        u = u + self.o(a.transpose(1, 2).reshape(b, n, h))
        g, up = self.gate_up(self.norm_2(u)).chunk(2, dim=-1)
        u = u + self.down(F.silu(g) * up)
        return self.norm_f(u)


class _MLPHead(nn.Module):
    def __init__(self, c: GumihoConfig):
        super().__init__()
        h = c.hidden_size
        self.w1 = nn.Linear(2 * h, h, bias=False)
        self.w2 = nn.Linear(h, h, bias=False)
        self.norm = nn.RMSNorm(h, eps=c.rms_norm_eps)

    def forward(self, z: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        return self.norm(z + self.w2(F.silu(self.w1(inp))))


def window_mask(n: int, window: int, device=None) -> torch.Tensor:
    """[n, n] bool: row i may attend to columns i - window + 1 .. i."""
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


class GumihoHeads(nn.Module):
    def __init__(self, config: GumihoConfig):
        super().__init__()
        self.config = config
        self.norm_e = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.serial = _Serial(config)
        self.mlp_heads = nn.ModuleList(_MLPHead(config) for _ in range(config.num_mlp_heads))
        n = config.draft_vocab_size or config.vocab_size
        self.register_buffer("draft_vocab", torch.arange(n, dtype=torch.long))

    def pairs(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return torch.cat([hidden, self.norm_e(embeds)], dim=-1)

    def serial_forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """``pairs`` [B, L, 2H] -> z [B, L, H], attention over at most ``window`` pairs."""
        return self.serial(pairs, window_mask(pairs.shape[1], self.config.window, pairs.device))

    def mlp_forward(self, z: torch.Tensor, embeds: torch.Tensor) -> list[torch.Tensor]:
        """Each MLP head's features for ``z`` [..., H] and the next token's embedding [..., H]."""
        inp = torch.cat([z, self.norm_e(embeds)], dim=-1)
        return [head(z, inp) for head in self.mlp_heads]

    # ------------------------------------------------------------------ files
    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = os.path.join(folder, WEIGHTS_FILE + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(folder, WEIGHTS_FILE))
        with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(self.config), f, indent=1)

    @classmethod
    def load(cls, folder: str, hidden_size: int | None = None, vocab_size: int | None = None) -> GumihoHeads:
        """The heads in ``folder``; with the target's shapes given, heads trained for another model are refused."""
        from safetensors.torch import load_file

        path = os.path.join(folder, CONFIG_FILE)
        if not os.path.isfile(path):
            raise InvalidParameterError("speculative_model", f"{folder!r} holds no {CONFIG_FILE} "
                                        "(write draft heads with `tierserve train-draft`)")
        with open(path, encoding="utf-8") as f:
            config = GumihoConfig(**json.load(f))
        if hidden_size is not None and (config.hidden_size, config.vocab_size) != (hidden_size, vocab_size):
            raise InvalidParameterError(
                "speculative_model", f"the heads in {folder!r} were trained for hidden size {config.hidden_size} "
                f"and vocabulary {config.vocab_size}, but the target model has hidden size {hidden_size} and "
                f"vocabulary {vocab_size}")
        heads = cls(config)
        heads.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)))
        return heads.eval()
