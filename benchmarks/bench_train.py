"""Train-step throughput of our fastai learner against a bare PyTorch loop, bf16 against fp32, channels-last against contiguous, same run.

    .venv/bin/python benchmarks/bench_train.py [--size 128] [--bs 64] [--steps 12] [--arch resnet18]

Both loops train the same model (fresh copies of one initialisation) at the same size, batch and precision on the
same pre-made tensors, so the ratio isolates what the learner adds (callbacks, recorder, precision and memory-layout
callbacks) from data loading, which `bench_data.py` measures. The bare loop also runs in the contiguous (NCHW) memory
layout, to show what channels-last (the default of every run, `channels_last=True`) buys. Prints a markdown table.
"""
import argparse, time, copy
import torch
from torch.utils.data import TensorDataset
from fastai.vision.all import DataLoaders, DataLoader, Learner, CrossEntropyLossFlat, SGD
from bloodcell_fastai.models import create_model, bloodcell_splitter, get_arch
from bloodcell_fastai.train import precision_callbacks


def bare_rate(model, x, y, precision, steps, channels_last=True):
    "Images/s of a plain loop: forward (autocast when bf16), loss, backward, SGD step."
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, x = model.to(memory_format=fmt).train(), x.contiguous(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    def step(xb, yb):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision=='bf16'):
            out = model(xb)
        loss = torch.nn.functional.cross_entropy(out.float(), yb)
        loss.backward(); opt.step(); opt.zero_grad()
    bs = len(x)//steps
    step(x[:bs], y[:bs]); step(x[:bs], y[:bs])                           # warm-up
    t = time.perf_counter()
    for i in range(steps): step(x[i*bs:(i+1)*bs], y[i*bs:(i+1)*bs])
    return steps*bs/(time.perf_counter()-t)


def learner_rate(model, arch, x, y, precision, steps):
    "Images/s of `Learner.fit` over the same tensors, with our precision and channels-last callbacks."
    bs = len(x)//steps
    ds = TensorDataset(x, y)
    dls = DataLoaders(DataLoader(ds, bs=bs, shuffle=False, drop_last=True), DataLoader(TensorDataset(x[:bs], y[:bs]), bs=bs))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, lr=1e-3, splitter=bloodcell_splitter,
                    cbs=precision_callbacks(precision, True, get_arch(arch).is_cnn))
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)                                                    # warm-up epoch (also builds the optimizer)
        t = time.perf_counter(); learn.fit(1); dt = time.perf_counter()-t
    # one validation batch is included in `fit`; subtract nothing, so the ratio is conservative
    return steps*bs/dt


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--size', type=int, default=128); p.add_argument('--bs', type=int, default=64)
    p.add_argument('--steps', type=int, default=12); p.add_argument('--arch', default='resnet18')
    a = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.bs*a.steps, 3, a.size, a.size); y = torch.randint(0, 8, (a.bs*a.steps,))
    base = create_model(a.arch, 8)
    res = {}
    for prec in ('fp32', 'bf16'):
        res[('bare', prec)] = bare_rate(copy.deepcopy(base), x, y, prec, a.steps)
        res[('learner', prec)] = learner_rate(copy.deepcopy(base), a.arch, x, y, prec, a.steps)
        res[('nchw', prec)] = bare_rate(copy.deepcopy(base), x, y, prec, a.steps, channels_last=False)
    print(f"| {a.arch} {a.size}px bs {a.bs} | bare loop img/s | learner img/s | learner / bare |")
    print("|---|---|---|---|")
    for prec in ('fp32', 'bf16'):
        b, l = res[('bare', prec)], res[('learner', prec)]
        print(f"| {prec} | {b:.0f} | {l:.0f} | {l/b:.2f} |")
    print(f"| bf16 / fp32 | {res[('bare','bf16')]/res[('bare','fp32')]:.2f} | {res[('learner','bf16')]/res[('learner','fp32')]:.2f} | |")
    for prec in ('fp32', 'bf16'):
        print(f"| channels-last / contiguous, {prec} | {res[('bare',prec)]/res[('nchw',prec)]:.2f} ({res[('nchw',prec)]:.0f} img/s contiguous) | | |")


if __name__ == '__main__': main()
