"""Throughput of batch prediction vs a `learn.predict` loop vs the bare model forward, same model, size and run.

    BLOODCELL_DATA=../shared/data .venv/bin/python benchmarks/predict.py --sizes 64,128,224 --out benchmarks/PREDICT.md

For each size a run folder is trained briefly (4 PBC images per class, 1 epoch: the weights do not matter for
speed) with the fastai pickle exported, then, on the same real PBC JPEGs:

* loop  — `learn.predict(file)` per image on the run's `learner.pkl` (what fastai tutorials do);
* batch — `bloodcell_fastai.inference.predict((model, meta), files)`: per-file decode and check in threads,
          the training presize, fastai batch transforms, one forward per batch, abstention and the result table;
* bare  — the model's forward alone on tensors decoded and normalised beforehand (the ceiling).

Ratios are computed against the loop and the bare forward measured in the same process. The three are timed in
interleaved rounds and each keeps its best round (other work on a shared machine only ever slows a timing down).
"""
import argparse, os, sys, time, json, platform, tempfile, warnings
from pathlib import Path
warnings.filterwarnings('ignore')
import numpy as np, pandas as pd, torch

def real_images(n:int)->list:
    "n readable PBC JPEGs (cycled through the classes), skipping the sample's debris."
    from bloodcell_fastai.data import get_dataset_path, pbc_items, inspect_file
    items = pbc_items(get_dataset_path('pbc', download=False))
    items = items.sample(frac=1, random_state=0)
    out = []
    for f in items.file:
        if not Path(f).name.startswith('.') and inspect_file(f)['status']=='ok': out.append(f)
        if len(out)==n: break
    return out

def bench_size(size:int, files:list, n_loop:int, bs:int, repeats:int, arch:str, workdir:Path)->dict:
    "Images/s of the three ways to predict at one image size."
    from bloodcell_fastai.train import train
    from bloodcell_fastai.export import load_safe, load_learner_pickle
    from bloodcell_fastai.inference import predict, read_cells, cell_batch
    run = workdir/f'{arch}_{size}'
    if not (run/'learner.pkl').exists():
        train(run, dataset='pbc', sample=4, size=size, bs=16, epochs=1, lr=1e-3, arch=arch, num_workers=0, export_pickle=True)
    model, meta = load_safe(run)
    learn = load_learner_pickle(run, trust=True)
    learn.model.eval()
    # loop: fastai's learn.predict, one image at a time
    loop_files = files[:n_loop]
    def loop():
        with learn.no_bar(), learn.no_logging():
            for f in loop_files: learn.predict(f)
    # batch: the project's predict, from the JPEG files to the result table
    def batch(): predict((model, meta), files, bs=bs)
    # bare: the forward alone on pre-decoded, pre-normalised tensors
    ims, *_ = read_cells(files, meta)
    xs = [cell_batch(ims[i:i+bs], meta).as_subclass(torch.Tensor) for i in range(0, len(ims), bs)]
    def bare():
        with torch.inference_mode():
            for x in xs: model(x)
    learn.predict(loop_files[0]); predict((model, meta), files[:bs], bs=bs); bare() # warm-up
    # interleaved rounds: a burst of other work on a shared machine hits all three alike; keep each one's best
    ts, cs = {k:[] for k in ('loop','batch','bare')}, {k:[] for k in ('loop','batch','bare')}
    for _ in range(repeats):
        for k,f in (('loop',loop), ('batch',batch), ('bare',bare)):
            t0, c0 = time.perf_counter(), time.process_time(); f()
            ts[k].append(time.perf_counter()-t0); cs[k].append(time.process_time()-c0)
    t_loop, t_batch, t_bare = (min(ts[k]) for k in ('loop','batch','bare'))
    c_loop, c_batch, c_bare = (min(cs[k]) for k in ('loop','batch','bare'))
    r = dict(size=size, arch=arch, bs=bs, repeats=repeats, n_images=len(files), n_loop=len(loop_files),
             loop_ips=len(loop_files)/t_loop, batch_ips=len(files)/t_batch, bare_ips=len(files)/t_bare)
    r.update(batch_vs_loop=r['batch_ips']/r['loop_ips'], batch_vs_bare=r['batch_ips']/r['bare_ips'],
             # images per CPU-second (all threads): what each way costs, whatever else the machine is running
             loop_ipcs=len(loop_files)/c_loop, batch_ipcs=len(files)/c_batch, bare_ipcs=len(files)/c_bare)
    r.update(cpu_batch_vs_loop=r['batch_ipcs']/r['loop_ipcs'], cpu_batch_vs_bare=r['batch_ipcs']/r['bare_ipcs'])
    return r

def machine()->str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or platform.machine())
    return (f"{dev}, {os.cpu_count()} CPU core(s) visible, torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s), Python {platform.python_version()}")

def report(rows:list, cmd:str)->str:
    "The results as the markdown section of benchmarks/PREDICT.md."
    df = pd.DataFrame(rows)
    tbl = ['| size (px) | loop img/s | batch img/s | bare forward img/s | batch ÷ loop | batch ÷ bare |',
           '|---:|---:|---:|---:|---:|---:|']
    tbl += [f"| {r['size']} | {r['loop_ips']:.1f} | {r['batch_ips']:.1f} | {r['bare_ips']:.1f} | "
            f"{r['batch_vs_loop']:.1f}× | {r['batch_vs_bare']:.2f} |" for r in rows]
    cpu = ['| size (px) | loop img/CPU-s | batch img/CPU-s | bare forward img/CPU-s | batch ÷ loop | batch ÷ bare |',
           '|---:|---:|---:|---:|---:|---:|']
    cpu += [f"| {r['size']} | {r['loop_ipcs']:.1f} | {r['batch_ipcs']:.1f} | {r['bare_ipcs']:.1f} | "
            f"{r['cpu_batch_vs_loop']:.1f}× | {r['cpu_batch_vs_bare']:.2f} |" for r in rows]
    r0 = rows[0]
    return '\n'.join([
        '## Batch prediction (`benchmarks/predict.py`)', '',
        f"Model {r0['arch']}, batch size {r0['bs']}, {r0['n_images']} real PBC JPEGs (360×363) for batch and bare, "
        f"{r0['n_loop']} for the loop; best of {r0['repeats']} interleaved rounds. Machine: {machine()}.", '',
        f"Load average when it finished: {', '.join(f'{x:.1f}' for x in os.getloadavg())}.", '',
        'Command:', '', '```', cmd, '```', '', 'Wall clock (images per second):', '', *tbl, '',
        'CPU time (images per CPU-second of this process, all its threads): less sensitive to other work on the machine.', '',
        *cpu, '',
        '*loop*: `learn.predict(file)` per image on the run\'s `learner.pkl`. *batch*: `inference.predict` from the '
        'JPEG files to the result table (threaded decode and per-file check, the training presize, fastai batch '
        'transforms, forward, abstention). *bare*: the model\'s forward alone on tensors decoded and normalised '
        'beforehand. Targets: batch ≥ 10× the loop and ≥ 0.8 of the bare forward.', ''])

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sizes', default='64,128,224', help='image sizes, comma-separated')
    p.add_argument('--arch', default='resnet18')
    p.add_argument('--n', type=int, default=256, help='images for batch and bare')
    p.add_argument('--n_loop', type=int, default=32, help='images for the learn.predict loop')
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--workdir', default=None, help='where to keep the benchmark runs (default: a temporary folder)')
    p.add_argument('--out', default=None, help='write the markdown section to this file (e.g. benchmarks/PREDICT.md)')
    a = p.parse_args(argv)
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix='bench_predict_'))
    files = real_images(a.n)
    rows = []
    for s in map(int, a.sizes.split(',')):
        r = bench_size(s, files, a.n_loop, a.bs, a.repeats, a.arch, workdir); rows.append(r)
        print(json.dumps({k:(round(v,2) if isinstance(v,float) else v) for k,v in r.items()}), flush=True)
    cmd = 'BLOODCELL_DATA=../shared/data .venv/bin/python benchmarks/predict.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    md = report(rows, cmd.strip())
    print(md)
    if a.out:
        from bloodcell_fastai.core import atomic_write
        atomic_write(a.out, md); print(f'wrote {a.out}')
    return rows

if __name__ == '__main__': main()
