"""Fine-tune the top of a network on cached maps: `finetune --from-cache CACHE`.

`extract --maps TAP` keeps one tap's unpooled maps. This trains only the layers after that tap,
and the new head, on them: images are not decoded and the frozen network below the tap is not
run again, so an epoch costs the top's compute alone (fastai's `precompute` did this for the
head). A multi-view cache is its own augmentation: each epoch draws one cached view per image,
and scoring averages an image's views, as test-time augmentation over the same views would.

The network is cut by replacing every module up to the tap with a pass-through. That is right
only for a network that runs its modules in order on one tensor, so `cut` first checks on a
random input that the cut network on the tap's output gives the whole network's output, and
refuses a network for which it does not. The model saved is the whole network, its trunk
untouched, so `predict` and `evaluate` run it on images like any fine-tuned model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bottleneck import backbones, data, leaks, networks
from bottleneck.console import note, warn
from bottleneck.errors import BottleneckError
from bottleneck.finetune_data import fold_tensors
from bottleneck.finetune_loop import Run, stop_before_training
from bottleneck.finetune_probe import RunTest, init_head, probe_cost, read_probe
from bottleneck.settings import FinetuneSettings
from bottleneck.store import FeatureStore
from bottleneck.views import cached_views


def top_run(s: FinetuneSettings, args: dict, dev: torch.device, prec: str, rank: int, world: int,
            out_dir) -> tuple[Run, tuple]:
    """A run on a cache's maps, and what its report needs (as finetune.image_run)."""
    with stop_before_training(), FeatureStore(s.from_cache) as st:
        check_cache(st, s)
        note(f"reading the maps of {st.map_tap} from {s.from_cache}")
        images, paths, folds = {}, {}, None
        for split in st.splits if s.folds else ("train", "val", "test"):
            images[split], paths[split] = read_maps(st, split)
        attrs, groups = dict(st.attrs), st.groups()
    if s.folds:
        images, paths, folds = fold_tensors(images, paths, s.folds, s.fold, s.split_seed, s.val_fraction,
                                            attrs["classes"], groups)
    twins = None
    if rank == 0:
        with FeatureStore(s.from_cache) as st:
            twins = leaks.check_cache(st, paths["train"], paths["test"])
    if warning := leaks.warning(twins):
        warn(warning)
    net = networks.build_model(s.model, s.weights)
    head = networks.replace_head(net, s.model, len(attrs["classes"]), s.seed)
    if s.init_head:  # LP-FT of the top: a probe on this cache's penultimate tap sees what the head will
        test = RunTest(attrs["dataset_fingerprint"], attrs["data_root"], paths["test"])
        init_head(net, head, read_probe(s.init_head, s.model, s.weights, attrs["classes"], attrs["preprocessing"],
                                        test, s.trust))
    trunk = cut(net, s.model, attrs["maps"]["tap"], attrs["preprocessing"]["size"])
    note(f"training the layers after {attrs['maps']['tap']} on cached maps: "
         f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, the "
         f"{sum(p.numel() for m in trunk.values() for p in m.parameters()) / 1e6:.2f} M below stay as they are")
    run = TopRun(args, net.to(dev), head, images, attrs["preprocessing"], dev, prec, rank, world, out_dir)
    run.trunk, run.views = trunk, attrs.get("views", "none")
    cost = (attrs.get("cost") or {}).get("wall_seconds")
    return run, (attrs["classes"], attrs["split_info"], attrs["data_root"], paths["test"],
                 {"preprocessing": attrs["preprocessing"], "tap": attrs["maps"]["tap"],
                  "from_cache": {"path": str(s.from_cache), "views": run.views, "fingerprint": attrs["fingerprint"]},
                  "cache_cost_seconds": cost, "folds": folds, "twins": twins,
                  "probe_cost_seconds": probe_cost(s.init_head, attrs["fingerprint"]) if s.init_head else None})


def check_cache(st: FeatureStore, s: FinetuneSettings) -> None:
    """The cache holds maps of this model, weights, data and splits, with a split to validate on."""
    a = st.attrs
    if st.map_tap is None:
        raise BottleneckError(f"--from-cache {st.path} holds no maps; extract with --maps TAP to keep a tap's maps")
    if a["model"] != s.model:
        raise BottleneckError(f"--from-cache {st.path} holds {a['model']} maps, not {s.model}'s")
    if a["weights"] != backbones.resolve_weights(s.model, s.weights).id:
        raise BottleneckError(f"--from-cache {st.path} was extracted with other weights ({a['weights']})")
    manifest = data.load_manifest(s.data_dir, s.val_fraction, s.test_fraction, s.split_seed, s.group_pattern)
    if data.dataset_fingerprint(manifest) != a["dataset_fingerprint"]:
        raise BottleneckError(f"--from-cache {st.path} was extracted from other data or other splits than "
                              f"{s.data_dir} with these fractions and seed")
    for split in () if s.folds else ("train", "val", "test"):  # folds pool whatever splits it has
        if split not in st.splits:
            raise BottleneckError(f"--from-cache {st.path} has no {split} split; extract with --val-fraction and "
                                  "--test-fraction to carve one")


def read_maps(st: FeatureStore, split: str) -> tuple[tuple[torch.Tensor, torch.Tensor], list[str]]:
    """((maps, labels), paths) of a split, maps as images × views × the map's shape (float16)."""
    v = st.n_views
    maps, labels, views = st.maps(split), st.labels(split), st.views(split)
    if len(labels) % v or not np.array_equal(views, np.tile(np.arange(v), len(labels) // v)):
        raise BottleneckError(f"{st.path}: the rows of {split} are not each image's {v} views in order")
    maps = torch.from_numpy(maps).view(len(labels) // v, v, *maps.shape[1:])
    return (maps, torch.from_numpy(labels[::v].astype(np.int64))), st.paths(split)[::v]


# --------------------------------------------------------------------------- cutting the network

def entries(net: nn.Module) -> list[str]:
    """The network's modules in the order they were built, containers opened one level
    (blocks.0, blocks.1, ...), parameter-free ones (pools, activations) included."""
    found = []
    for name, child in net.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            found += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            found.append(name)
    return found


def cut(net: nn.Module, model: str, tap: str, size: int) -> dict[str, nn.Module]:
    """Replace every module up to `tap` by a pass-through, so that `net` takes the tap's output;
    returns the removed modules by name (`restore` puts them back). Refused unless the cut network
    on the tap's output gives what the whole network gives on an image."""
    where = backbones.get_spec(model).taps[tap]
    order = entries(net)
    inside = [i for i, e in enumerate(order) if e == where.module or e.startswith(where.module + ".")]
    if where.hook != "output" or not inside:
        raise BottleneckError(f"{model} cannot be cut at {tap} (not the output of one of its blocks); "
                              "extract the maps of another tap")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.eval()
        want, found = net(x), {}
        hook = net.get_submodule(where.module).register_forward_hook(lambda m, args, out: found.update(out=out.clone()))
        net(x)
        hook.remove()
        removed = {name: net.get_submodule(name) for name in order[:inside[-1] + 1]}
        for name in removed:
            replace_module(net, name, nn.Identity())
        try:
            got = net(found["out"])
        except Exception:  # its forward reshapes or mixes the input before the first layer
            got = None
    if got is None or got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
        restore(net, removed)
        raise BottleneckError(f"{model} does not run its layers in order around {tap} (its output depends on more "
                              "than that tap's), so its top cannot be trained on cached maps")
    return removed


def restore(net: nn.Module, removed: dict[str, nn.Module]) -> None:
    for name, module in removed.items():
        replace_module(net, name, module)


def replace_module(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


# --------------------------------------------------------------------------- training

class TopRun(Run):
    """A fine-tuning run whose inputs are cached maps (images × views × map) instead of images."""

    trunk: dict[str, nn.Module]  # the modules below the tap, set aside on the CPU
    views: str  # the cache's views

    def train_inputs(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One cached view per image (the image itself with --augment none), drawn from the step's generator."""
        maps = self.images["train"][0][idx]
        pick = (torch.zeros(len(idx), dtype=torch.long) if self.args["augment"] == "none" else
                torch.randint(maps.shape[1], (len(idx),), generator=gen))
        x = maps[torch.arange(len(idx)), pick][self.rank::self.world]
        return x.to(self.dev, torch.float32, non_blocking=True)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, views: str) -> torch.Tensor:
        """Softmax probabilities averaged over the cached views (the first alone for "none")."""
        self.net.eval()
        autocast = torch.autocast(self.dev.type, dtype=networks.AUTOCAST.get(self.precision),
                                  enabled=self.precision in networks.AUTOCAST)
        out = []
        for start in range(0, len(x), self.args["batch_size"] * 2):
            maps = x[start:start + self.args["batch_size"] * 2]
            maps = cached_views(maps, views)
            with autocast:
                logits = self.net(maps.flatten(0, 1).to(self.dev, torch.float32)).float()
            out.append(logits.softmax(1).view(len(maps), maps.shape[1], -1).mean(1).cpu())
        return torch.cat(out)

    def tta_views(self) -> str:
        return self.views if self.args["tta"] else "none"

    def whole_network(self) -> dict:
        """The trained top with the untouched trunk put back: a network that takes images."""
        restore(self.net, self.trunk)
        try:
            return {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        finally:
            for name in self.trunk:
                replace_module(self.net, name, nn.Identity())
