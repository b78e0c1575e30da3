"""Execute notebooks the way `nbdev_test` does and save their outputs, so the docs show real outputs from this machine.

    BLOODCELL_DATA=../shared/data .venv/bin/python tools/run_nbs.py [nbs/02_data.ipynb ...]
    .venv/bin/nbdev_clean        # then clean (execution counts, metadata) before committing

Large PNG outputs (figure grids, CAM overlays) are re-encoded as JPEG so notebooks stay small in git
(`--shrink-only` does just that to already-run notebooks). Paths of this machine are written as a reader's would
be: `$BLOODCELL_DATA` for the data folder, `.` for the checkout, `$TMP` for temporary folders.
Cells flagged with a `tst_flags` flag (`#| slow`, `#| gpu`, `#| download`) and `#| eval: false` cells are not run,
exactly as in `nbdev_test`; their stored outputs are cleared. A notebook that fails is left unchanged.
"""
import os, sys, warnings
# timm's own deprecation notice (the same filter as pytest.ini): not ours to fix, and not for the docs
warnings.filterwarnings('ignore', message='.*torch.jit.script.*', category=FutureWarning)
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbdev.config import get_config
from nbdev.process import extract_directives
from fastcore.xtras import working_directory


def shrink_outputs(nb, max_b64: int = 120_000, max_width: int = 1400, quality: int = 80):
    "Re-encode PNG outputs larger than `max_b64` base64 characters as JPEG (downscaled to `max_width`)."
    import base64, io
    from PIL import Image
    for c in nb.cells:
        for o in c.get('outputs', []) if c.cell_type == 'code' else []:
            d = o.get('data', {})
            png = d.get('image/png')
            if not png or len(png) <= max_b64: continue
            im = Image.open(io.BytesIO(base64.b64decode(png))).convert('RGB')
            if im.width > max_width: im = im.resize((max_width, round(im.height*max_width/im.width)), Image.Resampling.LANCZOS)
            buf = io.BytesIO(); im.save(buf, format='JPEG', quality=quality, optimize=True)
            del d['image/png']; d['image/jpeg'] = base64.b64encode(buf.getvalue()).decode()
    return nb


def scrub_paths(nb):
    "Replace this machine's paths in text outputs: the data folder, the checkout and temporary folders."
    import re, tempfile
    subs = [(str(Path(os.environ['BLOODCELL_DATA']).resolve()), '$BLOODCELL_DATA')] if os.environ.get('BLOODCELL_DATA') else []
    subs += [(str(Path(__file__).resolve().parents[1]), '.')]
    tmp = re.compile(re.escape(tempfile.gettempdir()) + r'/tmp\w+')
    def fix(s):
        for a, b in subs: s = s.replace(a, b)
        return tmp.sub('$TMP', s)
    for c in nb.cells:
        for o in c.get('outputs', []) if c.cell_type == 'code' else []:
            if 'text' in o: o['text'] = fix(''.join(o['text']) if isinstance(o['text'], list) else o['text'])
            for k, v in o.get('data', {}).items():
                if k.startswith('text/'): o['data'][k] = fix(''.join(v) if isinstance(v, list) else v)
    return nb


def run_nb(fn: Path, flags: set) -> bool:
    "Run `fn` in a fresh shell, skipping flagged cells, and write it back with its outputs."
    nb = read_nb(fn)
    def skip(cell):
        if cell.cell_type != 'code': return True
        if 'nbdev_export' + '(' in cell.source: return True
        d = extract_directives(cell, remove=False)
        if d.get('eval:', [''])[0].lower() == 'false': return True
        return bool(flags & d.keys())
    for c in nb.cells: # every output is this run's: execnb leaves a cell that prints nothing with its old outputs
        if c.cell_type == 'code': c.outputs = []
    k = CaptureShell(fn)
    try:
        with working_directory(fn.parent): k.run_all(nb, exc_stop=True, preproc=skip)
    except Exception:
        sys.stderr.write(k.prettytb(fname=fn) + '\n'); return False
    write_nb(scrub_paths(shrink_outputs(nb)), fn)
    return True


def main():
    cfg = get_config()
    os.environ['IN_TEST'] = '1'
    flags = set(cfg.tst_flags.split())
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    fns = [Path(a).resolve() for a in args] or sorted(cfg.nbs_path.glob('[0-9]*.ipynb'))
    if '--shrink-only' in sys.argv:
        for fn in fns: write_nb(shrink_outputs(read_nb(fn)), fn)
        return print(f'{len(fns)} notebook(s) shrunk')
    bad = [fn.name for fn in fns if not (print(f'running {fn.name}', flush=True) or run_nb(fn, flags))]
    if bad: print('failed:', ', '.join(bad)); sys.exit(1)
    print(f'{len(fns)} notebook(s) run and saved with outputs')


if __name__ == '__main__': main()
