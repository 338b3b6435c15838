"""Layer collapse of a pruned MLP under no / L1 / CoNNect regularization (paper section 4.1.1).

MLP 6-5-5-5-1 with ReLU; x ~ N(0, 2 I_6), y = 1[x1 + x2 + xi > 0], xi ~ N(0, 0.25). Each of
``--inits`` initializations is trained for 200 epochs (Adam, lr 0.01, cosine annealing, batch
256, weight decay 5e-4) with no regularizer, L1 (1e-3) or CoNNect (lambda 0.1); 96% of the
weights of every layer are then pruned by magnitude or by (layer-local, one-shot) SynFlow, and
the pruned network is fine-tuned for 50 epochs at lr 0.001. Reported per regularizer and pruning
method: how many networks collapsed (no input-output path left, Table 5 of the paper) and the
fine-tuned test accuracy.

All networks of one regularizer are trained at once as a batch of weight tensors (one Adam over
``(inits, out, in)`` tensors is exactly ``inits`` independent Adams), so the whole experiment
takes about a minute on one CPU core.

Resumable: every regularizer writes ``runs_<name>.json`` on completion and is skipped on a
rerun with the same configuration; the table, summary and figure are rebuilt from those files.

Usage:
    python -m benchmarks.mlp_layer_collapse                     # the full experiment
    python -m benchmarks.mlp_layer_collapse --gaussian-params std \
        --out benchmarks/results/mlp_layer_collapse/std_reading # 2 and 0.25 as std. deviations
    python -m benchmarks.mlp_layer_collapse --inits 4 --epochs 3 --finetune-epochs 2 --out /tmp/x
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from connect_tp.regularizer import mlp_log_connectivity
from connect_tp.sparsity import mlp_effective_masks, mlp_layer_collapse
from connect_tp.unstructured import layerwise_masks, mlp_synflow_scores

__all__ = ["Config", "run", "main", "make_data", "init_mlps", "train_mlps"]

LAYER_SIZES = (6, 5, 5, 5, 1)
REGULARIZERS = ("none", "l1", "connect")
PRUNING_METHODS = ("magnitude", "synflow")
# Table 5 of the paper: layer collapses out of 100 initializations.
PAPER_COLLAPSES = {
    "magnitude": {"none": 81, "l1": 83, "connect": 4},
    "synflow": {"none": 71, "l1": 61, "connect": 1},
}
REG_LABELS = {"none": "No reg.", "l1": "L1 reg.", "connect": "CoNNect reg."}
METHOD_LABELS = {"magnitude": "Magnitude", "synflow": "SynFlow"}
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "mlp_layer_collapse")


@dataclass(frozen=True)
class Config:
    """Experiment settings; defaults follow appendix C.1 (Table 3) of the paper."""

    inits: int = 100
    n_train: int = 1000  # the paper does not give the data set size
    n_test: int = 1000
    data_seed: int = 0
    epochs: int = 200
    finetune_epochs: int = 50
    lr: float = 0.01
    finetune_lr: float = 0.001
    batch_size: int = 256
    weight_decay: float = 5e-4  # lambda_3
    l1: float = 1e-3  # lambda_1 for the L1 runs
    connect: float = 0.1  # lambda_2 for the CoNNect runs
    sparsity: float = 0.96
    # How to read N(0, 2 I) and N(0, 0.25): "variance" (the notation's usual meaning, default)
    # or "std" (torch.normal-style arguments; gives the >0.95 accuracies the paper reports).
    gaussian_params: str = "variance"

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------
# data, batched MLPs, training
# ------------------------------------------------------------------------------------------
def make_data(n: int, generator: torch.Generator, gaussian_params: str = "variance") -> Tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, 2 I_6); y = 1[x1 + x2 + xi > 0] with xi ~ N(0, 0.25).

    ``gaussian_params="variance"`` reads 2 and 0.25 as variances, ``"std"`` as standard
    deviations.
    """
    if gaussian_params not in ("variance", "std"):
        raise ValueError(f"gaussian_params must be 'variance' or 'std', got {gaussian_params!r}")
    x_std, xi_std = (math.sqrt(2.0), 0.5) if gaussian_params == "variance" else (2.0, 0.25)
    x = torch.randn(n, LAYER_SIZES[0], generator=generator) * x_std
    xi = torch.randn(n, generator=generator) * xi_std
    y = (x[:, 0] + x[:, 1] + xi > 0).float()
    return x, y


def init_mlps(seeds: Sequence[int]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """PyTorch's default ``nn.Linear`` initialization, one generator per seed.

    Returns batched weights ``(len(seeds), out, in)`` and biases ``(len(seeds), out)``; the same
    seed gives the same network under every regularizer.
    """
    weights, biases = [[] for _ in LAYER_SIZES[1:]], [[] for _ in LAYER_SIZES[1:]]
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        for k, (n_in, n_out) in enumerate(zip(LAYER_SIZES[:-1], LAYER_SIZES[1:])):
            bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform(a=sqrt(5)) and the bias rule
            weights[k].append((torch.rand(n_out, n_in, generator=g) * 2 - 1) * bound)
            biases[k].append((torch.rand(n_out, generator=g) * 2 - 1) * bound)
    return [torch.stack(w) for w in weights], [torch.stack(b) for b in biases]


def forward(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits ``(nets, n)`` of a batch of MLPs on shared inputs ``x`` of shape ``(n, 6)``."""
    h = x.unsqueeze(0).expand(weights[0].shape[0], -1, -1)
    for k, (w, b) in enumerate(zip(weights, biases)):
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if k < len(weights) - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


def accuracy(weights, biases, x, y) -> torch.Tensor:
    with torch.no_grad():
        return ((forward(weights, biases, x) > 0).float() == y).float().mean(1)


def train_mlps(
    weights: List[torch.Tensor],
    biases: List[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    cfg: Config,
    l1: float = 0.0,
    connect: float = 0.0,
    masks: Sequence[torch.Tensor] = None,
    shuffle_seed: int = 0,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Equation (7) for a batch of MLPs: BCE + l1 ||W||_1 - connect log phi_tot(W) (+ weight decay).

    The per-network losses are summed, so each network receives exactly its own gradient.
    ``masks`` (fine-tuning) keep pruned weights at zero.
    """
    weights = [w.clone().requires_grad_(True) for w in weights]
    biases = [b.clone().requires_grad_(True) for b in biases]
    opt = torch.optim.Adam(weights + biases, lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(shuffle_seed)
    n = x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            logits = forward(weights, biases, x[idx])
            target = y[idx].unsqueeze(0).expand_as(logits)
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1).sum()
            if l1:
                loss = loss + l1 * sum(w.abs().sum() for w in weights)
            if connect:
                loss = loss - connect * mlp_log_connectivity(weights).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if masks is not None:
                for w, m in zip(weights, masks):
                    w.grad.mul_(m)
            opt.step()
            if masks is not None:
                with torch.no_grad():
                    for w, m in zip(weights, masks):
                        w.mul_(m)
        sched.step()
    return [w.detach() for w in weights], [b.detach() for b in biases]


# ------------------------------------------------------------------------------------------
# one regularizer: train, prune, fine-tune
# ------------------------------------------------------------------------------------------
def run_regularizer(reg: str, cfg: Config, data) -> Dict:
    (x_train, y_train), (x_test, y_test) = data
    seeds = list(range(cfg.inits))
    weights, biases = init_mlps(seeds)
    t0 = time.perf_counter()
    weights, biases = train_mlps(
        weights, biases, x_train, y_train, cfg.epochs, cfg.lr, cfg,
        l1=cfg.l1 if reg == "l1" else 0.0, connect=cfg.connect if reg == "connect" else 0.0, shuffle_seed=1,
    )
    trained_acc = accuracy(weights, biases, x_test, y_test)

    scores = {
        "magnitude": [w.abs() for w in weights],
        "synflow": mlp_synflow_scores(weights),
    }
    masks = {m: [k.float() for k in layerwise_masks(scores[m], cfg.sparsity, batch_dims=1)] for m in PRUNING_METHODS}
    # fine-tune the magnitude- and SynFlow-pruned copies of all networks as one batch
    all_masks = [torch.cat([masks[m][k] for m in PRUNING_METHODS]) for k in range(len(weights))]
    pruned_w = [torch.cat([weights[k]] * len(PRUNING_METHODS)) * all_masks[k] for k in range(len(weights))]
    pruned_b = [torch.cat([b] * len(PRUNING_METHODS)) for b in biases]
    collapsed = mlp_layer_collapse(pruned_w)
    effective = mlp_effective_masks(pruned_w)[0]
    total = sum(w[0].numel() for w in weights)
    eff_sparsity = 1.0 - sum(m.flatten(1).sum(1) for m in effective).float() / total
    pruned_acc = accuracy(pruned_w, pruned_b, x_test, y_test)
    ft_w, ft_b = train_mlps(
        pruned_w, pruned_b, x_train, y_train, cfg.finetune_epochs, cfg.finetune_lr, cfg,
        masks=all_masks, shuffle_seed=2,
    )
    ft_acc = accuracy(ft_w, ft_b, x_test, y_test)
    n = cfg.inits
    result = {
        "regularizer": reg,
        "config_key": cfg.key(),
        "seconds": time.perf_counter() - t0,
        "trained_test_acc": trained_acc.tolist(),
        "methods": {},
    }
    for i, method in enumerate(PRUNING_METHODS):
        sl = slice(i * n, (i + 1) * n)
        result["methods"][method] = {
            "collapsed": collapsed[sl].tolist(),
            "effective_sparsity": eff_sparsity[sl].tolist(),
            "pruned_test_acc": pruned_acc[sl].tolist(),
            "finetuned_test_acc": ft_acc[sl].tolist(),
        }
    return result


# ------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------
def _write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
    os.replace(tmp, path)


def summarize(runs: Dict[str, Dict], cfg: Config) -> Dict:
    table = {}
    for method in PRUNING_METHODS:
        table[method] = {}
        for reg in REGULARIZERS:
            m = runs[reg]["methods"][method]
            acc = torch.tensor(m["finetuned_test_acc"])
            table[method][reg] = {
                "collapses": int(sum(m["collapsed"])),
                "paper_collapses": PAPER_COLLAPSES[method][reg],
                "finetuned_acc_mean": float(acc.mean()),
                "finetuned_acc_median": float(acc.median()),
                # the paper's three outcome classes (appendix D.1): ~0.5, ~0.75, >0.95
                "acc_below_0.6": int((acc < 0.6).sum()),
                "acc_0.6_to_0.9": int(((acc >= 0.6) & (acc < 0.9)).sum()),
                "acc_at_least_0.9": int((acc >= 0.9).sum()),
                "effective_sparsity_mean": float(torch.tensor(m["effective_sparsity"]).mean()),
            }
    return {
        "config": asdict(cfg),
        "config_key": cfg.key(),
        "trained_test_acc_mean": {r: float(torch.tensor(runs[r]["trained_test_acc"]).mean()) for r in REGULARIZERS},
        "seconds_per_regularizer": {r: runs[r]["seconds"] for r in REGULARIZERS},
        "table": table,
    }


def markdown(summary: Dict) -> str:
    cfg = summary["config"]
    lines = [
        f"Layer collapses out of {cfg['inits']} initializations (ours / paper's Table 5) after pruning "
        f"{cfg['sparsity']:.0%} of every layer, and fine-tuned test accuracy (mean; counts of runs "
        "with accuracy < 0.6 / 0.6-0.9 / >= 0.9).",
        f"Data: {cfg['n_train']} training / {cfg['n_test']} test samples, the 2 and 0.25 of N(0, 2I) and "
        f"N(0, 0.25) read as {'variances' if cfg['gaussian_params'] == 'variance' else 'standard deviations'}.",
        "",
        "| Pruning | Regularizer | Collapses (ours) | Collapses (paper) | Fine-tuned acc. (mean) | <0.6 / 0.6-0.9 / >=0.9 | Effective sparsity |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for method in PRUNING_METHODS:
        for reg in REGULARIZERS:
            t = summary["table"][method][reg]
            lines.append(
                f"| {METHOD_LABELS[method]} | {REG_LABELS[reg]} | {t['collapses']} | {t['paper_collapses']} | "
                f"{t['finetuned_acc_mean']:.3f} | {t['acc_below_0.6']} / {t['acc_0.6_to_0.9']} / {t['acc_at_least_0.9']} | "
                f"{t['effective_sparsity_mean']:.3f} |"
            )
    acc = summary["trained_test_acc_mean"]
    lines += [
        "",
        "Test accuracy before pruning (mean): " + ", ".join(f"{REG_LABELS[r]} {acc[r]:.3f}" for r in REGULARIZERS) + ".",
    ]
    return "\n".join(lines) + "\n"


def plot(runs: Dict[str, Dict], summary: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    g = torch.Generator().manual_seed(0)
    for ax, method in zip(axes[:2], PRUNING_METHODS):
        for i, reg in enumerate(REGULARIZERS):
            m = runs[reg]["methods"][method]
            acc = torch.tensor(m["finetuned_test_acc"])
            col = torch.tensor(m["collapsed"])
            jitter = (torch.rand(acc.shape[0], generator=g) - 0.5) * 0.5
            ax.scatter((i + jitter)[~col], acc[~col], s=10, alpha=0.6, color="tab:blue", label="connected" if i == 0 else None)
            ax.scatter((i + jitter)[col], acc[col], s=10, alpha=0.6, color="tab:red", label="collapsed" if i == 0 else None)
        ax.set_xticks(range(len(REGULARIZERS)), [REG_LABELS[r] for r in REGULARIZERS])
        ax.set_ylim(0.3, 1.02)
        ax.set_ylabel("fine-tuned test accuracy")
        ax.set_title(f"{METHOD_LABELS[method]} pruning ({summary['config']['sparsity']:.0%} per layer)")
        ax.legend(loc="lower right", fontsize=8)
    ax = axes[2]
    width = 0.2
    for j, method in enumerate(PRUNING_METHODS):
        ours = [summary["table"][method][r]["collapses"] for r in REGULARIZERS]
        paper = [PAPER_COLLAPSES[method][r] for r in REGULARIZERS]
        xs = torch.arange(len(REGULARIZERS)).float() + (j - 0.5) * 2 * width
        ax.bar(xs - width / 2, ours, width, label=f"{METHOD_LABELS[method]} (ours)", color=["tab:blue", "tab:orange"][j])
        ax.bar(xs + width / 2, paper, width, label=f"{METHOD_LABELS[method]} (paper)", color=["tab:blue", "tab:orange"][j], alpha=0.4, hatch="//")
    ax.set_xticks(range(len(REGULARIZERS)), [REG_LABELS[r] for r in REGULARIZERS])
    ax.set_ylabel(f"layer collapses (of {summary['config']['inits']})")
    ax.set_title("Layer collapse")
    ax.legend(fontsize=8)
    fig.tight_layout()
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def run(cfg: Config, out_dir: str) -> Dict:
    """Run (or resume) the experiment and write runs_*.json, summary.json, results.md, figure."""
    torch.set_num_threads(1)  # the benchmark machine is shared; the batched loop is tiny anyway
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(cfg.data_seed)
    data = (make_data(cfg.n_train, gen, cfg.gaussian_params), make_data(cfg.n_test, gen, cfg.gaussian_params))
    runs = {}
    for reg in REGULARIZERS:
        path = os.path.join(out_dir, f"runs_{reg}.json")
        if os.path.exists(path):
            with open(path) as f:
                cached = json.load(f)
            if cached.get("config_key") == cfg.key():
                print(f"[{reg}] done already ({path}), skipping")
                runs[reg] = cached
                continue
        print(f"[{reg}] training {cfg.inits} MLPs for {cfg.epochs} epochs ...", flush=True)
        runs[reg] = run_regularizer(reg, cfg, data)
        _write_atomic(path, json.dumps(runs[reg]))
        print(f"[{reg}] {runs[reg]['seconds']:.1f} s", flush=True)
    summary = summarize(runs, cfg)
    _write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    _write_atomic(os.path.join(out_dir, "results.md"), markdown(summary))
    plot(runs, summary, os.path.join(out_dir, "layer_collapse.png"))
    print(markdown(summary))
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inits", type=int, default=Config.inits, help="number of initializations")
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--finetune-epochs", type=int, default=Config.finetune_epochs)
    p.add_argument("--n-train", type=int, default=Config.n_train)
    p.add_argument("--n-test", type=int, default=Config.n_test)
    p.add_argument("--gaussian-params", choices=("variance", "std"), default=Config.gaussian_params,
                   help="read N(0, 2I) and N(0, 0.25) as variances (default) or standard deviations")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    a = p.parse_args(argv)
    if a.inits < 1 or a.epochs < 1 or a.finetune_epochs < 1:
        p.error("--inits, --epochs and --finetune-epochs must be positive")
    cfg = Config(inits=a.inits, epochs=a.epochs, finetune_epochs=a.finetune_epochs, n_train=a.n_train,
                 n_test=a.n_test, gaussian_params=a.gaussian_params)
    run(cfg, a.out)


if __name__ == "__main__":
    main()
