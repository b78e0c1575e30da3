"""A synthetic data folder in the published layouts (PBC, C-NMC, ALL-IDB2, other labs), for tests with no data folder.

    python tools/make_sample.py DEST [--n 20] [--seed 0]

DEVELOPERS.md forbids copying the real data into the repository, so the sample is drawn: a stained-looking white cell
(class-specific nucleus shape, cytoplasm colour and granules) among pale red cells, on each dataset's background and
frame. A model can learn the classes (they differ in features a CNN sees), so a tiny run is above chance; nothing
about real accuracy can be read from it. `SAMPLE.md` in DEST marks it as synthetic.
"""
import argparse, json
from pathlib import Path
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# class: (file-name prefixes, cell radius, nucleus lobes, nucleus colour, cytoplasm colour, granule colour or None)
PBC = {'basophil': (('BA',), 46, 2, (70, 30, 110), (150, 110, 170), (60, 20, 90)),
       'eosinophil': (('EO',), 52, 2, (90, 40, 120), (230, 150, 120), (220, 90, 60)),
       'erythroblast': (('ERB',), 36, 1, (50, 20, 80), (190, 140, 160), None),
       'ig': (('IG', 'MY', 'MMY', 'PMY'), 58, 1, (120, 70, 150), (200, 170, 200), (170, 120, 170)),
       'lymphocyte': (('LY',), 38, 1, (60, 30, 120), (150, 170, 220), None),
       'monocyte': (('MO',), 62, 1, (130, 90, 170), (180, 180, 210), None),
       'neutrophil': (('BNE', 'SNE', 'NEUTROPHIL'), 50, 4, (100, 50, 140), (225, 200, 215), (200, 170, 200)),
       'platelet': (('PLATELET',), 0, 0, (120, 80, 160), (0, 0, 0), None)}
OTHER = ('basophil', 'eosinophil', 'lymphocyte', 'monocyte', 'neutrophil')

def _jit(rng, c, s=12): return tuple(int(np.clip(v + rng.normal(0, s), 0, 255)) for v in c)

def draw_cell(rng, cls, size=(360, 363), bg=(238, 222, 205), rbc=(215, 175, 185), scale=1.0, n_rbc=(14, 26)):
    "One synthetic cell image of PBC class `cls`."
    W, H = size
    im = Image.new('RGB', size, _jit(rng, bg, 3)); d = ImageDraw.Draw(im)
    for _ in range(rng.integers(*n_rbc) if n_rbc else 0): # red cells with their central pallor, drawn first so the white cell sits on top
        x, y, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(26, 34)*scale
        d.ellipse([x-r, y-r, x+r, y+r], fill=_jit(rng, rbc, 8), outline=_jit(rng, (190, 140, 150), 8))
        d.ellipse([x-r/2, y-r/2, x+r/2, y+r/2], fill=_jit(rng, tuple((a+b)//2 for a, b in zip(rbc, bg)), 6))
    _, R, lobes, nuc, cyt, gran = PBC[cls]
    cx, cy = W/2 + rng.normal(0, 8), H/2 + rng.normal(0, 8)
    if cls == 'platelet':
        for _ in range(rng.integers(2, 6)):
            x, y, r = cx + rng.normal(0, 30), cy + rng.normal(0, 30), rng.uniform(5, 10)*scale
            d.ellipse([x-r, y-r, x+r, y+r], fill=_jit(rng, nuc))
    else:
        R = 1.3*R*scale*rng.uniform(0.9, 1.1)
        d.ellipse([cx-R, cy-R, cx+R, cy+R], fill=_jit(rng, cyt))
        if gran:
            for _ in range(int(R*3)):
                a, rr = rng.uniform(0, 2*np.pi), R*np.sqrt(rng.uniform(0, 0.9))
                x, y = cx + rr*np.cos(a), cy + rr*np.sin(a)
                d.ellipse([x-2, y-2, x+2, y+2], fill=_jit(rng, gran))
        nr = R*(0.75 if cls in ('lymphocyte', 'erythroblast') else 0.45 if lobes > 1 else 0.6)
        for k in range(lobes):
            a = 2*np.pi*k/lobes + rng.uniform(0, 0.5)
            off = 0 if lobes == 1 else R*0.4
            x, y = cx + off*np.cos(a), cy + off*np.sin(a)
            rx, ry = nr*rng.uniform(0.8, 1.0), nr*rng.uniform(0.6, 1.0)*(0.7 if cls == 'monocyte' else 1)
            d.ellipse([x-rx, y-ry, x+rx, y+ry], fill=_jit(rng, nuc))
    return im.filter(ImageFilter.GaussianBlur(1.2))

def make_sample(dest, n=20, seed=0):
    "Write the synthetic sample to `dest`: pbc/, cnmc/, allidb2/, otherlab/ in their published layouts."
    dest, rng = Path(dest), np.random.default_rng(seed)
    pbc = dest/'pbc'/'PBC_dataset_normal_DIB'
    for cls, (prefixes, *_) in PBC.items():
        (pbc/cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            size = (366, 369) if i == n - 1 else (360, 363) # the published set has a few 366x369 images
            draw_cell(rng, cls, size).save(pbc/cls/f"{prefixes[i % len(prefixes)]}_{100000 + i}.jpg", quality=90)
    # the published defects a data audit must find: one image filed under two classes, and a macOS metadata file
    dup = draw_cell(rng, 'eosinophil'); dup.save(pbc/'eosinophil'/'EO_225902.jpg', quality=90)
    (pbc/'neutrophil'/'BNE_191112.jpg').write_bytes((pbc/'eosinophil'/'EO_225902.jpg').read_bytes())
    (pbc/'neutrophil'/'.DS_169665.jpg').write_bytes(b'\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ' + bytes(4000))
    cn = dest/'cnmc'/'C-NMC_training_data'
    for s in range(1, 14):
        for lbl, cls, sid in (('all', 'ig', f'{s}'), ('hem', 'lymphocyte', f'H{s}')):
            d = cn/f'fold_{s % 3}'/lbl; d.mkdir(parents=True, exist_ok=True)
            for c in (1, 2):
                im = np.asarray(draw_cell(rng, cls, (450, 450), bg=(0, 0, 0), n_rbc=None, scale=1.7)).copy()
                Image.fromarray(im).save(d/f'UID_{sid}_1_{c}_{lbl}.bmp')
    idb = dest/'allidb2'/'ALL_IDB2'/'img'; idb.mkdir(parents=True, exist_ok=True)
    for i in range(1, 2*n + 1):
        blast = i <= n
        draw_cell(rng, 'ig' if blast else 'lymphocyte', (257, 257), bg=(200, 190, 210), scale=1.9).save(idb/f'Im{i:03d}_{int(blast)}.tif')
    for lab, ext, size, bg, scale in (('jtsc', 'png', (120, 120), (235, 225, 150), 0.9), ('cellavision_blog', 'png', (300, 300), (230, 210, 205), 1.0)):
        for cls in OTHER:
            d = dest/'otherlab'/lab/cls; d.mkdir(parents=True, exist_ok=True)
            for i in range(max(n//3, 2)): draw_cell(rng, cls, size, bg=bg, scale=scale).save(d/f'{lab}_{cls}_{i}.{ext}')
    (dest/'SAMPLE.md').write_text("# A synthetic sample\n\nDrawn by tools/make_sample.py (seed %d, %d per PBC class): published layouts, "
                                  "not real cells. Tests that need the real data skip when they see this file.\n" % (seed, n))
    return dest

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('dest'); p.add_argument('--n', type=int, default=20); p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(); print(f"wrote {make_sample(a.dest, a.n, a.seed)}")
