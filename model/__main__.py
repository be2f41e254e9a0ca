"""`python -m model [params.yaml] [--num-classes C]`: parameter count per component."""

from __future__ import annotations

import argparse

import yaml

from model.mihf_tr import MiHFTr, ModelConfig, components, count_parameters

PAPER_TOTAL = 3_419_074  # paper §5


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    ap.add_argument("params", nargs="?", default="params.yaml", help="params file (its `model:` section)")
    ap.add_argument("--num-classes", type=int, default=None, help="default: data.classes, else 3")
    args = ap.parse_args(argv)
    with open(args.params) as f:
        params = yaml.safe_load(f) or {}
    config = ModelConfig.from_params(params.get("model"))
    num_classes = args.num_classes or int((params.get("data") or {}).get("classes", 3))
    model = MiHFTr(config, num_classes)
    counts = count_parameters(model)
    print(f"MiHF-Tr, num_classes {num_classes}, {args.params}: model = {config}")
    print(f"{'component':<20}{'parameters':>12}{'trainable':>12}")
    for name, mod in components(model):
        t = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        print(f"{name:<20}{counts[name]:>12,}{t:>12,}")
    total = counts["total"]
    print(f"{'total':<20}{total:>12,}{counts['trainable']:>12,}")
    print(f"paper total {PAPER_TOTAL:,}: {total - PAPER_TOTAL:+,} ({100 * (total / PAPER_TOTAL - 1):+.2f}%)")


if __name__ == "__main__":
    main()
