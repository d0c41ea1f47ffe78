import warnings

import torch

from bottleneck import data, runtime


def test_workers_beyond_the_usable_cpus_are_capped_with_one_note_and_no_torch_warning(tmp_path, capsys):
    cpus = runtime.usable_cpus()
    assert runtime.workers(None) == runtime.default_workers() <= cpus
    assert runtime.workers(1) == 1
    assert runtime.workers(64) == min(64, cpus)
    if cpus < 64:
        assert f"--workers 64: this process may use {cpus} CPUs" in capsys.readouterr().err
    dataset = data.ImageDataset(str(tmp_path), [], {"size": 8, "resize": 8, "crop": False,
                                                    "interpolation": "bilinear"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about more workers than CPUs when creating the iterator
        iter(torch.utils.data.DataLoader(dataset, num_workers=runtime.workers(64)))
