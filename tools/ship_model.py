"""Turn a finished PBC run into the model that ships: fp16 safetensors, model.json, a trimmed record and a model card.

    .venv/bin/python tools/ship_model.py RUN models/pbc_lite1 [--make-command "make model"]

Steps: fit the temperature on the run's validation split (stored in the run's model.json), copy model.json, store
the weights as fp16 safetensors and check that the fp16 model's predictions on the test split agree with fp32
(top-1 >= 99.8 %), keep the record without local paths, export int8 ONNX when `inference.DEFAULT_BACKEND` needs it,
and write README.md (the model card) from the measured numbers. Everything is written to a temporary folder first
and moved into DEST at the end.
"""
import argparse, json, os, shutil, tempfile, time
from pathlib import Path
import numpy as np, torch
from safetensors.torch import save_file
from bloodcell_fastai.core import atomic_write
from bloodcell_fastai.export import load_safe, read_meta, labelled_items
from bloodcell_fastai.inference import prepare_items, predict_probs, backend_model, DEFAULT_BACKEND, resolve_backend, TTA_PASSES
from bloodcell_fastai.calibrate import calibrate_run
from bloodcell_fastai.core import data_root
from bloodcell_fastai.evaluate import evaluate_run
from bloodcell_fastai.adapt import run_source_stats, save_bn_stats, adapt_run, BN_SOURCE

OTHER_LABS = ('jtsc', 'cellavision_blog') # $BLOODCELL_DATA/otherlab: evaluation only, nothing is chosen by them

def other_labs(folder):
    "Restricted accuracy (95% CI) on the other-lab sets: as shipped, with `--tta`, and after AdaBN on each set's own images; None without the data."
    root = data_root()
    if root is None or not (root/'otherlab').exists(): return None
    out = {}
    for s in OTHER_LABS:
        d = root/'otherlab'/s
        rep = evaluate_run(folder, data=d, restrict_classes=True)
        tta = evaluate_run(folder, data=d, restrict_classes=True, n_tta=TTA_PASSES) # seeded, as `bloodcell evaluate --tta`
        with tempfile.TemporaryDirectory() as t:
            ad = evaluate_run(adapt_run(folder, d, Path(t)/'adapted'), data=d, restrict_classes=True)
        out[s] = dict(n=rep['n_images'], shipped=rep['restricted']['accuracy'], tta=tta['restricted']['accuracy'], adabn=ad['restricted']['accuracy'],
                      shipped_all=rep['accuracy']['value'], classes=rep['shared_classes'])
    return out

KEEP = ('config', 'seed', 'split_csv_md5', 'n_images', 'env', 'status', 'started', 'stages', 'precision', 'timings',
        'n_groups', 'weights', 'final_metrics', 'ood')

def portable(w):
    "A weights record without this machine's paths: a package's file relative to site-packages, other files by name."
    if not w or 'file' not in w: return w
    f = Path(w['file'])
    return {**w, 'file': str(Path(*f.parts[-3:])) if w.get('source') == 'package' else f.name}

def pct(m): return f"{100*m['value']:.2f} % [{100*m['ci_low']:.2f}, {100*m['ci_high']:.2f}]"

def card(rec, meta, cal, agree, make_command, name):
    t, v = rec['final_metrics']['test'], rec['final_metrics']['valid']
    c, w = rec['config'], rec.get('weights') or {}
    per = '\n'.join(f"| {k} | {x['precision']:.3f} | {x['recall']:.3f} | {x['f1']:.3f} | {x['support']} |" for k, x in t['per_class'].items())
    ood = rec.get('ood') or {}
    arch = meta.arch.replace('efficientnet_lite', 'EfficientNet-Lite') # efficientnet_lite1 -> EfficientNet-Lite1
    return f"""# {name}: white-cell classifier for CellaVision peripheral-blood images (8 classes)

An {arch} fine-tuned from ImageNet weights on half of the PBC dataset (Acevedo et al. 2020), at
{meta.size} px. It names one of {', '.join(meta.classes)} for an image of a single cell as
CellaVision DM96 crops it (360×363 JPEG, May-Grünwald-Giemsa stain, Hospital Clinic of Barcelona).

## Data and licence
- PBC dataset: Acevedo A., Merino A., Alférez S., Molina Á., Boldú L., Rodellar J. "A dataset of microscopic peripheral
  blood cell images for development of automatic recognition systems", Data in Brief 30 (2020) 105474,
  doi:10.1016/j.dib.2020.105474; data CC BY 4.0 (Mendeley Data, doi:10.17632/snkd93bnjr.1). The model is trained on the half
  of PBC in this project's data folder ({sum(rec['n_images'].values())} images).
- ImageNet starting weights: `{w.get('package', w.get('hub', w.get('file', '?')))}` {w.get('version', '')} (Apache-2.0), sha256 `{w.get('sha256', '')[:16]}…`.
- Split: seeded ({rec['seed']}), stratified, byte-identical files kept in one split: {rec['n_images']['train']} train /
  {rec['n_images']['valid']} validation / {rec['n_images']['test']} test images (split md5 `{rec['split_csv_md5'][:8]}`).

## Test metrics (held-out test split, bootstrap 95 % CIs)
| metric | value |
|---|---|
| accuracy | {pct(t['accuracy'])} |
| balanced accuracy | {pct(t['balanced_accuracy'])} |
| Cohen's kappa | {t['cohen_kappa']['value']:.4f} [{t['cohen_kappa']['ci_low']:.4f}, {t['cohen_kappa']['ci_high']:.4f}] |
| macro F1 | {t['f1_macro']['value']:.4f} |
| validation accuracy | {pct(v['accuracy'])} |

| class | precision | recall | F1 | test images |
|---|---:|---:|---:|---:|
{per}

## Calibration and abstention
- Temperature {cal['temperature']:.3f}, fitted on the validation split. Test ECE (15 bins): {cal['test']['ece_before']:.4f} before,
  {cal['test']['ece_after']:.4f} after; test NLL {cal['test']['nll_before']:.4f} → {cal['test']['nll_after']:.4f}.
- Below a calibrated probability of {meta.threshold} a prediction is marked "refer to expert".
- Out-of-distribution flag: `{ood.get('score', 'none')}` score above {ood.get('threshold', float('nan')):.4g}, the
  {ood.get('percentile', '?')}th percentile of the validation images (so about {100-float(ood.get('percentile', 95)):.0f} % of in-domain cells are flagged too).

## Storage
Weights stored as fp16 safetensors (loaded as fp32). Against the fp32 weights on the {agree['n']} test images: top-1
agreement {100*agree['top1']:.2f} %, largest probability difference {agree['max_diff']:.4f}.

## How it was made
`{make_command}` (≈ {rec['timings']['train_seconds']/60:.0f} min of training, {rec['precision']}, on {rec['env']['device']};
recipe: {c['recipe']}{', head fitted on cached features' if c.get('cached_head') else ''}{', frozen BatchNorm statistics' if c.get('freeze_bn') else ''}{', cell-centred crop ' + str(c['cell_crop']) if c.get('cell_crop') else ''}{', ' + c['colour'] + ' colour normalisation (target in model.json)' if c.get('colour') else ''}, {c['epochs']} epochs, lr {c['lr']},
lr_mult {c['lr_mult']}, batch {c['bs']}, torch {rec['env']['torch']}, timm {rec['env']['timm']}).

## Other labs (evaluation only)
{other_card(rec['shipped'].get('other_labs'))}

## Intended use and limits
- Research and teaching: a second opinion on single-cell crops from a CellaVision-like analyser with MGG staining.
  Not a medical device; not validated for diagnosis.
- One lab, one analyser, one stain. On other labs' images accuracy falls (the table above, and
  benchmarks/OTHERLAB.md): use the OOD flag and abstention, try `bloodcell adapt` on your lab's unlabelled images,
  and validate on your own labelled images first (`bloodcell evaluate --data`).
- Classes are the 8 PBC groups; immature granulocytes are one class, blasts and other cells outside PBC have none.
"""

def other_card(ol):
    if not ol: return 'Not measured: the other-lab sets were not in $BLOODCELL_DATA when this card was written.'
    rows = '\n'.join(f"| {s} | {', '.join(o['classes'])} | {pct(o['shipped'])} | {pct(o['tta'])} | {pct(o['adabn'])} | {100*o['shipped_all']:.1f} % |" for s, o in ol.items())
    return f"""Accuracy with the classes restricted to those each set has (95 % bootstrap CIs); the last column is unrestricted.
`--tta` is `bloodcell predict/evaluate --tta` (the app's test-time augmentation switch); `AdaBN` is `bloodcell adapt`
on the set's own unlabelled images (aligned to `bn_source.safetensors`). These sets chose nothing about the model;
see benchmarks/OTHERLAB.md for every method compared.

| set | classes | as shipped | with `--tta` | after AdaBN | as shipped, all 8 classes |
|---|---|---|---|---|---|
{rows}"""

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('run'); p.add_argument('dest'); p.add_argument('--make-command', default='make model')
    a = p.parse_args()
    run, dest = Path(a.run), Path(a.dest)
    cal = calibrate_run(run)          # stores the temperature in the run's model.json
    rec, meta = json.loads((run/'record.json').read_text()), read_meta(run)
    model, _ = load_safe(run)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix='.ship'))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, str(tmp/'model.safetensors'))
    shipped_meta = json.loads((run/'model.json').read_text())
    shipped_meta['weights'] = portable(shipped_meta.get('weights'))
    atomic_write(tmp/'model.json', json.dumps(shipped_meta, indent=1))
    test = prepare_items(labelled_items(run, split='test'), meta)
    p32 = predict_probs(model, meta, test)
    m16, _ = load_safe(tmp)
    p16 = predict_probs(m16, meta, test)
    agree = dict(n=len(p32), top1=float((p32.argmax(1) == p16.argmax(1)).mean()), max_diff=float(np.abs(p32-p16).max()))
    if agree['top1'] < 0.998: raise SystemExit(f"fp16 weights agree on only {agree['top1']:.4f} of test predictions: ship fp32")
    rec = {k: rec[k] for k in KEEP if k in rec}
    rec['config'] = {k: v for k, v in rec['config'].items() if k != 'data'}
    rec['weights'] = portable(rec.get('weights'))
    rec['shipped'] = dict(date=time.strftime('%Y-%m-%d'), fp16_agreement=agree, calibration={s: cal[s] for s in ('valid', 'test')},
                          temperature=cal['temperature'], command=a.make_command)
    source = run_source_stats(run, model, meta) # the training lab's BatchNorm statistics, for `bloodcell adapt`
    if source: save_bn_stats(source, tmp/BN_SOURCE)
    atomic_write(tmp/'record.json', json.dumps(rec, indent=1))
    rec['shipped']['other_labs'] = other_labs(tmp)
    atomic_write(tmp/'record.json', json.dumps(rec, indent=1))
    if resolve_backend(DEFAULT_BACKEND) == 'onnx-int8':
        backend_model(tmp, 'onnx-int8', calib=labelled_items(run, split='train').sample(256, random_state=0))
        (tmp/'model.onnx').unlink()
    atomic_write(tmp/'README.md', card(rec, read_meta(tmp), cal, agree, a.make_command, dest.name))
    if dest.exists(): shutil.rmtree(dest)
    os.replace(tmp, dest)
    print(f"wrote {dest}: " + ', '.join(f"{f.name} ({f.stat().st_size/1e6:.1f} MB)" for f in sorted(dest.iterdir())))

if __name__ == '__main__': main()
