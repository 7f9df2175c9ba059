"""MoEfication: turn a dense SwiGLU model (SmolLM2) into a Mixtral-format MoE.

Per layer, on calibration tokens x (the FFN inputs of the dense model on Austen
text, ``calibration.py``), with the dense FFN ``down(silu(gate x) * up x)``:

1. Neuron activity: ``a = silu(W_g x) * (W_u x)`` ``[N, I]``; neuron i's
   contribution norm on token t is ``|a_ti| * ||W_d[:, i]||_2``.
2. Clustering: the I neurons, each described by its contribution pattern over
   the N tokens (co-activation), are split into E equal groups of I / E by
   balanced spherical k-means (``clustering.py``, seed ``seed``). Group e is
   expert e: rows ``idx_e`` of W_g (w1) and W_u (w3), columns ``idx_e`` of W_d
   (w2), neurons kept in ascending order.
3. Group output norms ``n_te = ||W_d[:, idx_e] a_t[idx_e]||_2``. Router
   (``Linear(hidden, E)``, no bias): ridge least squares (lambda =
   ``RIDGE`` * mean diagonal of X^T X) of the per-token centred log norms
   ``log(n_te + 1e-6) - mean_e log(n_te + 1e-6)`` on x, so its top-k are the
   groups predicted to carry the largest output.
4. Gate weights: Mixtral renormalises the top-k softmax weights to sum to 1,
   while the dense FFN is the plain sum of all groups. Each expert's w2 is
   therefore scaled by k, and the router is multiplied by a temperature tau
   picked from ``TEMPERATURES`` to minimise the squared error between the
   MoE block and the dense FFN on the calibration tokens (small tau: nearly
   uniform weights 1/k, so the block returns about the sum of the k chosen
   groups); then a per-layer scalar s (least squares of the MoE block output
   onto the dense FFN output on the same tokens) also multiplies every w2.
   With k = E and a zero router (``router="zero"``) the weights are
   exactly 1/E and the block equals the dense FFN up to float summation order:
   the exactness check of TECHNIQUES.md.

Calibration uses the dense model's FFN inputs in every layer (one forward
pass); later layers are not re-calibrated on the MoE's own outputs.
Everything is deterministic for a given config (fixed seed, fixed token
windows); torch's CPU kernels are deterministic for a fixed thread count.

The output folder holds a ``MixtralForCausalLM`` config.json
(``num_local_experts`` = E, ``num_experts_per_tok`` = k, ``intermediate_size``
= I / E), ``model.safetensors`` with per-expert tensors
``model.layers.N.block_sparse_moe.experts.E.w{1,2,3}.weight`` and
``...block_sparse_moe.gate.weight``, the dense model's attention, norm and
embedding tensors unchanged, ``moefy.json`` (the config and fit statistics)
and the tokenizer files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierserve.errors import InvalidParameterError
from tierserve.tools.clustering import balanced_kmeans
from tierserve.tools.model_folder import write_model_folder

MOEFY_VERSION = 1
RIDGE = 1e-3
TEMPERATURES = (0.01, 0.1, 0.3, 1.0, 3.0)
KMEANS_TOKENS = 2048
ROUTERS = ("fit", "zero")
_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json")


@dataclass(frozen=True)
class MoefyConfig:
    """num_experts E, top_k k, calibration windows x seq_len tokens, router "fit" or "zero"."""

    num_experts: int = 8
    top_k: int = 4
    calib_windows: int = 16
    seq_len: int = 256
    seed: int = 0
    router: str = "fit"
    kmeans_iters: int = 25

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise InvalidParameterError("num_experts", f"must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise InvalidParameterError("top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.router not in ROUTERS:
            raise InvalidParameterError("router", f"must be one of {ROUTERS}, got {self.router!r}")
        for name in ("calib_windows", "seq_len", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(name, f"must be >= 1, got {getattr(self, name)}")

    def key(self) -> str:
        blob = json.dumps({"v": MOEFY_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LayerSplit:
    """One layer's experts: neuron indices per expert, router weight [E, hidden], fit statistics."""

    groups: list[torch.Tensor]
    router: torch.Tensor
    temperature: float
    scale: float  # extra factor on every w2 of the layer (beyond k), least squares; 1 for the zero router
    top1_accuracy: float  # router's argmax == the group with the largest output norm (calibration tokens)
    rel_error: float  # ||MoE block - dense FFN|| / ||dense FFN|| on the calibration tokens


def _ffn_parts(mlp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inter = mlp.intermediate
    w = mlp.gate_up_proj.weight.detach().float()
    return w[:inter], w[inter:], mlp.down_proj.weight.detach().float()


def _moe_output(logits: torch.Tensor, group_out: torch.Tensor, k: int) -> torch.Tensor:
    """Mixtral combine of per-group outputs ``[N, E, H]`` (unscaled) with w2 scaled by k."""
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    chosen = torch.gather(group_out, 1, ids[..., None].expand(-1, -1, group_out.shape[-1]))
    return (w[..., None] * k * chosen).sum(1)


def split_layer(mlp, x: torch.Tensor, cfg: MoefyConfig, layer_seed: int) -> LayerSplit:
    """Cluster one dense FFN's neurons and fit its router (steps 1-4 of the module docstring)."""
    w_g, w_u, w_d = _ffn_parts(mlp)
    x = x.float()
    act = F.silu(x @ w_g.T) * (x @ w_u.T)  # [N, I]
    contrib = act.abs() * w_d.norm(dim=0)
    labels = balanced_kmeans(contrib[:KMEANS_TOKENS].T, cfg.num_experts, cfg.kmeans_iters, seed=layer_seed)
    groups = [torch.nonzero(labels == e).flatten() for e in range(cfg.num_experts)]
    group_out = torch.stack([act[:, g] @ w_d[:, g].T for g in groups], dim=1)  # [N, E, H]
    norms = group_out.norm(dim=-1)
    dense = group_out.sum(1)
    if cfg.router == "zero":
        router = torch.zeros(cfg.num_experts, x.shape[1])
        temps = (1.0,)
    else:
        target = torch.log(norms + 1e-6)
        target = target - target.mean(-1, keepdim=True)
        gram = x.T @ x
        gram += RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0])
        router = torch.linalg.solve(gram, x.T @ target).T.contiguous()  # [E, H]
        temps = TEMPERATURES
    logits = x @ router.T
    best_err, best_t, best_scale = float("inf"), 1.0, 1.0
    for t in temps:
        moe = _moe_output(t * logits, group_out, cfg.top_k)
        # least-squares scalar on the block output (fixed at 1 for the zero router: exactness)
        scale = 1.0 if cfg.router == "zero" else float((moe * dense).sum() / (moe * moe).sum().clamp_min(1e-30))
        err = float((scale * moe - dense).pow(2).sum())
        if err < best_err:
            best_err, best_t, best_scale = err, t, scale
    top1 = float((logits.argmax(-1) == norms.argmax(-1)).float().mean())
    rel = (best_err / float(dense.pow(2).sum())) ** 0.5
    return LayerSplit(groups, best_t * router, best_t, best_scale, top1, rel)


def _mixtral_config(dense_cfg: dict, cfg: MoefyConfig) -> dict:
    inter = int(dense_cfg["intermediate_size"])
    out = {k: v for k, v in dense_cfg.items() if k not in ("architectures", "model_type", "mlp_bias")}
    out.update(architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=inter // cfg.num_experts,
               num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, output_router_logits=False,
               router_aux_loss_coef=0.0, router_jitter_noise=0.0, sliding_window=None, attention_dropout=0.0)
    return out


def _expert_tensors(layer: int, mlp, split: LayerSplit, k: int) -> dict[str, torch.Tensor]:
    w_g, w_u, w_d = _ffn_parts(mlp)
    prefix = f"model.layers.{layer}.block_sparse_moe."
    out = {prefix + "gate.weight": split.router.contiguous()}
    for e, idx in enumerate(split.groups):
        out[f"{prefix}experts.{e}.w1.weight"] = w_g[idx].contiguous()
        out[f"{prefix}experts.{e}.w3.weight"] = w_u[idx].contiguous()
        out[f"{prefix}experts.{e}.w2.weight"] = (w_d[:, idx] * (k * split.scale)).contiguous()
    return out


def moefy(dense_folder: str, out_dir: str, cfg: MoefyConfig = MoefyConfig()) -> dict:
    """Write the MoE version of the dense safetensors folder ``dense_folder`` to ``out_dir``; returns its stats."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from tierserve.models.loader import load_model, safetensors_files
    from tierserve.tools.calibration import CALIBRATION_NOVELS, austen_token_windows, capture_mlp_inputs

    torch.manual_seed(cfg.seed)
    loaded = load_model(dense_folder)
    dense_cfg = loaded.hf_config
    if int(dense_cfg["intermediate_size"]) % cfg.num_experts:
        raise InvalidParameterError("num_experts", f"must divide intermediate_size={dense_cfg['intermediate_size']}, "
                                                   f"got {cfg.num_experts}")
    model = loaded.model
    tokenizer = AutoTokenizer.from_pretrained(dense_folder)
    windows = austen_token_windows(tokenizer, CALIBRATION_NOVELS, cfg.calib_windows, cfg.seq_len)
    inputs = capture_mlp_inputs(model, windows)
    tensors: dict[str, torch.Tensor] = {}
    layer_stats = []
    for i, layer in enumerate(model.layers):
        split = split_layer(layer.mlp, inputs[i], cfg, layer_seed=cfg.seed * 1000 + i)
        inputs[i] = None
        tensors.update(_expert_tensors(i, layer.mlp, split, cfg.top_k))
        layer_stats.append({"temperature": split.temperature, "scale": round(split.scale, 6), "top1_accuracy": round(split.top1_accuracy, 6),
                            "rel_error": round(split.rel_error, 6)})
    for file in safetensors_files(dense_folder):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if ".mlp." not in name:
                    tensors[name] = f.get_tensor(name).float().contiguous()
    stats = {"moefy_version": MOEFY_VERSION, "config": dataclasses.asdict(cfg), "layers": layer_stats}
    write_model_folder(out_dir, tensors, _mixtral_config(dense_cfg, cfg), "moefy.json", stats, dense_folder,
                       lambda name: name in _COPIED_FILES)
    return stats


def ensure_moe_model(cache_dir: str | None = None, cfg: MoefyConfig = MoefyConfig()) -> str:
    """The MoEfied SmolLM2-135M-Instruct for ``cfg``, built once into the user cache and reused."""
    from tierserve.models.default_model import ensure_default_model
    from tierserve.paths import cache_root

    dense = ensure_default_model(cache_dir)
    folder = os.path.join(cache_root(cache_dir), "models",
                          f"{os.path.basename(dense)}-moe{cfg.num_experts}x{cfg.top_k}-{cfg.key()}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        moefy(dense, folder, cfg)
    return folder
