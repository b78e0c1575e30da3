"""Cross-lab robustness: accuracy on held-out PBC images shifted the way another lab's images differ.

    # the small check run whose numbers are in benchmarks/ROBUST.md (a few minutes on 2 CPU cores)
    BLOODCELL_DATA=../shared/data .venv/bin/python benchmarks/bench_robust.py --sample 60 --epochs 2 --size 64 --out runs/bench_robust_small
    # the full run (the whole PBC sample, 12 epochs, 128 px; a GPU or an hour-plus of CPU)
    BLOODCELL_DATA=../shared/data .venv/bin/python benchmarks/bench_robust.py --epochs 12 --size 128 --out runs/bench_robust
    # with the ablations (crop only, augmentation only)
    ... --variants baseline,crop,aug,robust

Trains each variant with `bloodcell_fastai.train.train` (what `bloodcell train` runs: same seed, split, recipe,
epochs and learning rate; the variants differ only in `cell_crop` and `robust_aug`, i.e. `--cell-crop 0.5` and
`--robust-aug`), which also calibrates the OOD flag on the validation split, makes shifted copies of the held-out test images (zoom, stain, blur, jpeg,
downscale) and prints markdown tables: accuracy per shift and as a share of the clean accuracy, the in-domain test
accuracy with its 95% CI, and the OOD flag on PBC test, C-NMC and ALL-IDB2 images. Results also go to OUT/results.json.
"""
import argparse, json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1])) # this checkout's package, not an installed copy
import numpy as np, pandas as pd
from bloodcell_fastai.core import data_root
from bloodcell_fastai.data import load_split, presize_for
from bloodcell_fastai.train import train
from bloodcell_fastai.core import atomic_write
from bloodcell_fastai.calibrate import calibrate_ood
from bloodcell_fastai.ood import ood_summary
from bloodcell_fastai.shifts import make_shifts, shift_accuracy, ood_auroc, SHIFTS
from bloodcell_fastai.imaging import CELL_RATIO

VARIANTS = dict(baseline=dict(cell_crop=None, robust_aug=False), crop=dict(cell_crop=CELL_RATIO, robust_aug=False),
                aug=dict(cell_crop=None, robust_aug=True), robust=dict(cell_crop=CELL_RATIO, robust_aug=True))


def other_lab_files(n:int=60)->dict:
    "Up to `n` images each of C-NMC and ALL-IDB2 under $BLOODCELL_DATA (none when not there)."
    r = data_root()
    if r is None: return {}
    out = {'C-NMC': sorted((r/'cnmc').rglob('*.bmp')), 'ALL-IDB2': sorted((r/'allidb2').rglob('*.tif'))}
    return {k: v[::max(1, len(v)//n)][:n] for k,v in out.items() if v}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sample', type=int, default=None, help='images per class (default: all)')
    p.add_argument('--epochs', type=int, default=12); p.add_argument('--size', type=int, default=128)
    p.add_argument('--bs', type=int, default=64); p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--arch', default='resnet18'); p.add_argument('--precision', default='auto')
    p.add_argument('--seed', type=int, default=42); p.add_argument('--num-workers', type=int, default=None)
    p.add_argument('--variants', default='baseline,robust', help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument('--ood-score', default='feature_stats', help='OOD score to calibrate (robust.OOD_SCORES)')
    p.add_argument('--reuse', action='store_true', help='keep finished runs in OUT (same config), recalibrate their OOD flag, re-evaluate')
    p.add_argument('--out', default='runs/bench_robust')
    a = p.parse_args()
    variants = a.variants.split(',')
    bad = [v for v in variants if v not in VARIANTS]
    if bad: sys.exit(f"bench_robust: unknown variant(s) {', '.join(bad)}: choose from {', '.join(VARIANTS)}")
    out = Path(a.out); t0 = time.time()
    cfg = dict(dataset='pbc', sample=a.sample, size=a.size, epochs=a.epochs, bs=a.bs, lr=a.lr, arch=a.arch,
               precision=a.precision, seed=a.seed, num_workers=a.num_workers, ood_score=a.ood_score)
    runs, recs = {}, {}
    for v in variants:
        t = time.time()
        if a.reuse and _finished(out/v, {**VARIANTS[v], **cfg}):
            runs[v] = out/v
            rec = json.loads((runs[v]/'record.json').read_text())
            rec['ood'] = ood_summary(calibrate_ood(runs[v], a.ood_score))
            atomic_write(runs[v]/'record.json', json.dumps(rec, indent=1))
            print(f"reused {v}: OOD flag recalibrated ({a.ood_score})", file=sys.stderr)
        else:
            runs[v] = Path(train(out/v, **VARIANTS[v], **cfg))
            print(f"trained {v} in {time.time()-t:.0f} s -> {runs[v]}", file=sys.stderr)
        recs[v] = json.loads((runs[v]/'record.json').read_text())
    md5s = {recs[v]['split_csv_md5'] for v in variants}
    if len(md5s) != 1: sys.exit("bench_robust: the variants were trained on different splits; use a fresh --out")
    split = load_split(runs[variants[0]]/'split.csv')
    test = split[split.split=='test'].drop_duplicates('file').reset_index(drop=True)
    shifted = make_shifts(test, out/'shifts', item_size=presize_for(a.size))
    tables = {v: shift_accuracy(runs[v], shifted) for v in variants}
    others = other_lab_files()
    ood = {v: {k: ood_auroc(runs[v], test.file.tolist(), fs) for k,fs in others.items()} for v in variants}

    n_cls = split.label.nunique()
    print(f"\n{len(test)} held-out PBC test images ({n_cls} classes); {a.arch}, {a.size} px, {a.epochs} epochs, "
          f"lr {a.lr}, seed {a.seed}, sample {a.sample or 'all'} per class; {time.time()-t0:.0f} s in all\n")
    print("Accuracy per shift, % (share of the model's clean accuracy)\n")
    print("| model | " + " | ".join(SHIFTS) + " | worst share |"); print("|---" * (len(SHIFTS)+2) + "|")
    for v in variants:
        g = tables[v]
        cells = [f"{g.loc[s,'accuracy']*100:.1f}" + ("" if s=='clean' else f" ({g.loc[s,'of_clean']*100:.0f}%)") for s in SHIFTS]
        print(f"| {v} | " + " | ".join(cells) + f" | {g.of_clean.drop('clean').min()*100:.0f}% |")
    print("\nShare of each shift's images the OOD flag marks as unlike the training data\n")
    print("| model | " + " | ".join(SHIFTS) + " |"); print("|---" * (len(SHIFTS)+1) + "|")
    for v in variants:
        print(f"| {v} | " + " | ".join(f"{tables[v].loc[s,'ood_flagged']*100:.0f}%" for s in SHIFTS) + " |")
    print("\nIn-domain test accuracy (from record.json, bootstrap 95% CI), and the OOD flag\n")
    print("| model | test accuracy % [95% CI] | balanced accuracy % | train s | flagged: PBC test | " +
          " | ".join(f"flagged: {k} | AUROC PBC vs {k}" for k in others) + " |")
    print("|---" * (5 + 2*len(others)) + "|")
    for v in variants:
        t = recs[v]['final_metrics']['test']; g = tables[v]
        row = [f"{t['accuracy']['value']*100:.1f} [{t['accuracy']['ci_low']*100:.1f}, {t['accuracy']['ci_high']*100:.1f}]",
               f"{t['balanced_accuracy']['value']*100:.1f}", f"{recs[v]['timings']['train_seconds']:.0f}",
               f"{g.loc['clean','ood_flagged']*100:.0f}%"]
        for k,fs in others.items():
            row += [f"{_flagged(runs[v], fs)*100:.0f}%", f"{ood[v][k]:.3f}"]
        print(f"| {v} | " + " | ".join(row) + " |")
    paired = _paired(runs, variants, test)
    if paired:
        print(f"\nPaired on the same {len(test)} test images: {paired['first_only']} right only for {variants[0]}, "
              f"{paired['second_only']} right only for {variants[-1]}; exact McNemar p = {paired['p_mcnemar']:.3f}")
    res = dict(args=vars(a), n_test=len(test), seconds=round(time.time()-t0), paired=paired,
               shifts={v: tables[v].reset_index().to_dict(orient='records') for v in variants},
               test={v: recs[v]['final_metrics']['test']['accuracy'] for v in variants}, ood_auroc=ood)
    (out/'results.json').write_text(json.dumps(res, indent=1, default=float))
    print(f"\nwrote {out/'results.json'}", file=sys.stderr)


def _finished(run, cfg)->bool:
    "Whether `run` holds a finished run trained with the options in `cfg` (the OOD score aside)."
    try: rec = json.loads((Path(run)/'record.json').read_text())
    except (OSError, ValueError): return False
    return rec.get('status') == 'done' and all(rec['config'].get(k) == v for k,v in cfg.items() if k not in ('ood_score', 'num_workers'))


def _paired(runs, variants, test)->dict:
    "Exact McNemar test between the first and last variant's predictions on the same test images."
    if len(variants) < 2: return {}
    from scipy.stats import binomtest
    from bloodcell_fastai.export import load_safe
    from bloodcell_fastai.inference import predict_probs, prepare_items
    ok = []
    for v in (variants[0], variants[-1]):
        model, meta = load_safe(runs[v])
        p = predict_probs(model, meta, prepare_items(test, meta))
        ok.append(np.asarray(meta.classes)[p.argmax(1)] == test.label.astype(str).values)
    a, b = int((ok[0] & ~ok[1]).sum()), int((~ok[0] & ok[1]).sum())
    return dict(first=variants[0], second=variants[-1], first_only=a, second_only=b,
                p_mcnemar=float(binomtest(b, a+b, 0.5).pvalue) if a+b else 1.)


def _flagged(run, files)->float:
    "Share of `files` the run's OOD flag marks as unlike the training data."
    from bloodcell_fastai.inference import predict
    return float(predict(run, [str(f) for f in files]).ood.astype(float).mean())


if __name__ == '__main__': main()
