"""Projection throughput of condiff's projectors against traker's BasicProjector, side by side in one run.

The gradients are those of a model's parameter count (default: condiff's `unet8`, the digits UNet), the
projection is to k dimensions (default 2048), float32 on the CPU (or `--device`). traker's BasicProjector
regenerates its random matrix block by block for every batch; condiff's make theirs once per model
(construction timed separately) and then only multiply (Gaussian) or scatter-add (sparse JL).

    .venv/bin/python benchmarks/projection.py [--batch-size 32] [--dim 2048] [--rounds 3] [--skip-gaussian]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from condiff.attribution.projector import GaussianProjector, SparseProjector
from condiff.models import build_model


def timed(function, rounds: int) -> float:
    """The median wall time of `function()` over `rounds` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def built_and_timed(build, gradients: torch.Tensor, rounds: int) -> tuple[float, float]:
    """(seconds to build the projector, median seconds to project one batch); the projector is freed after."""
    start = time.perf_counter()
    projector = build()
    construction = time.perf_counter() - start
    return construction, timed(lambda: projector.project(gradients), rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="unet8")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-gaussian", action="store_true", help="the dense matrix takes p * k * 4 bytes")
    args = parser.parse_args()
    from trak.projectors import BasicProjector, ProjectionType

    shape = {"unet8": (1, 8, 8), "unet28": (1, 28, 28), "unet32": (3, 32, 32)}[args.preset]
    params = sum(p.numel() for p in build_model(args.preset, shape).parameters())
    gradients = torch.randn(args.batch_size, params, generator=torch.Generator().manual_seed(0)).to(args.device)
    print(f"{args.preset}: {params:,} parameters -> {args.dim} dimensions, batch {args.batch_size}, "
          f"float32, {args.device}, torch threads {torch.get_num_threads()}")

    traker = BasicProjector(grad_dim=params, proj_dim=args.dim, seed=0, proj_type=ProjectionType.normal,
                            device=args.device, dtype=torch.float32)
    rows = [("traker BasicProjector (normal)", 0.0, timed(lambda: traker.project(gradients, model_id=0), args.rounds))]
    builders = {"condiff SparseProjector": lambda: SparseProjector(params, args.dim, seed=0, device=args.device)}
    if not args.skip_gaussian:
        builders["condiff GaussianProjector"] = lambda: GaussianProjector(params, args.dim, seed=0, device=args.device)
    for name, build in builders.items():
        rows.append((name, *built_and_timed(build, gradients, args.rounds)))

    baseline = rows[0][2]
    print(f"{'projector':<32} {'built once (s)':>15} {'per batch (s)':>14} {'images/s':>10} {'vs traker':>10}")
    for name, construction, per_batch in rows:
        print(f"{name:<32} {construction:>15.2f} {per_batch:>14.4f} {args.batch_size / per_batch:>10.1f} "
              f"{baseline / per_batch:>9.1f}x")


if __name__ == "__main__":
    main()
