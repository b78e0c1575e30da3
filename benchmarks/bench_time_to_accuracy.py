"""Time to accuracy on this CPU: candidate training recipes on the PBC half, one machine, one go, same split.

    BLOODCELL_DATA=../shared/data .venv/bin/python benchmarks/bench_time_to_accuracy.py [--only NAME ...] [--sample N]

Every candidate trains with `bloodcell_fastai.train.train` on the same seeded split (60/20/20, grouped), so the
curves differ only by recipe. The curve is validation accuracy against cumulative training minutes (validation is
what a user may look at while choosing); the held-out test split is scored once per candidate, at the end, with a
bootstrap 95% CI. The current default (ResNet-18 from scratch at 128 px, fp32, lr_find) is the baseline of the same
run. Writes benchmarks/TIME_TO_ACCURACY.md, benchmarks/time_to_accuracy.json and benchmarks/time_to_accuracy.png;
results are saved after every candidate, so an interrupted run keeps what it finished. The run
folder of the winner (lite1_crop_ft160_fp32_e9) is the one `make model` ships (same configuration, same seed). A section
headed "## What it shows" below the table is kept when the table is rewritten.
"""
import argparse, json, os, platform, time
from pathlib import Path
from bloodcell_fastai.core import cpu_info, atomic_write
from bloodcell_fastai.train import train, cpu_bf16_supported
from bloodcell_fastai.evaluate import evaluate_run
from bloodcell_fastai.inference import TTA_PASSES
from _report import write_report

CANDIDATES = {  # name: (what it is, train options)
    'lite0_ft128': ("EfficientNet-Lite0 ImageNet (pip package), cached-feature head, frozen BN stats, fine-tune all, 128 px, bf16, 6 epochs",
                    dict(arch='efficientnet_lite0', pretrained=True, size=128, epochs=6, lr=2e-3, bs=32)),
    'lite0_probe224': ("EfficientNet-Lite0 linear probe: head fitted on cached 224-px features only, no fine-tuning",
                       dict(arch='efficientnet_lite0', pretrained=True, size=224, epochs=0, lr=2e-3, bs=32)),
    'lite0_crop_ft128_fp32_e12': ("EfficientNet-Lite0 ImageNet, cell crop 0.5 + Reinhard (the `--pretrained` defaults), cached-feature head, frozen BN stats, fine-tune all, 128 px, fp32 channels-last, no loader workers, 12 epochs",
                    dict(arch='efficientnet_lite0', pretrained=True, size=128, epochs=12, lr=2e-3, bs=32, precision='fp32', num_workers=0, cell_crop=0.5, colour='reinhard')),
    'lite0_crop_ft160_fp32_e9': ("EfficientNet-Lite0 ImageNet, cell crop 0.5 + Reinhard, cached-feature head, frozen BN stats, fine-tune all, 160 px, fp32 channels-last, no loader workers, 9 epochs",
                    dict(arch='efficientnet_lite0', pretrained=True, size=160, epochs=9, lr=2e-3, bs=32, precision='fp32', num_workers=0, cell_crop=0.5, colour='reinhard')),
    'lite0_crop_prog128to192_e9': ("EfficientNet-Lite0 ImageNet, cell crop 0.5 + Reinhard, cached-feature head, frozen BN stats, progressive resizing: 7 epochs at 128 px, then 2 at 192 px, fp32 channels-last, no loader workers",
                    dict(arch='efficientnet_lite0', pretrained=True, size=192, epochs=9, progressive=[128, 7], lr=2e-3, bs=32, precision='fp32', num_workers=0, cell_crop=0.5, colour='reinhard')),
    'lite1_crop_ft160_fp32_e9': ("EfficientNet-Lite1 ImageNet (pip package), cell crop 0.5 + Reinhard, cached-feature head, frozen BN stats, fine-tune all, 160 px, fp32 channels-last, no loader workers, 9 epochs",
                    dict(arch='efficientnet_lite1', pretrained=True, size=160, epochs=9, lr=2e-3, bs=32, precision='fp32', num_workers=0, cell_crop=0.5, colour='reinhard')),
    'lite0_crop_gradual160_e10': ("EfficientNet-Lite0 ImageNet, cell crop 0.5 + Reinhard, cached-feature head, frozen BN stats, gradual unfreezing in 4 steps with discriminative LRs (halved each step), 160 px, fp32 channels-last, no loader workers, 10 epochs",
                    dict(arch='efficientnet_lite0', pretrained=True, size=160, epochs=10, recipe='gradual', lr=2e-3, bs=32, precision='fp32', num_workers=0, cell_crop=0.5, colour='reinhard')),
    'resnet18_scratch128': ("baseline: today's default, ResNet-18 from scratch, 128 px, fp32, lr_find, 5 epochs",
                            dict(arch='resnet18', size=128, epochs=5)),
}

def summarise(name, run, tta=None):
    rec = json.loads((run/'record.json').read_text())
    t, mins, curve = rec['final_metrics']['test'], 0., []
    for s in rec['stages']:
        if s['name'] == 'head' and not s['epochs'] and s.get('seconds'): mins += s['seconds']/60  # the cached-feature head
    if not rec['history']: curve.append((round(mins, 2), rec['final_metrics']['valid']['accuracy']['value']))
    for h in rec['history']:
        mins += h['seconds']/60; curve.append((round(mins, 2), round(h['accuracy'], 4)))
    return dict(name=name, what=CANDIDATES[name][0], config=CANDIDATES[name][1], precision=rec['precision'],
                train_minutes=round(rec['timings']['train_seconds']/60, 2), curve=curve, n_images=rec['n_images'],
                test_accuracy=t['accuracy'], test_balanced_accuracy=t['balanced_accuracy']['value'],
                weights={k: v for k, v in (rec.get('weights') or {}).items() if k != 'file'} or None,  # no local paths
                test_accuracy_tta=tta or tta_accuracy(run))

def tta_accuracy(run):
    "Test accuracy when predicting with `--tta` (the plain pass and `TTA_PASSES` augmented ones averaged), seeded: `bloodcell evaluate RUN --tta`."
    return evaluate_run(run, n_tta=TTA_PASSES)['accuracy']

def ci(a): return f"{a['value']:.4f} [{a['ci_low']:.4f}, {a['ci_high']:.4f}]" if a else '—'

def write(results, args):
    out = Path(__file__).parent
    atomic_write(out/'time_to_accuracy.json', json.dumps(dict(cpu=cpu_info()['name'], flags=', '.join(cpu_info()['flags']), date=time.strftime('%Y-%m-%d'),
                                                             command=args.command, results=results), indent=1))
    lines = ['# Time to accuracy on two CPU cores', '',
             'Commands (same machine, one after the other): ' + ', '.join(f'`{c}`' for c in dict.fromkeys(r.get('command', args.command) for r in results)) + '  ', f"CPU: {cpu_info()['name']} ({os.cpu_count()} cores; flags: {', '.join(cpu_info()['flags'])}; native bf16: {cpu_bf16_supported()})  ",
             f"Date: {time.strftime('%Y-%m-%d')}. Data: the PBC half in `$BLOODCELL_DATA/pbc`, one seeded grouped split "
             f"({results[0]['n_images'] if results else ''}).", '',
             '"Training min" is the whole of `train` (with the first presize of the data, which a later run finds cached); "fitting min" '
             'only the cached-feature head and the epochs (the last point of the curve).', '',
             '| candidate | recipe | precision | training min | fitting min | valid acc by cumulative minute | test accuracy [95% CI] | test balanced acc | test accuracy with `--tta` [95% CI] |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in results:
        a = r['test_accuracy']
        curve = ', '.join(f"{m:g}: {v:.3f}" for m, v in r['curve'])
        lines.append(f"| {r['name']} | {r['what']} | {r['precision']} | {r['train_minutes']} | {r['curve'][-1][0]:g} | {curve} | "
                     f"{a['value']:.4f} [{a['ci_low']:.4f}, {a['ci_high']:.4f}] | {r['test_balanced_accuracy']:.4f} | {ci(r.get('test_accuracy_tta'))} |")
    base = next((r for r in results if r['name'].startswith('resnet18')), None)
    if base:
        lines += ['', 'Against the baseline of the same run (training minutes ratio, test accuracy difference):', '']
        for r in results:
            if r is base: continue
            lines.append(f"- {r['name']}: {r['train_minutes']/base['train_minutes']:.2f}x the baseline's minutes, "
                         f"{100*(r['test_accuracy']['value']-base['test_accuracy']['value']):+.1f} accuracy points")
    write_report(out/'TIME_TO_ACCURACY.md', lines)
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        xs, ys = zip(*r['curve']); l, = ax.plot(xs, ys, marker='o', label=r['name'])
        ax.errorbar([xs[-1]], [r['test_accuracy']['value']], yerr=[[r['test_accuracy']['value']-r['test_accuracy']['ci_low']],
                    [r['test_accuracy']['ci_high']-r['test_accuracy']['value']]], fmt='s', color=l.get_color(), capsize=3)
    ax.axhline(0.985, ls='--', color='grey', lw=1); ax.set(xlabel='training minutes (2 cores)', ylabel='accuracy',
               title=f'PBC half: valid accuracy (lines), test accuracy with 95% CI (squares)\n{cpu_info()["name"]}')
    ax.legend(fontsize=8); fig.tight_layout(); fig.savefig(out/'time_to_accuracy.png', dpi=90); plt.close(fig)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--only', nargs='*', default=list(CANDIDATES)); p.add_argument('--sample', type=int, default=None)
    p.add_argument('--runs', default='runs/bench_tta')
    p.add_argument('--report', action='store_true', help='rewrite the tables and plot from the finished run folders, train nothing')
    args = p.parse_args()
    args.command = 'python benchmarks/bench_time_to_accuracy.py' + (f" --only {' '.join(args.only)}" if args.only != p.get_default('only') else '') + \
                   (f' --sample {args.sample}' if args.sample else '')
    prev = Path(__file__).parent/'time_to_accuracy.json'  # --only adds to (or redoes) candidates of an earlier run on this CPU
    old = json.loads(prev.read_text()) if prev.exists() else {}
    results = {r['name']: r for r in old.get('results', [])} if old.get('cpu') == cpu_info()['name'] else {}
    for name in args.only:
        run = Path(args.runs)/name
        if args.report and not (run/'record.json').exists(): continue  # a row of an earlier session stays as it was
        if not args.report: train(run, **{**dict(dataset='pbc', seed=42, sample=args.sample, num_workers=2), **CANDIDATES[name][1]})
        old_tta = results.get(name, {}).get('test_accuracy_tta') if args.report else None # --report scores TTA only where it is missing
        results[name] = {**summarise(name, run, old_tta), 'command': results.get(name, {}).get('command') if args.report else args.command}
        write([results[n] for n in CANDIDATES if n in results], args)
        print(name, results[name]['train_minutes'], results[name]['test_accuracy'], results[name]['test_accuracy_tta'], flush=True)

if __name__ == '__main__': main()
