"""Stage `fit` (dvc.yaml): the final model, trained on ALL subjects with the LOSO recipe, for `predict`.

The training is model/loso.py's `fit_final` (the same engine functions as every LOSO fold). Writes
`models/mihf_tr.pt` (model/checkpoint.py: weights with the stems, config, class names, the
preprocessing params, package versions) and `models/mihf_tr.json`, the model card: dataset, sample /
subject / class counts, the LOSO metrics of the same run (what to expect on a new subject), and a
hash of the params that made the model; and `data/fit_features.h5`, the final model's fused feature
F_ME of every sample (in-sample: one model's feature space, for the t-SNE report).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from mer.common import atomic_path, load_params, run_main, stage_paths, write_h5
from model.checkpoint import save_checkpoint
from model.loso import fit_final


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("fit", ["processed", "loso", "model", "card", "features"], argv)
    params = load_params()
    final = fit_final(params, paths.processed)
    card = final.card
    loso = json.loads(paths.loso.read_text()) if paths.loso.exists() else {}
    card["loso"] = {k: loso[k] for k in ("uf1", "uar", "accuracy", "n_folds") if k in loso}
    save_checkpoint(paths.model, final.net, final.classes, params, card)
    with atomic_path(paths.card) as tmp:
        tmp.write_text(json.dumps(card, sort_keys=True, indent=2) + "\n")
    write_h5(paths.features, final.features, final.features_attrs)
    print(f"fit: MiHF-Tr on all {card['n_samples']} samples of {card['n_subjects']} subjects "
          f"(LOSO UF1 {card['loso'].get('uf1', float('nan')):.4f}) -> {paths.model}, {paths.card}, "
          f"{paths.features}")


if __name__ == "__main__":
    run_main(main)
