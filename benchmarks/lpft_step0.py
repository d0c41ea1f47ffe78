"""Step 0 of LP-FT: the network with a probe folded into its head, scored before any training.

    python benchmarks/lpft_step0.py runs/elpv-paths/fit/efficientnet_lite0/pool-logreg-search/model.skops
    python benchmarks/lpft_step0.py PROBE --precision fp32 --views none dihedral

The probe (a `bottleneck fit --clf logreg` model on the model's penultimate tap) is folded into
a new head exactly as `finetune --init-head` folds it; the test images its cache lists are
decoded and scored with each test-time view setting and precision asked for. Step 0 is what
LP-FT starts from: if it falls below the probe, fine-tuning starts by repairing the head.
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import torch

from bottleneck import finetune_data, networks, trained
from bottleneck.finetune_probe import init_head, read_probe
from bottleneck.store import FeatureStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe")
    ap.add_argument("--views", nargs="+", default=["none", "dihedral"])
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args()
    probe = trained.load_classifier(args.probe)
    prov, model = probe.meta, probe.model
    with FeatureStore(prov["cache"]) as st:
        step, root = st.n_views, st.attrs["data_root"]  # one row per image, whatever the cache's views
        paths, y = st.paths("test")[::step], st.labels("test")[::step]
        x = np.hstack([st.features("test", t) for t in probe.taps])
    own = np.asarray(probe.pipe.predict_proba(x)).reshape(len(y), step, -1).mean(1).argmax(1)
    print(f"{platform.processor() or platform.machine()}; probe {args.probe} ({prov.get('views', 'none')} views "
          f"in its cache): test accuracy {np.mean(own == y):.4f} on {len(y)} images")
    images, labels, _ = finetune_data.load_images(root, list(zip(paths, y.tolist())), probe.preprocessing, None,
                                                  False)
    net = networks.build_model(model)
    head = networks.replace_head(net, model, len(probe.classes))
    init_head(net, head, read_probe(args.probe, model, "DEFAULT", prov["classes"], probe.preprocessing))
    for views in args.views:
        probs = networks.predict_proba(net.eval(), images, probe.preprocessing, torch.device("cpu"),
                                        args.precision, views)
        chosen = probs.argmax(1).numpy()
        print(f"step 0, {args.precision}, test-time views {views}: accuracy {np.mean(chosen == labels.numpy()):.4f}, "
              f"same label as the probe for {np.mean(chosen == own):.4f}")


if __name__ == "__main__":
    main()
