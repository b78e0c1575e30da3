"""Inference backends on this CPU, one run: images/s and agreement with fp32 torch on the PBC test split.

    BLOODCELL_DATA=../shared/data .venv/bin/python benchmarks/bench_backends.py [--run RUN] [--rounds 3] [--bs 64]

Backends: torch fp32 (the reference), torch channels-last, torch channels-last + bf16 autocast (CPUs with native
bf16 only), onnxruntime fp32, onnxruntime int8 (dynamic: int8 weights; static: QDQ, per-channel, calibrated on 256
training images of the run). The test images are decoded and preprocessed once, outside the timing, so the table
compares the model's compute; the best of `--rounds` interleaved rounds counts. Agreement is top-1 agreement with
fp32 torch and the largest difference of any class probability (softmax of logits / the model's temperature).
Writes benchmarks/INFERENCE.md and benchmarks/inference.json.
"""
import argparse, json, os, time, tempfile, shutil
from pathlib import Path
import numpy as np, torch
from bloodcell_fastai.core import cpu_info, atomic_write
from bloodcell_fastai.data import load_split
from bloodcell_fastai.core import cpu_bf16_supported
from bloodcell_fastai.export import load_safe, quantize_onnx, load_onnx
from bloodcell_fastai.inference import prepare_items, df_batches, model_forward, BACKENDS, backend_model
from bloodcell_fastai.ood import ood_scores

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--run', default='runs/bench_tta/lite1_crop_ft160_fp32_e9'); p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--bs', type=int, default=64); p.add_argument('--n', type=int, default=None, help='at most this many test images')
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    model, meta = load_safe(args.run)
    df = load_split(Path(args.run)/'split.csv')
    test = df[df.split=='test'].reset_index(drop=True)
    if args.n: test = test.iloc[:args.n]
    batches = list(df_batches(prepare_items(test, meta), meta, bs=args.bs))
    tr = df[df.split=='train']; calib = tr.sample(min(256, len(tr)), random_state=0).reset_index(drop=True)
    t = float(meta.temperature or 1.)
    names = [b for b in BACKENDS if b != 'auto' and (b != 'torch-bf16' or cpu_bf16_supported())]
    models = {b: backend_model(args.run, b, calib=calib) for b in names}
    tmp = Path(tempfile.mkdtemp())  # dynamic int8 beside the library's static int8, in a scratch copy of the run
    for f in ('model.onnx', 'model.json'): shutil.copy(Path(args.run)/f, tmp/f)
    quantize_onnx(tmp, [], dynamic=True); models['onnx-int8-dynamic'] = load_onnx(tmp, int8=True); names.append('onnx-int8-dynamic')
    outs, best = {}, {b: 0. for b in names}
    for r in range(args.rounds):
        for b in names:
            m, meta_b = models[b]
            t0 = time.perf_counter(); z, _ = model_forward(m, batches, len(meta.classes)); dt = time.perf_counter()-t0
            best[b] = max(best[b], len(z)/dt); outs[b] = torch.softmax(torch.from_numpy(z)/t, 1).numpy()
    ref = outs['torch']
    flags = {}  # the OOD flag needs the torch model's features: compared for the torch backends
    for b in names:
        m, _ = models[b]
        if meta.ood and isinstance(m, torch.nn.Module):
            z, f = model_forward(m, batches, len(meta.classes), score=meta.ood['score'])
            flags[b] = ood_scores(z, meta.ood['score'], f, meta.ood) > meta.ood['threshold']
    rows = [dict(backend=b, images_per_s=round(best[b], 1), speedup=round(best[b]/best['torch'], 2),
                 top1_agreement=float((outs[b].argmax(1)==ref.argmax(1)).mean()), max_prob_diff=float(np.abs(outs[b]-ref).max()),
                 ood_flag_agreement=float((flags[b]==flags['torch']).mean()) if b in flags and 'torch' in flags else None)
            for b in names]
    info = dict(cpu=cpu_info()['name'], cores=os.cpu_count(), bf16=cpu_bf16_supported(), date=time.strftime('%Y-%m-%d'), run=args.run,
                arch=meta.arch, size=meta.size, n_images=len(ref), bs=args.bs, rounds=args.rounds, torch=torch.__version__,
                command=f"python benchmarks/bench_backends.py --run {args.run} --rounds {args.rounds} --bs {args.bs}", rows=rows)
    out = Path(__file__).parent
    atomic_write(out/'inference.json', json.dumps(info, indent=1))
    lines = ['# Inference backends', '', f"Command: `{info['command']}`  ",
             f"CPU: {info['cpu']} ({info['cores']} cores; native bf16: {info['bf16']}); torch {info['torch']}; date {info['date']}  ",
             f"Model: {meta.arch} at {meta.size} px ({args.run}); {len(ref)} PBC test images, batch {args.bs}, best of {args.rounds} rounds; "
             "preprocessing outside the timing.", '',
             '| backend | images/s | × torch fp32 | top-1 agreement | max prob. difference | OOD-flag agreement |', '|---|---:|---:|---:|---:|---:|']
    lines += [f"| {r['backend']} | {r['images_per_s']} | {r['speedup']} | {r['top1_agreement']:.4f} | {r['max_prob_diff']:.4f} | "
              f"{'—' if r['ood_flag_agreement'] is None else format(r['ood_flag_agreement'], '.4f')} |" for r in rows]
    lines += ['', "OOD flag: the run's feature score above its threshold; the ONNX graphs return logits only, so predict has no OOD flag with them (—)."]
    atomic_write(out/'INFERENCE.md', '\n'.join(lines)+'\n')
    print('\n'.join(lines))

if __name__ == '__main__': main()
