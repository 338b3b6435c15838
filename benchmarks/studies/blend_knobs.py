"""Do the calibration set size and a per-layer balance act on CoNNect's ranking?

Before tuning a knob, check that it acts. **Calibration set size.** This script scores every channel group of a committed
ranking base model at the first pruning step, as ``ConnectImportance`` does inside the ranking
benchmark (the mean cross-entropy gradient over the calibration images, then one call per group),
for several calibration sets, and compares each ranking with the one from the largest set:

- Spearman rank correlation per group (mean and minimum over the groups), and
- the overlap of the bottom 25 % of the global ranking (the channels a global step cuts first).

Two draws of the protocol's size (256) give the sampling noise to read the other sizes against.
It also records the lambda each set resolves ``balance`` to: the loss Taylor mass of a trained model
shrinks as the set grows, so the same kappa means a different lambda (the blend's mass ratio, which
kappa fixes, does not move).

**Per-layer balance.** ``balance`` sets one lambda for the whole model from the summed masses. A
per-layer balance would give each layer the ratio kappa by itself. Whether that can change the
ranking shows in the kappa each layer gets from the global lambda, ``lam * C_l / L_l`` (``L_l``,
``C_l``: the layer's loss and connectivity Taylor masses, ``sum |W * dL/dW|`` and
``sum |W * d log phi_tot / dW|``, on the protocol's 256-image set): if every layer's kappa lies where
the ranking no longer moves with kappa, a per-layer balance cannot move it either.

    python -m benchmarks.studies.blend_knobs --threads 1 --data-dir /usr/share/datasets/fashion-mnist
    python -m benchmarks.studies.blend_knobs --threads 1 --resume ...    # continue an interrupted run

Results: ``benchmarks/results/blend_knobs/{results.json,table.md}``; each (kappa, set) is written
as it finishes (the per-layer masses last) and ``--resume`` skips those present (without it an existing file is refused).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from connect_tp.data import load_datasets
from benchmarks.resumable import open_results
from connect_tp.pipeline.files import atomic_write, atomic_write_json
from connect_tp.pruning import build_importance, calibration_batches, calibration_gradients
from connect_tp.training import load_model_checkpoint

# (name, images, draw seed); the last is the reference every other set is compared with.
DEFAULT_SETS = ("64:11", "256:0", "256:12", "1024:13", "4096:14")


def _parse_set(text: str) -> tuple:
    try:
        size, seed = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a calibration set is SIZE:SEED, e.g. 256:0; got {text!r}") from None
    if size < 1 or seed < 0:
        raise argparse.ArgumentTypeError(f"SIZE must be >= 1 and SEED >= 0, got {text!r}")
    return size, seed


def first_step_scores(base: str, method: str, batches) -> tuple:
    """Every group's channel scores at the first step of a global pruning loop, and the lambda used."""
    import torch_pruning as tp

    model = load_model_checkpoint(base)[0].eval()
    example = torch.rand(1, 1, 32, 32)
    importance = build_importance(method, example)
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, global_pruning=True,
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    calibration_gradients(model, batches)
    groups = pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                      root_module_types=pruner.root_module_types)
    return [importance(g).detach().double() for g in groups], importance.lam


def layer_masses(base: str, batches, lam: float) -> List[Dict[str, Any]]:
    """Per conv/linear layer: loss and connectivity Taylor masses and the kappa ``lam`` gives the layer."""
    from connect_tp.connectivity import log_connectivity

    model = load_model_checkpoint(base)[0].eval()
    calibration_gradients(model, batches)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    log_phi = log_connectivity(model, torch.rand(1, 1, 32, 32), bn_flow="gamma")
    grads = torch.autograd.grad(log_phi, [m.weight for _, m in layers])
    out = []
    for (name, m), g_phi in zip(layers, grads):
        loss_mass = float((m.weight.detach() * m.weight.grad).abs().sum())
        conn_mass = float((m.weight.detach() * g_phi).abs().sum())
        out.append({"layer": name, "loss_mass": loss_mass, "connectivity_mass": conn_mass,
                    "kappa_of_layer": lam * conn_mass / loss_mass})
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def bottom_overlap(scores: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], share: float = 0.25) -> float:
    """Shared fraction of the ``share`` lowest channels of the two global rankings."""
    def bottom(groups):
        flat = torch.cat(list(groups))
        return set(flat.argsort()[: int(share * len(flat))].tolist())
    low, ref = bottom(scores), bottom(reference)
    return len(low & ref) / len(ref)


def compare(scores: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> Dict[str, float]:
    rho = [spearman(a, b) for a, b in zip(scores, reference) if len(a) > 2]
    return {"spearman_mean": sum(rho) / len(rho), "spearman_min": min(rho),
            "bottom25_overlap": bottom_overlap(scores, reference)}


def table(runs: Dict[str, Any], kappas: Sequence[str], sets: Sequence[tuple]) -> str:
    ref = f"{sets[-1][0]} images (draw {sets[-1][1]})"
    lines = [f"Compared with the ranking from {ref}; the rows of one kappa share the base model.", "",
             "| kappa | calibration images (draw) | lambda | Spearman per group, mean / min | bottom-25 % overlap |",
             "|---|---|---|---|---|"]
    for kappa in kappas:
        for size, seed in sets:
            run = runs.get(f"k{kappa}/{size}:{seed}")
            if run is not None:
                lines.append(f"| {kappa} | {size} ({seed}) | {run['lam']:.2f} | {run['spearman_mean']:.3f} / "
                             f"{run['spearman_min']:.3f} | {run['bottom25_overlap']:.2f} |")
    return "\n".join(lines) + "\n"


def layer_table(layers: Dict[str, Any]) -> str:
    kappas = [row["kappa_of_layer"] for row in layers["per_layer"] if row["layer"] != "fc"]
    ratios = [row["loss_mass"] / row["connectivity_mass"] for row in layers["per_layer"] if row["layer"] != "fc"]
    return (f"\nPer-layer balance at kappa = {layers['kappa']} (lambda {layers['lam']:.2f}, 256 images, draw 0), over the "
            f"{len(kappas)} convolutions: loss / connectivity Taylor mass {min(ratios):.2f} to {max(ratios):.2f}; the kappa "
            f"each layer gets from the global lambda {min(kappas):.0f} to {max(kappas):.0f} (median "
            f"{sorted(kappas)[len(kappas) // 2]:.0f}).\n")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=os.path.join("benchmarks", "results", "ranking", "seed0", "base.pt"))
    p.add_argument("--kappas", nargs="+", default=["1", "100"], help="balances to score with (bn_flow gamma)")
    p.add_argument("--sets", nargs="+", type=_parse_set, default=[_parse_set(s) for s in DEFAULT_SETS],
                   help="calibration sets as SIZE:SEED; the last one is the reference")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "blend_knobs"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path, stored = open_results(args.out, args.resume, base=args.base, reference=list(args.sets[-1]))
    runs: Dict[str, Any] = stored.get("runs", {})
    train_set, _, _ = load_datasets("fashion_mnist", args.data_dir, False, None, None, augment=False)
    for kappa in args.kappas:
        method = f"connect-k{kappa}-bngamma"
        ref_size, ref_seed = args.sets[-1]
        if all(f"k{kappa}/{size}:{seed}" in runs for size, seed in args.sets):
            continue  # finished before: the reference is not recomputed
        reference, ref_lam = first_step_scores(args.base, method, calibration_batches(train_set, ref_size, seed=ref_seed))
        for size, seed in args.sets:
            key = f"k{kappa}/{size}:{seed}"
            if key in runs:
                continue
            start = time.time()
            if (size, seed) == (ref_size, ref_seed):
                scores, lam = reference, ref_lam
            else:
                scores, lam = first_step_scores(args.base, method, calibration_batches(train_set, size, seed=seed))
            runs[key] = dict(compare(scores, reference), kappa=kappa, size=size, draw=seed, lam=lam,
                             seconds=time.time() - start, threads=args.threads,
                             load_avg_1min=os.getloadavg()[0])
            print(f"{key}: lambda {lam:.2f}, " + ", ".join(f"{k} {runs[key][k]:.3f}" for k in
                                                          ("spearman_mean", "spearman_min", "bottom25_overlap")), flush=True)
            atomic_write_json(dict(stored, base=args.base, reference=list(args.sets[-1]), runs=runs), path)
    layers = stored.get("layers")
    if layers is None:
        default_kappa = "100"
        lam = runs[f"k{default_kappa}/256:0"]["lam"] if f"k{default_kappa}/256:0" in runs else \
            first_step_scores(args.base, f"connect-k{default_kappa}-bngamma", calibration_batches(train_set, 256, seed=0))[1]
        layers = {"kappa": default_kappa, "lam": lam,
                  "per_layer": layer_masses(args.base, calibration_batches(train_set, 256, seed=0), lam)}
        atomic_write_json(dict(stored, base=args.base, reference=list(args.sets[-1]), runs=runs, layers=layers), path)
    text = table(runs, args.kappas, args.sets) + layer_table(layers)
    atomic_write(os.path.join(args.out, "table.md"), lambda f: f.write(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
