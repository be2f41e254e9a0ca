"""Milliseconds per step of one `predict` on CPU, with the preprocessing params of params.yaml.

    python -m benchmarks.predict [--model models/mihf_tr.pt] [--clips 10]

Needs the dataset of params.yaml on disk (`dvc repro synthesize` for the default). Uses the model
file when it exists, else an untrained model of params.yaml's `model` config written to a temp file
(the same cost: the weights' values do not change the work). Runs predict's own code on clip folders
as a user's run does (torch on one thread: `predict.predict_frames`): prints the one-off start-up (imports,
model load), the first clip (caches filled on first use) and the median of each step over the other
clips, and the load average, since other processes on the cores slow every step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "mihf_tr.pt")
    parser.add_argument("--clips", type=int, default=10)
    args = parser.parse_args()

    start = time.perf_counter()
    import torch  # imported here to time the start-up a user's first prediction pays

    from mer.common import load_params
    from mer.datasets import dataset_from_params
    from model import MiHFTr, ModelConfig, predict
    from model.checkpoint import save_checkpoint

    imports = time.perf_counter() - start
    params = load_params(REPO / "params.yaml")
    data = params["data"]
    dataset = dataset_from_params(dict(data, root=REPO / data["root"]))
    samples = dataset.samples()[: args.clips + 1]
    with tempfile.TemporaryDirectory() as tmp:
        model_file, note = args.model, str(args.model)
        if not model_file.is_file():
            torch.manual_seed(0)
            net = MiHFTr(ModelConfig.from_params(params["model"]), len(dataset.classes))
            model_file, note = Path(tmp) / "untrained.pt", "untrained, params.yaml model config"
            save_checkpoint(model_file, net, list(dataset.classes), params, {})
        start = time.perf_counter()
        net, info, faces = predict.load_model(model_file, "cpu")
        load = time.perf_counter() - start
    timings = [predict.predict_input(net, info, faces, str(s.folder), str(s.onset), str(s.apex),
                                     f"{s.subject}/{s.sample}")[0]["timings_ms"] for s in samples]
    magnify = info["params"]["magnify"]
    print(f"predict on CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}): magnify "
          f"{magnify['method']} x{magnify['alpha']}, model: {note}")
    print(f"start-up: imports {1000 * imports:.0f} ms, model + predictor load {1000 * load:.0f} ms")
    print(f"{'step':<16} {'first clip':>10} {f'median of {len(timings) - 1}':>12}  (ms)")
    for step in timings[0]:
        rest = [t[step] for t in timings[1:]] or [float("nan")]
        print(f"{step:<16} {timings[0][step]:>10.1f} {statistics.median(rest):>12.1f}")


if __name__ == "__main__":
    main()
