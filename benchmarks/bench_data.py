"""Data-loader throughput against the model's own train step, at the same size, on real PBC images.

    BLOODCELL_DATA=../shared/data .venv/bin/python benchmarks/bench_data.py [--size 128] [--n 1024] [--bs 64]

Prints a markdown table row per configuration; the ratio column is loader images/s divided by the train-step
images/s measured in the same run (> 1 means the loader keeps the model busy). Configurations: raw JPEG decoding
(fastai's default path, `use_cache=False`) and the presize cache, each with the batch augmentation included.
"""
import argparse, os, time, shutil, tempfile, json
import torch
from bloodcell_fastai.data import load_items, split_items, cell_dataloaders
from bloodcell_fastai.models import create_model
from bloodcell_fastai.train import resolve_precision


def loader_rate(dls, n_batches):
    "Images/s of iterating the training DataLoader, batch augmentation included (batch tfms run in the loop)."
    it = iter(dls.train); next(it)                                   # start the workers, first batch excluded
    t, n = time.perf_counter(), 0
    for i, (xb, yb) in enumerate(it):
        n += len(xb)
        if i+1 >= n_batches: break
    return n/(time.perf_counter()-t)


def step_rate(size, bs, precision, n_steps=8, arch='resnet18'):
    "Images/s of a bare train step (forward, loss, backward, SGD step) on pre-made tensors."
    model = create_model(arch, 8).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 8, (bs,))
    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision=='bf16'):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward(); opt.step(); opt.zero_grad()
    for _ in range(2): step()
    t = time.perf_counter()
    for _ in range(n_steps): step()
    return n_steps*bs/(time.perf_counter()-t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--size', type=int, default=128); p.add_argument('--bs', type=int, default=64)
    p.add_argument('--n', type=int, default=1024, help='images drawn from the PBC sample')
    a = p.parse_args()
    os.environ['BLOODCELL_CACHE'] = tempfile.mkdtemp()                 # cold cache: the presize cost is measured too
    items = load_items('pbc').sample(a.n, random_state=0)
    df = split_items(items, valid_pct=0.1, test_pct=0.0, seed=0)
    prec = resolve_precision('auto')
    steps = step_rate(a.size, a.bs, prec)
    nb = max(4, int(len(df[df.split=='train'])*0.9)//a.bs)
    rows = []
    for name, cache, nw in [('raw JPEG, 0 workers', False, 0), ('raw JPEG, 2 workers', False, 2),
                            ('presize cache, 0 workers', True, 0), ('presize cache, 2 workers', True, 2)]:
        t = time.perf_counter()
        dls = cell_dataloaders(df, size=a.size, bs=a.bs, use_cache=cache, num_workers=nw)
        setup = time.perf_counter()-t
        r = loader_rate(dls, nb)
        rows.append((name, setup, r))
    print(f"| data path | set-up s ({a.n} images) | loader img/s | train step img/s ({prec}) | loader / step |")
    print("|---|---|---|---|---|")
    for name, setup, r in rows: print(f"| {name} | {setup:.1f} | {r:.0f} | {steps:.0f} | {r/steps:.2f} |")
    shutil.rmtree(os.environ['BLOODCELL_CACHE'], ignore_errors=True)


if __name__ == '__main__': main()
