"""How stable `fit`'s default choices are on elpv: across split seeds and the two CPUs' features.

    python benchmarks/layer_choice.py --work /tmp/layer-choice [--seeds 0,1,2] [--precisions fp32,bf16]
                                      [--fit-args "--clf auto"] [--label before]

For each split seed, `bottleneck data elpv --split-seed S` writes the split; for each precision,
EfficientNet-Lite0 features of every default tap are extracted once (fp32 is what `--precision
auto` computes on a CPU without AVX-512 BF16, bf16 what it computes on one with it: the two
machines' features, on one machine), and the plain `bottleneck fit --features CACHE` (plus
--fit-args) is run. Prints, per run, the tap (and classifier) it chose, the candidates' scores
and the test accuracy with its interval, then how often the choice differs between the two
precisions of one split; appends the rows to WORK/layer_choice.json under --label.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from bottleneck import data
from bottleneck.cli import app


def run(args: list[str]) -> str:
    from typer.testing import CliRunner

    done = CliRunner().invoke(app, args)
    if done.exit_code != 0:
        raise SystemExit(f"bottleneck {' '.join(args)} failed:\n{done.output}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--fit-args", default="", help="More fit options, e.g. \"--clf auto\".")
    ap.add_argument("--label", default="default", help="Name of this set of runs in layer_choice.json.")
    a = ap.parse_args()
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        tree = a.work / f"elpv-seed{seed}"
        if not (tree / "train").is_dir():
            data.write_elpv(tree, seed)
        for precision in a.precisions.split(","):
            cache = run(["extract", "--model", "efficientnet_lite0", "--data", str(tree), "--precision", precision,
                         "--out", str(a.work / "cache"), "--no-progress"])
            out = a.work / "runs" / a.label / f"seed{seed}-{precision}"
            report = json.loads(Path(run(["fit", "--features", cache, "--out", str(out), "--force",
                                          *shlex.split(a.fit_args)])).read_text())
            choice = (report.get("extra") or {}).get("layer_choice") or report.get("layer_choice") or {}
            rows.append({"label": a.label, "seed": seed, "precision": precision, "tap": report["tap"],
                         "clf": report["clf"], "choice": choice, "accuracy": report["accuracy"],
                         "accuracy_ci": report["accuracy_ci"]})
            r = rows[-1]
            print(f"seed {seed} {precision}: {r['clf']} on {r['tap']}, test {r['accuracy']:.3f} "
                  f"({r['accuracy_ci'][0]:.3f}-{r['accuracy_ci'][1]:.3f}); scores {choice.get('scores')}", flush=True)
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], set()).add((r["tap"], r["clf"]))
    flips = sum(len(choices) > 1 for choices in by_seed.values())
    print(f"the choice differs between precisions for {flips} of {len(by_seed)} split seeds")
    record = a.work / "layer_choice.json"
    kept = json.loads(record.read_text()) if record.is_file() else []
    record.write_text(json.dumps([k for k in kept if k["label"] != a.label] + rows, indent=1))


if __name__ == "__main__":
    main()
