"""``tierserve train-draft``: train Gumiho draft heads for a frozen target on Austen's training novels.

Data: ``TRAIN_NOVELS`` (every Austen novel but the held-out ``HELDOUT_NOVELS``
of tools/calibration.py, which perplexity and the speculative benchmark read),
tokenized and cut into windows of ``seq_len`` tokens (calibration.py
``austen_token_windows``); the windows are visited in a seeded order, step
``s`` taking windows ``s * batch_size ..`` of it (cycling), so a resumed run
sees exactly the data an uninterrupted one would.

Per step (the target frozen, in inference mode): the target prefills the
batch and gives its final hidden states ``h`` [B, L, H]; its next-token
distributions over the draft vocabulary, ``p_t = softmax(lm_head_draft(h_t))``,
are the soft targets (self-distillation: the heads learn what the target
would emit, which is what verification accepts). Losses, averaged
(gumiho_heads.py has the notation):

* serial head on the pairs ``(h_t, x_{t+1})``: ``CE(p_{t+1}, z_t)`` plus
  ``feature_weight * smooth_l1(z_t, h_{t+1})``;
* MLP head ``j`` on ``(z_t, x_{t+2})``: ``CE(p_{t+2+j}, head_j)``.

Draft vocabulary: the ``draft_vocab_size`` most frequent tokens of the
training windows (ties by id; all of them when the vocabulary is smaller).
AdamW (``lr``, weight decay 0), a 10-step linear warm-up then constant (so a
run extended by a larger ``steps`` continues exactly), gradients clipped to
norm 1.

Checkpoints: every ``checkpoint_every`` steps and at the end, the heads are
written to ``out`` (``GumihoHeads.save``: usable at once by
``--speculative-model out``) and ``out/train_state.pt`` keeps the step, the
optimizer state and the loss history; a run started on a folder that has a
state resumes from it (its options must match the saved ones, else
InvalidParameterError naming the option). Progress: a tqdm bar with the loss.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tierserve.engine.spec_decode.gumiho_heads import GumihoConfig, GumihoHeads
from tierserve.errors import InvalidParameterError
from tierserve.tools.calibration import HELDOUT_NOVELS, forward_hidden

TRAIN_NOVELS = ("Emma", "Mansfield Park", "Sense & Sensibility", "Pride & Prejudice")
STATE_FILE = "train_state.pt"
assert not set(TRAIN_NOVELS) & set(HELDOUT_NOVELS)


@dataclass(frozen=True)
class TrainDraftOptions:
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    num_windows: int = 2048       # training windows tokenized (fewer when the novels hold fewer)
    lr: float = 1e-3
    serial_depth: int = 2
    num_mlp_heads: int = 3
    window: int = 16
    intermediate_size: int = 0    # 0: twice the hidden size
    draft_vocab_size: int = 8192
    feature_weight: float = 0.1
    checkpoint_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_windows", "serial_depth", "window", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 4 + self.num_mlp_heads:
            raise InvalidParameterError("seq_len", f"must be >= 4 + num_mlp_heads = {4 + self.num_mlp_heads}, "
                                        f"got {self.seq_len}")
        if self.num_mlp_heads < 0 or self.serial_depth + self.num_mlp_heads > 16:
            raise InvalidParameterError("num_mlp_heads", f"must be in 0..{16 - self.serial_depth}, "
                                        f"got {self.num_mlp_heads}")


@dataclass
class TrainDraftResult:
    steps: int
    losses: list[float] = field(default_factory=list)


def draft_vocab(windows: torch.Tensor, vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` most frequent ids of ``windows`` (ties by id), sorted; every id when ``size`` >= vocab."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.bincount(windows.flatten(), minlength=vocab_size).double()
    counts -= torch.arange(vocab_size, dtype=torch.double) / (2 * vocab_size)  # ties: smaller id first
    return counts.topk(size).indices.sort().values


def heads_config(model, options: TrainDraftOptions, vocab: torch.Tensor, target: str) -> GumihoConfig:
    cfg = model.cfg
    h = cfg.hidden_size
    heads = cfg.num_attention_heads if h % cfg.num_attention_heads == 0 else 1
    return GumihoConfig(hidden_size=h, vocab_size=cfg.vocab_size, num_heads=heads,
                        intermediate_size=options.intermediate_size or 2 * h, serial_depth=options.serial_depth,
                        num_mlp_heads=options.num_mlp_heads, window=options.window,
                        draft_vocab_size=0 if len(vocab) == cfg.vocab_size else len(vocab),
                        rms_norm_eps=cfg.rms_norm_eps, feature_weight=options.feature_weight, target=target)


def _soft_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def draft_loss(heads: GumihoHeads, lm_head: torch.Tensor, hidden: torch.Tensor, embeds: torch.Tensor,
               probs: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch (module docstring): ``hidden``/``embeds`` [B, L, H], ``probs`` [B, L, N]."""
    n = hidden.shape[1]
    z = heads.serial_forward(heads.pairs(hidden[:, :n - 2], embeds[:, 1:n - 1]))  # z_t, t = 0 .. L-3
    loss = _soft_ce(z @ lm_head.T, probs[:, 1:n - 1])
    loss = loss + heads.config.feature_weight * F.smooth_l1_loss(z, hidden[:, 1:n - 1])
    for j, feats in enumerate(heads.mlp_forward(z, embeds[:, 2:n])):
        m = n - 2 - j  # t + 2 + j <= L - 1
        loss = loss + _soft_ce(feats[:, :m] @ lm_head.T, probs[:, 2 + j:n])
    return loss


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 10)


def train_draft(model, windows: torch.Tensor, out: str, options: TrainDraftOptions, target: str = "",
                progress: bool = True) -> TrainDraftResult:
    """Train heads for ``model`` (frozen) on ``windows`` [W, L] token ids, saving to ``out`` (resumable)."""
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, STATE_FILE)
    state = torch.load(state_path, weights_only=False) if os.path.isfile(state_path) else None
    if state is not None:
        _check_same_options(state["options"], options)
    torch.manual_seed(options.seed)
    vocab = state["vocab"] if state is not None else draft_vocab(windows, model.cfg.vocab_size,
                                                                 options.draft_vocab_size)
    heads = GumihoHeads(heads_config(model, options, vocab, target))
    heads.draft_vocab.copy_(vocab)
    opt = torch.optim.AdamW(heads.parameters(), lr=options.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
    result = TrainDraftResult(0)
    if state is not None:
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        result = TrainDraftResult(state["step"], state["losses"])
    for p in model.parameters():
        p.requires_grad_(False)
    lm_head = model.head_weight().detach()[vocab].float()
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(options.seed))
    bar = tqdm(total=options.steps, initial=result.steps, desc="train-draft", disable=not progress)
    while result.steps < options.steps:
        idx = order[(result.steps * options.batch_size + torch.arange(options.batch_size)) % len(order)]
        tokens = windows[idx]
        with torch.inference_mode():
            hidden = forward_hidden(model, tokens).float().view(*tokens.shape, -1)
            embeds = model.embed_tokens(tokens).float()
            probs = torch.softmax(hidden @ lm_head.T, dim=-1)
        loss = draft_loss(heads, lm_head, hidden.clone(), embeds.clone(), probs.clone())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
        opt.step()
        sched.step()
        result.steps += 1
        result.losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        if result.steps % options.checkpoint_every == 0 or result.steps == options.steps:
            _checkpoint(heads, opt, sched, result, options, vocab, out)
    bar.close()
    return result


def _check_same_options(saved: dict, options: TrainDraftOptions) -> None:
    for name, value in dataclasses.asdict(options).items():
        if name not in ("steps", "checkpoint_every") and saved.get(name) != value:
            raise InvalidParameterError(name, f"the run saved in this folder used {saved.get(name)!r}, got "
                                        f"{value!r}: resume with the same options or use another --out")


def _checkpoint(heads, opt, sched, result: TrainDraftResult, options, vocab, out: str) -> None:
    heads.save(out)
    tmp = os.path.join(out, STATE_FILE + ".tmp")
    torch.save({"heads": heads.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": result.steps, "losses": result.losses, "options": dataclasses.asdict(options),
                "vocab": vocab}, tmp)
    os.replace(tmp, os.path.join(out, STATE_FILE))


def train_draft_from_path(model_path: str | None, out: str, options: TrainDraftOptions,
                          progress: bool = True) -> TrainDraftResult:
    """Load the target (fp32, unpacked) and its tokenizer, tokenize ``TRAIN_NOVELS``, train."""
    from tierserve.engine.model_source import load_tokenizer, resolve_model
    from tierserve.models.loader import load_model

    source = resolve_model(model_path, None, "cpu")
    model = load_model(source.weights, torch.float32).model.eval()
    tokenizer = load_tokenizer(source, None)
    windows = _train_windows(tokenizer, options)
    return train_draft(model, windows, out, options, target=source.name, progress=progress)


def _train_windows(tokenizer, options: TrainDraftOptions) -> torch.Tensor:
    from tierserve.tools.calibration import austen_token_windows

    n = options.num_windows
    while True:
        try:
            return austen_token_windows(tokenizer, TRAIN_NOVELS, n, options.seq_len)
        except ValueError:
            if n <= 1:
                raise
            n //= 2
