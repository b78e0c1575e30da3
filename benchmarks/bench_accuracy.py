"""Time and held-out test accuracy of a from-scratch model on the PBC sample, for a fixed epoch budget.

    BLOODCELL_DATA=../shared/data .venv/bin/python benchmarks/bench_accuracy.py --epochs 12 --precision bf16 --out runs/bench_bf16
    BLOODCELL_DATA=../shared/data .venv/bin/python benchmarks/bench_accuracy.py --epochs 12 --precision fp32 --out runs/bench_fp32

Trains with `bloodcell_fastai.train.train` exactly as `bloodcell train` does (grouped 60/20/20 split of the whole
PBC sample, seed 42, presize cache, batch augmentation, one-cycle), then prints one markdown row: configuration,
training minutes, seconds per epoch, and test accuracy / balanced accuracy with their bootstrap 95% CIs.
"""
import argparse, json
from pathlib import Path
from bloodcell_fastai.train import train


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--arch', default='resnet18'); p.add_argument('--size', type=int, default=128)
    p.add_argument('--epochs', type=int, default=12); p.add_argument('--bs', type=int, default=64)
    p.add_argument('--lr', type=float, default=3e-3); p.add_argument('--precision', default='auto')
    p.add_argument('--sample', type=int, default=None); p.add_argument('--out', default='runs/bench_accuracy')
    p.add_argument('--seed', type=int, default=42)
    a = p.parse_args()
    run = train(a.out, dataset='pbc', arch=a.arch, size=a.size, epochs=a.epochs, bs=a.bs, lr=a.lr,
                precision=a.precision, sample=a.sample, seed=a.seed)
    rec = json.loads((Path(run)/'record.json').read_text())
    t = rec['final_metrics']['test']
    f = lambda m: f"{t[m]['value']*100:.2f} [{t[m]['ci_low']*100:.2f}, {t[m]['ci_high']*100:.2f}]"
    print("| arch | size | epochs | precision | train min | s/epoch | test images | test accuracy % [95% CI] | balanced accuracy % |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.arch} | {a.size} | {a.epochs} | {rec['precision']} | {rec['timings']['train_seconds']/60:.1f} | "
          f"{rec['timings']['seconds_per_epoch']} | {t['n_images']} | {f('accuracy')} | {f('balanced_accuracy')} |")


if __name__ == '__main__': main()
