"""Tests of the data layer on real PBC pixels.

C-NMC and BloodMNIST fixtures are built here in their published layouts (file names, folders, npz keys) from real
PBC images, because those datasets cannot be shipped or downloaded in CI; the real 52-cell C-NMC sample is used too.
"""
import json, os, shutil, subprocess, sys, threading, zipfile, http.server, functools
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from bloodcell_fastai.data import *
from bloodcell_fastai.core import DataError
from bloodcell_fastai.data import DATASETS, _md5
from bloodcell_fastai.imaging import load_rgb, crop_black_border, pad_square


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def messy_tree(pbc_tree):
    "Real images plus every kind of defect the audit must find."
    good = sorted((pbc_tree/'basophil').glob('*.jpg'))
    (pbc_tree/'basophil'/'zero.jpg').touch()
    (pbc_tree/'basophil'/'notes.jpg').write_text('not an image')
    (pbc_tree/'eosinophil'/'cut.jpg').write_bytes(good[0].read_bytes()[:3000])
    (pbc_tree/'eosinophil'/'.DS_Store').write_bytes(b'\0\0\0\1Bud1' + b'\0'*100)
    shutil.copy(good[1], pbc_tree/'lymphocyte'/'copy_of_basophil.jpg')      # conflicting duplicate
    shutil.copy(good[2], pbc_tree/'basophil'/'same_class_copy.jpg')         # harmless duplicate
    Image.fromarray((np.arange(40*40, dtype=np.uint16).reshape(40,40)*30)).save(pbc_tree/'lymphocyte'/'g16.png')
    Image.new('RGBA', (40,40), (200,0,0,128)).save(pbc_tree/'lymphocyte'/'rgba.png')
    return pbc_tree

def cnmc_fixture(root, pbc_sample, n_subj=4, per_subj=3):
    "C-NMC training layout from real PBC pixels pasted onto a black 450x450 canvas."
    srcs = [f for fs in pbc_sample.values() for f in fs]
    k = 0
    for lbl, prefix in [('all',''), ('hem','H')]:
        for s in range(1, n_subj+1):
            for c in range(1, per_subj+1):
                d = root/f'fold_{s%3}'/lbl; d.mkdir(parents=True, exist_ok=True)
                canvas = Image.new('RGB', (450,450))
                canvas.paste(Image.open(srcs[k % len(srcs)]).convert('RGB').resize((200,150)), (100,140)); k += 1
                canvas.save(d/f'UID_{prefix}{s}_{c}_1_{lbl}.bmp')
    for f in range(3):                                     # every fold has both class folders
        for lbl in ('all','hem'): (root/f'fold_{f}'/lbl).mkdir(parents=True, exist_ok=True)
    return root


# ---------------------------------------------------------------- audit
def test_audit_finds_every_defect(messy_tree):
    a = audit(messy_tree)
    for k in ('n_images','classes','unreadable','non_image','hidden','duplicate_groups','conflicting_duplicates'): assert k in a
    assert [o['file'] for o in a['unreadable']] == ['eosinophil/cut.jpg']
    assert a['zero_byte'] == ['basophil/zero.jpg']
    assert set(a['non_image']) == {'basophil/notes.jpg', 'eosinophil/.DS_Store'}
    assert a['hidden'] == ['eosinophil/.DS_Store']
    assert len(a['duplicate_groups']) == 2
    assert len(a['conflicting_duplicates']) == 1
    assert any(p.startswith('lymphocyte/') for p in a['conflicting_duplicates'][0])
    assert a['classes'] == {'basophil': 13, 'eosinophil': 12, 'lymphocyte': 15}
    assert a['n_images'] == 40 and a['modes']['RGB'] >= 37 and 'I;16' in a['modes'] and 'RGBA' in a['modes']
    json.dumps(a)

def test_audit_cli_writes_json(messy_tree, tmp_path):
    out = tmp_path/'a.json'
    r = subprocess.run([str(Path(sys.executable).parent/'bloodcell'), 'audit', str(messy_tree), '--json', str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())['unreadable'][0]['file'] == 'eosinophil/cut.jpg'
    assert 'wrote' in r.stdout

PBC_DEFECTS = ['neutrophil/.DS_169665.jpg', 'eosinophil/EO_225902.jpg', 'neutrophil/BNE_191112.jpg']

def test_audit_real_pbc_finds_published_defects(pbc_root, pbc_sample, tmp_path):
    "The published defects, in a small copy of real PBC files (nbs/02_data.ipynb audits the whole half)."
    root = tmp_path/'pbc'
    normal = [f for c in ('eosinophil', 'neutrophil') for f in pbc_sample[c][:4] if not f.name.startswith('.')
              and f.name not in ('EO_225902.jpg', 'BNE_191112.jpg')]
    for f in [pbc_root/r for r in PBC_DEFECTS] + normal:
        (root/f.parent.name).mkdir(parents=True, exist_ok=True); shutil.copy(f, root/f.parent.name/f.name)
    a = audit(root)
    assert 'neutrophil/.DS_169665.jpg' in a['non_image']
    assert ['eosinophil/EO_225902.jpg', 'neutrophil/BNE_191112.jpg'] in a['conflicting_duplicates']
    assert a['n_images'] == sum(a['classes'].values()) == len(normal) + 2    # the hidden junk file is not an image


# ---------------------------------------------------------------- locating data
def test_get_dataset_path_order(tmp_path, monkeypatch, data_root):
    assert get_dataset_path('pbc') == data_root/'pbc'
    assert get_dataset_path('pbc', tmp_path) == tmp_path                      # explicit path wins
    monkeypatch.delenv('BLOODCELL_DATA')
    monkeypatch.setenv('BLOODCELL_CACHE', str(tmp_path/'cache'))
    (tmp_path/'cache'/'data'/'pbc'/'x').mkdir(parents=True)
    assert get_dataset_path('pbc') == tmp_path/'cache'/'data'/'pbc'          # then the cache

def test_offline_download_names_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.delenv('BLOODCELL_DATA', raising=False)
    monkeypatch.setenv('BLOODCELL_CACHE', str(tmp_path))
    monkeypatch.setattr(DATASETS['pbc'], 'url', 'http://127.0.0.1:9/pbc.zip')   # nothing listens on port 9
    with pytest.raises(DataError, match=r'127\.0\.0\.1:9/pbc\.zip.*put it in .*data/pbc'):
        get_dataset_path('pbc')
    with pytest.raises(DataError, match='not found'): get_dataset_path('pbc', download=False)
    with pytest.raises(DataError, match='TCIA|tcia'): get_dataset_path('cnmc')

@pytest.fixture
def http_dir(tmp_path):
    "Serve tmp_path/www on a free localhost port."
    www = tmp_path/'www'; www.mkdir()
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www)))
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    yield www, f'http://127.0.0.1:{srv.server_address[1]}'
    srv.shutdown()

def test_download_unpacks_and_checks(http_dir, tmp_path, monkeypatch, pbc_sample):
    www, url = http_dir
    with zipfile.ZipFile(www/'pbc.zip', 'w') as z:
        for c in ('basophil','eosinophil'):
            for f in pbc_sample[c][:3]: z.write(f, f'PBC_dataset_normal_DIB/{c}/{f.name}')
    monkeypatch.delenv('BLOODCELL_DATA', raising=False)
    monkeypatch.setenv('BLOODCELL_CACHE', str(tmp_path/'cache'))
    monkeypatch.setattr(DATASETS['pbc'], 'url', f'{url}/pbc.zip')
    items = load_items('pbc')
    assert len(items) == 6 and set(items.label) == {'basophil','eosinophil'}
    # BloodMNIST: an npz whose md5 does not match is refused and removed
    np.savez(www/'bloodmnist.npz', train_images=np.zeros((2,28,28,3), np.uint8))
    monkeypatch.setattr(DATASETS['bloodmnist'], 'url', f'{url}/bloodmnist{{suffix}}.npz')
    with pytest.raises(DataError, match='md5'): download_dataset('bloodmnist', tmp_path/'bm', size=28)
    assert not list((tmp_path/'bm').glob('*.npz'))


# ---------------------------------------------------------------- datasets
def test_pbc_label_schemes(pbc_root):
    a, b = pbc_items(pbc_root), pbc_items(pbc_root, labels='prefix')
    assert a.label.nunique() == 8 and b.label.nunique() == 13
    assert set(b.label) == set(PBC_PREFIXES)
    assert (b.label.map(PBC_PREFIXES) == a.label).all()                    # prefixes nest inside folders
    assert not a.file.str.contains('/.DS_').any()

def test_unknown_pbc_prefix(pbc_tree):
    shutil.copy(next((pbc_tree/'basophil').glob('*.jpg')), pbc_tree/'basophil'/'XYZ_1.jpg')
    with pytest.raises(DataError, match="XYZ_1.jpg.*unknown PBC prefix 'XYZ'"): pbc_items(pbc_tree)

def test_cnmc_fixture_and_real_sample(tmp_path, pbc_sample, data_root):
    root = cnmc_fixture(tmp_path/'C-NMC_training_data', pbc_sample)
    df = cnmc_items(root)
    assert len(df) == 24 and set(df.subject_id) == {'1','2','3','4','H1','H2','H3','H4'}
    real = load_items('cnmc')
    assert len(real) == 52 and real.subject_id.nunique() == 26
    assert (real[real.label=='hem'].subject_id.str.startswith('H')).all()

def test_cnmc_bad_layouts(tmp_path):
    (tmp_path/'x').mkdir()
    with pytest.raises(DataError, match='fold_0'): cnmc_items(tmp_path/'x')
    (tmp_path/'x'/'fold_0'/'all').mkdir(parents=True)
    with pytest.raises(DataError, match="no 'hem' folder"): cnmc_items(tmp_path/'x')
    (tmp_path/'x'/'fold_0'/'hem').mkdir()
    Image.new('RGB', (8,8)).save(tmp_path/'x'/'fold_0'/'hem'/'cell.bmp')
    with pytest.raises(DataError, match='cell.bmp does not follow C-NMC naming'): cnmc_items(tmp_path/'x')

def test_bloodmnist_fixture(tmp_path, pbc_sample):
    "A BloodMNIST-format npz (real PBC pixels resized to 28 px) keeps its official split."
    ims = np.stack([np.asarray(Image.open(f).convert('RGB').resize((28,28))) for f in pbc_sample['basophil'][:10]])
    lbl = np.array([[0],[1],[2],[3],[4],[5],[6],[7],[0],[1]])
    np.savez(tmp_path/'bloodmnist.npz', train_images=ims[:6], train_labels=lbl[:6], val_images=ims[6:8],
             val_labels=lbl[6:8], test_images=ims[8:], test_labels=lbl[8:])
    df = load_items('bloodmnist', tmp_path)
    assert df.split.value_counts().to_dict() == {'train':6, 'valid':2, 'test':2}
    assert df.label.tolist()[:3] == ['basophil','eosinophil','erythroblast']
    assert split_items(df).split.tolist() == df.split.tolist()              # the official split is kept
    assert Image.open(df.file[0]).size == (28,28)

def test_allidb2_real(real_data_root):
    df = load_items('allidb2')
    assert len(df) == 260 and df.label.value_counts().to_dict() == {'all':130, 'hem':130}


# ---------------------------------------------------------------- bad input
def test_bad_layouts(tmp_path):
    with pytest.raises(DataError, match='does not exist'): folder_items(tmp_path/'nope')
    with pytest.raises(DataError, match="Unknown dataset 'pcb'"): load_items('pcb')
    (tmp_path/'empty').mkdir()
    with pytest.raises(DataError, match='no class sub-folders'): folder_items(tmp_path/'empty')
    flat = tmp_path/'flat'; flat.mkdir()
    Image.new('RGB', (8,8)).save(flat/'a.jpg')
    with pytest.raises(DataError, match='no class sub-folders'): folder_items(flat)
    (tmp_path/'t'/'a').mkdir(parents=True); (tmp_path/'t'/'b').mkdir()
    Image.new('RGB', (8,8)).save(tmp_path/'t'/'a'/'x.jpg')
    with pytest.raises(DataError, match=r't/b holds no images'): folder_items(tmp_path/'t')

def test_one_class_folder_and_dataset_default(tmp_path, pbc_sample):
    "Another lab's folder may hold a single class (mylab/neutrophil/*.jpg); a path given without a dataset is a folder tree."
    cls = tmp_path/'wrap'/'mylab'/'neutrophil'; cls.mkdir(parents=True)
    fs = [f for f in pbc_sample['neutrophil'] if not f.name.startswith('.')][:3]
    for f in fs: shutil.copy(f, cls/f.name)
    assert class_root(tmp_path/'wrap') == tmp_path/'wrap'/'mylab'
    df = load_items(path=tmp_path/'wrap')
    assert df.label.tolist() == ['neutrophil']*3 and sorted(Path(f).name for f in df.file) == sorted(f.name for f in fs)
    assert dataset_for(None, tmp_path) == 'folder' and dataset_for(None) == 'pbc' and dataset_for('cnmc', tmp_path) == 'cnmc'
    (cls/'sub').mkdir()                                                       # a class folder with folders inside is not one
    with pytest.raises(DataError, match='no class sub-folders'): class_root(tmp_path/'wrap')

def test_corrupt_file_found_before_training(messy_tree):
    df = split_items(folder_items(messy_tree), seed=0)
    with pytest.raises(DataError, match=r'cut\.jpg.*corrupt or truncated|unreadable'):
        cell_dataloaders(df, size=32, bs=4, num_workers=0)
    with pytest.warns(UserWarning, match='Dropping'):
        kept = presize(df, 40, on_error='drop')
    assert len(kept) == len(df)-3                                            # zero-byte, non-image, truncated

@pytest.mark.parametrize('make,ok', [
    (lambda f: Image.fromarray(np.full((30,30), 60000, np.uint16)).save(f.with_suffix('.png')), True),
    (lambda f: Image.new('LA', (30,30)).save(f.with_suffix('.png')), True),
    (lambda f: Image.new('P', (30,30)).save(f.with_suffix('.png')), True),
    (lambda f: Image.new('CMYK', (30,30)).save(f.with_suffix('.tif')), True),
])
def test_modes_become_rgb(tmp_path, make, ok):
    make(tmp_path/'im')
    f = next(tmp_path.glob('im.*'))
    im = load_rgb(f)
    assert im.mode == 'RGB' and im.size == (30,30)

def test_oversized_image_is_refused(tmp_path, monkeypatch):
    import bloodcell_fastai.imaging as I
    monkeypatch.setattr(I, 'MAX_PIXELS', 100*100)
    Image.new('RGB', (200,200)).save(tmp_path/'big.png')
    with pytest.raises(DataError, match=r'big\.png is 200x200 pixels, too large'): load_rgb(tmp_path/'big.png')


# ---------------------------------------------------------------- splits
def test_split_grouped_stratified_seeded(pbc_root):
    items = pbc_items(pbc_root).groupby('label').head(150)
    items = pd.concat([items, pbc_items(pbc_root).query("file.str.contains('EO_225902|BNE_191112')")]).drop_duplicates('file')
    a, b, c = split_items(items, seed=1), split_items(items, seed=1), split_items(items, seed=2)
    assert a.split.tolist() == b.split.tolist() and a.split.tolist() != c.split.tolist()
    assert a.groupby('group').split.nunique().max() == 1                     # copies never straddle splits
    pair = a[a.file.str.contains('EO_225902|BNE_191112')]
    assert pair.group.nunique() == 1 and pair.split.nunique() == 1
    frac = a.groupby('label').split.value_counts(normalize=True).unstack()
    assert ((frac.test - 0.2).abs() < 0.05).all() and ((frac.valid - 0.2).abs() < 0.05).all()

def test_split_by_subject(tmp_path, pbc_sample):
    df = cnmc_items(cnmc_fixture(tmp_path/'c', pbc_sample, n_subj=6, per_subj=4))
    s = split_items(df, valid_pct=0.2, test_pct=0.3, seed=0)
    assert s.groupby('subject_id').split.nunique().max() == 1
    assert set(s.split) == {'train','valid','test'}
    assert set(s[s.split=='test'].label) == {'all','hem'}

def test_study_subsets_nested_5_2_3(pbc_root):
    items = pbc_items(pbc_root).groupby('label').head(200)
    subs = study_subsets(items, seed=0)
    assert list(subs) == ['large','medium','small','tiny']
    assert set(subs['tiny'].file) <= set(subs['small'].file) <= set(subs['medium'].file) <= set(subs['large'].file)
    for name, frac in STUDY_SIZES.items():
        s = subs[name]
        assert abs(len(s)/len(items) - frac) < 0.03
        r = s.split.value_counts(normalize=True)
        assert abs(r['train']-0.5) < 0.06 and abs(r['valid']-0.2) < 0.06 and abs(r['test']-0.3) < 0.06
        assert s.label.nunique() == 8

def test_split_csv_roundtrip(tmp_path, pbc_tree):
    df = split_items(folder_items(pbc_tree), seed=0)
    h = save_split(df, tmp_path/'split.csv')
    back = load_split(tmp_path/'split.csv')
    assert back.file.tolist() == df.file.tolist() and back.split.tolist() == df.split.tolist()
    assert save_split(back, tmp_path/'again.csv') == h
    (tmp_path/'bad.csv').write_text('a,b\n1,2\n')
    with pytest.raises(DataError, match='lacks column'): load_split(tmp_path/'bad.csv')


# ---------------------------------------------------------------- presize, balance, dataloaders
def test_presize_cache_reused(pbc_tree, tmp_path):
    df = folder_items(pbc_tree)
    a = presize(df, 64, cache=tmp_path/'c')
    assert all(Image.open(f).size == (64,64) for f in a.image)
    mt = {f: os.path.getmtime(f) for f in a.image}
    b = presize(df, 64, cache=tmp_path/'c')
    assert b.image.tolist() == a.image.tolist() and all(os.path.getmtime(f) == mt[f] for f in b.image)
    c = presize(df, 48, cache=tmp_path/'c')
    assert Image.open(c.image[0]).size == (48,48) and c.image[0] != a.image[0]

def test_crop_and_pad(tmp_path, pbc_sample):
    root = cnmc_fixture(tmp_path/'c', pbc_sample, n_subj=1, per_subj=1)
    f = next(root.rglob('*.bmp'))
    c = crop_black_border(load_rgb(f))
    assert c.size == (200,150)
    assert pad_square(c).size == (200,200)

def test_balance_counts(pbc_tree):
    df = split_items(folder_items(pbc_tree), seed=0, valid_pct=0.25, test_pct=0)
    tr = df[df.split=='train'].label.value_counts()
    b = balance_items(df, n=12)
    assert (b[b.split=='train'].label.value_counts() == 12).all()
    assert (b.dihedral > 0).sum() == (12 - tr).clip(lower=0).sum()
    assert len(b[b.split=='valid']) == len(df[df.split=='valid'])

def test_dataloaders_batches(pbc_tree):
    df = split_items(folder_items(pbc_tree), seed=0)
    dls = cell_dataloaders(df, size=64, bs=8, num_workers=0)
    xb, yb = dls.one_batch()
    assert xb.shape == (8,3,64,64) and dls.vocab == ['basophil','eosinophil','lymphocyte']
    assert -3 < float(xb.mean()) < 3                                          # normalised
    w = cell_dataloaders(df, size=64, bs=8, num_workers=0, balance='weighted')
    assert type(w.train).__name__ == 'WeightedDL'
    n = cell_dataloaders(df, size=64, bs=8, num_workers=0, balance=20)
    assert len(n.train_ds) == 60
    t = heldout_dl(dls)
    assert len(t.dataset) == (df.split=='test').sum()
    with pytest.raises(DataError, match='balance='): cell_dataloaders(df, size=64, balance='yes')
    with pytest.raises(DataError, match="no 'split' column"): cell_dataloaders(df.drop(columns='split'), size=64)
