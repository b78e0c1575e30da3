"""Cross-lab robustness on real images: the cell-centred crop (PBC, C-NMC, ALL-IDB2), the other-lab augmentation,
the OOD flag against C-NMC cells, restricted evaluation, and the benchmark's shifts (tiny 8-class PBC model, 48 px)."""
import json, shutil, warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from skimage.color import rgb2hed
from fastai.vision.all import PILImage, TensorImage
from bloodcell_fastai.imaging import *
from bloodcell_fastai.augment import *
from bloodcell_fastai.ood import *
from bloodcell_fastai.calibrate import calibrate_ood
from bloodcell_fastai.shifts import *
from bloodcell_fastai.data import load_items, split_items, presize, cell_dataloaders
from bloodcell_fastai.core import DataError, OOD_STATUS, NO_CELL_STATUS, ERROR_STATUS
from bloodcell_fastai.export import ModelMeta, load_safe, read_meta
from bloodcell_fastai.inference import predict_probs, read_cell_found, prepare_items, predict, score_items
from bloodcell_fastai.metrics import restrict_probs
from bloodcell_fastai.train import train
from bloodcell_fastai.evaluate import evaluate_run

ROBUST_RUN = dict(size=48, bs=16, epochs=2, lr=2e-3, num_workers=0, precision='fp32', sample=10)
WHITE = ['basophil', 'eosinophil', 'lymphocyte', 'monocyte', 'neutrophil'] # the other lab's five classes


@pytest.fixture(scope='module')
def cnmc_files(data_root): return sorted((data_root/'cnmc').rglob('*.bmp'))

@pytest.fixture(scope='module')
def allidb_files(data_root): return sorted((data_root/'allidb2').rglob('*.tif'))

@pytest.fixture(scope='module')
def pbc(pbc_sample):
    "The PBC sample without the hidden junk files the published set contains (`.DS_*.jpg`)."
    return {c: [f for f in fs if not f.name.startswith('.')] for c,fs in pbc_sample.items()}

@pytest.fixture(scope='module')
def cells(pbc, cnmc_files, allidb_files):
    "Real cells from the three labs: 7 PBC nucleated classes (2 each), C-NMC and ALL-IDB2."
    return ([fs[0] for c,fs in pbc.items() if c!='platelet'] + [fs[5] for c,fs in pbc.items() if c!='platelet']
            + cnmc_files[::9] + allidb_files[::37])

@pytest.fixture(scope='module')
def run(data_root, tmp_path_factory):
    "A tiny 8-class PBC model trained once with the cell crop and the other-lab augmentation, OOD calibrated."
    return train(tmp_path_factory.mktemp('runs')/'robust', cell_crop=0.5, robust_aug=True, dataset='pbc',
                 data=str(data_root/'pbc'), **ROBUST_RUN)

@pytest.fixture(scope='module')
def small_items(pbc):
    rows = [(str(f), c) for c,fs in pbc.items() for f in fs[:6]]
    df = pd.DataFrame(rows, columns=['file','label'])
    return df.assign(split=np.where(df.groupby('label').cumcount() < 4, 'train', 'valid'))


def stain_share(im, frac):
    "Fraction of stain pixels in the central square (`frac` of the side) and in the outer ring of an image."
    m = stain_mask(np.asarray(im, dtype=np.float32)/255.)
    n = m.shape[0]; a, b = round(n*(1-frac)/2), round(n*(1+frac)/2)
    ring = np.ones_like(m); ring[n//10:-n//10, n//10:-n//10] = False
    return m[a:b, a:b].mean(), m[ring].mean()


# --- the cell-centred crop ------------------------------------------------------------------------------------------

def test_find_cell_on_three_labs(cells):
    for f in cells:
        im = load_rgb(f); b = find_cell(im)
        assert b is not None, f"no cell found in {f}"
        x0,y0,x1,y1 = b
        assert 0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height
        # the box holds the stain: far more stained pixels inside it than outside it
        m = stain_mask(np.asarray(im, dtype=np.float32)/255.)
        inside = np.zeros_like(m); inside[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
        assert m[inside].mean() > 0.25 and m[inside].mean() > 5*m[~inside].mean(), (f, m[inside].mean(), m[~inside].mean())

def test_cell_crop_contains_nucleus_at_ratio(cells):
    for ratio in (0.5, 0.7):
        for f in cells:
            im = load_rgb(f); crop, box = crop_to_cell(im, ratio)
            assert box is not None and crop.width == crop.height, f
            # the nucleus sits in the centre of the crop, and hardly any stain is near its edges
            centre, ring = stain_share(crop, ratio*0.8)
            assert centre > 0.3 and ring < 0.15, (f, centre, ring)
            # found again in the crop, the nucleus spans `ratio` of the side and is centred
            b2 = find_cell(crop)
            side = max(b2[2]-b2[0], b2[3]-b2[1])/crop.width
            assert abs(side - ratio) < 0.1, (f, ratio, side)
            assert abs((b2[0]+b2[2])/2/crop.width - 0.5) < 0.1 and abs((b2[1]+b2[3])/2/crop.height - 0.5) < 0.1, f

def test_cell_crop_pads_cells_that_fill_the_frame(allidb_files):
    im = load_rgb(allidb_files[0]); crop, box = crop_to_cell(im, 0.5)
    assert crop.width > im.width # the square runs past the image ...
    corner = np.asarray(crop)[:3, :3].reshape(-1, 3)
    assert (np.abs(corner - np.array(border_colour(im))) <= 1).all() # ... and is padded with the smear's own colour

def test_cell_crop_without_a_cell():
    for im in (Image.new('RGB', (90, 70), (245, 225, 215)), Image.new('RGB', (50, 50), (0, 0, 0))):
        crop, box = crop_to_cell(im)
        assert box is None and crop is im # kept whole, flagged
    with pytest.raises(ValueError, match=r'ratio=1\.5: give a fraction'): crop_to_cell(Image.new('RGB', (9, 9)), 1.5)

def test_presize_cell_crop_flags_cache_and_errors(pbc, cnmc_files, tmp_path):
    Image.new('RGB', (64, 64), (245, 225, 215)).save(tmp_path/'field.png')
    files = [str(pbc['neutrophil'][0]), str(cnmc_files[0]), str(tmp_path/'field.png')]
    p = presize(pd.DataFrame({'file': files, 'label': ['a','b','c']}), 64, cell_crop=0.5, cache=tmp_path/'c')
    assert p.cell_found.tolist() == [True, True, False]
    assert all(Image.open(f).size == (64, 64) for f in p.image) and '_cell0.5' in p.image.iloc[0]
    t0 = Path(p.image.iloc[0]).stat().st_mtime_ns
    presize(pd.DataFrame({'file': files}), 64, cell_crop=0.5, cache=tmp_path/'c')
    assert Path(p.image.iloc[0]).stat().st_mtime_ns == t0 # cached, not recomputed
    (tmp_path/'bad.jpg').write_bytes(b'\xff\xd8 truncated')
    bad = pd.DataFrame({'file': files + [str(tmp_path/'bad.jpg')]})
    with pytest.raises(DataError, match='bad.jpg'): presize(bad, 64, cell_crop=0.5, cache=tmp_path/'c')
    with pytest.warns(UserWarning, match='bad.jpg'): d = presize(bad, 64, cell_crop=0.5, cache=tmp_path/'c', on_error='drop')
    assert len(d) == 3 and d.cell_found.tolist() == [True, True, False]

def test_read_cell_found_matches_presize(pbc, tmp_path):
    meta = ModelMeta('resnet18', ['a'], 48, [0.5]*3, [0.5]*3, presize=64, preprocess=dict(cell_crop=dict(ratio=0.5)))
    assert meta.item_size == 64 and meta.cell_crop == 0.5
    f = pbc['monocyte'][1]
    im, found = read_cell_found(f, meta)
    p = prepare_items(pd.DataFrame({'file': [str(f)]}), meta)
    assert found and p.cell_found.iloc[0]
    np.testing.assert_array_equal(np.asarray(im), np.asarray(Image.open(p.image.iloc[0]).convert('RGB')))
    # without the key, the image is framed as before (no crop, no flag)
    im2, found2 = read_cell_found(f, ModelMeta('resnet18', ['a'], 48, [0.5]*3, [0.5]*3, presize=64))
    assert found2 is None and np.abs(np.asarray(im2, dtype=int) - np.asarray(im, dtype=int)).mean() > 5
    with pytest.raises(DataError, match='does not exist'): read_cell_found(tmp_path/'nope.jpg', meta)


# --- augmentation for other labs -----------------------------------------------------------------------------------

def test_hed_conversion_matches_skimage(pbc):
    a = np.asarray(load_rgb(pbc['eosinophil'][0]).resize((40, 40)), dtype=np.float32)/255
    x = torch.from_numpy(a).permute(2, 0, 1)[None]
    np.testing.assert_allclose(rgb_to_hed(x).clamp_min(0)[0].permute(1, 2, 0).numpy(), rgb2hed(a), atol=1e-4)
    np.testing.assert_allclose(hed_to_rgb(rgb_to_hed(x)).numpy(), x.numpy(), atol=1e-4)

def test_hed_jitter_changes_stain_not_white(pbc):
    x = TensorImage(torch.from_numpy(np.asarray(load_rgb(pbc['basophil'][0]).resize((48, 48)), dtype=np.float32)/255).permute(2,0,1)[None].repeat(4,1,1,1))
    x[:, :, :4, :4] = 1. # a white (unstained) corner
    y = HEDJitter(max_scale=0.3, max_shift=0., p=1.)(x, split_idx=0)
    assert (y - x).abs().mean() > 0.01 # the stain changed ...
    np.testing.assert_allclose(y[:, :, :4, :4].numpy(), 1., atol=1e-4) # ... white background stays white
    assert (y[0] - y[1]).abs().mean() > 1e-3 # a different draw per image
    z = HEDJitter(max_scale=0., max_shift=0., p=1.)(x, split_idx=0)
    np.testing.assert_allclose(z.numpy(), x.numpy(), atol=1e-4)
    assert HEDJitter(p=1.)(x, split_idx=1) is x # never on validation batches

def test_random_blur_smooths():
    g = torch.Generator().manual_seed(0)
    x = TensorImage(torch.rand(3, 3, 32, 32, generator=g))
    y = RandomBlur(max_sigma=0.06, p=1.)(x, split_idx=0)
    lap = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()
    assert lap(y) < 0.8*lap(x) and abs(float(y.mean() - x.mean())) < 0.01
    flat = TensorImage(torch.full((2, 3, 16, 16), 0.3))
    np.testing.assert_allclose(RandomBlur(max_sigma=0.1, p=1.)(flat, split_idx=0).numpy(), 0.3, atol=1e-5)

def test_item_tfms_scale_jpeg_downscale(pbc):
    im = PILImage(load_rgb(pbc['lymphocyte'][0]).resize((128, 128)))
    b0 = find_cell(im); s0 = max(b0[2]-b0[0], b0[3]-b0[1])
    out = RandomScale(0.5, 0.5, p=1.)(im, split_idx=0) # zoom out: the cell halves
    b1 = find_cell(out); s1 = max(b1[2]-b1[0], b1[3]-b1[1])
    assert out.size == im.size and abs(s1/s0 - 0.5) < 0.12, s1/s0
    assert RandomScale(0.5, 0.5, p=1.)(im, split_idx=1) is im # not on validation
    for t in (RandomJPEG(10, 10, p=1.), RandomDownscale(0.3, p=1.)):
        o = t(im, split_idx=0)
        assert isinstance(o, PILImage) and o.size == im.size
        assert np.abs(np.asarray(o, dtype=int) - np.asarray(im, dtype=int)).mean() > 0.5, type(t).__name__

def test_robust_tfms_ranges():
    items, batch = robust_tfms(cover=0.5)
    sc = [t for t in items if isinstance(t, RandomScale)][0]
    assert (sc.min_zoom, sc.max_zoom) == pytest.approx((0.3, 1.4)) # nucleus 15%-70% of the frame
    sc2 = [t for t in robust_tfms(cover=0.2)[0] if isinstance(t, RandomScale)][0]
    assert sc2.min_zoom == pytest.approx(0.75) and sc2.max_zoom == pytest.approx(3.5)
    with pytest.raises(ValueError, match='must be below'): robust_tfms(min_cover=0.8, max_cover=0.7)

def test_robust_dl_kwargs(small_items):
    assert robust_dl_kwargs(small_items, 0.5, robust_aug=False) == {}
    kw = robust_dl_kwargs(small_items, 0.5)
    assert set(kw) == {'item_tfms', 'extra_batch_tfms'} # what cell_block/cell_dataloaders would take
    # with the crop the frame is already normalised: only the jitter of cell detection (CROP_COVER) is left
    sc = [t for t in kw['item_tfms'] if isinstance(t, RandomScale)][0]
    assert (sc.min_zoom, sc.max_zoom) == pytest.approx(CROP_COVER)
    kw2 = robust_dl_kwargs(small_items, 0.5, robust_kwargs=dict(min_cover=0.15, max_cover=0.7)) # explicit options win
    assert [t for t in kw2['item_tfms'] if isinstance(t, RandomScale)][0].max_zoom == pytest.approx(1.4)
    # without the crop, the zoom range comes from the cells' measured size in the training images (small in PBC)
    sc = [t for t in robust_dl_kwargs(small_items)['item_tfms'] if isinstance(t, RandomScale)][0]
    assert sc.max_zoom > 2

def test_robust_augmentation_train_only(small_items):
    dls = cell_dataloaders(small_items, size=48, bs=8, cell_crop=0.5, num_workers=0, seed=1, **robust_dl_kwargs(small_items, 0.5))
    ref = cell_dataloaders(small_items, size=48, bs=8, cell_crop=0.5, num_workers=0, seed=1)
    names = [type(t).__name__ for t in dls.train.after_batch.fs]
    assert names.index('HEDJitter') < names.index('Normalize') and 'RandomBlur' in names
    assert {'RandomScale','RandomJPEG','RandomDownscale'} <= {type(t).__name__ for t in dls.train.after_item.fs}
    assert not {'HEDJitter','RandomScale'} & {type(t).__name__ for t in ref.train.after_batch.fs + ref.train.after_item.fs}
    assert 'cell_found' in dls.items_df and dls.items_df.image.str.contains('_cell0.5').all()
    # validation is exactly the plain cell-cropped pipeline
    np.testing.assert_allclose(dls.valid.one_batch()[0].cpu().numpy(), ref.valid.one_batch()[0].cpu().numpy(), atol=1e-6)
    assert dls.train.one_batch()[0].shape == (8, 3, 48, 48)

# --- training with the options -------------------------------------------------------------------------------------

def test_train_records_robust_options(run):
    meta = read_meta(run)
    assert meta.preprocess['cell_crop'] == {'ratio': 0.5} and meta.cell_crop == 0.5
    rec = json.loads((run/'record.json').read_text())
    assert rec['status'] == 'done' and rec['config']['cell_crop'] == 0.5 and rec['config']['robust_aug']
    assert rec['config']['max_hue'] == 0.1 and rec['config']['max_lighting'] == 0.3
    assert rec['ood']['score'] == 'feature_stats' and 'means' not in rec['ood'] # the summary; statistics stay in model.json
    ood = meta.ood
    assert ood['score'] == 'feature_stats' and ood['percentile'] == 95 and np.isfinite(ood['threshold'])
    # class means of the last stage's per-channel mean and std: 2 x 512 statistics for a ResNet18
    assert np.array(ood['means']).shape == (len(meta.classes), 1024) and len(ood['var']) == 1024
    assert rec['final_metrics']['test']['n_images'] > 0


# --- out-of-distribution flag --------------------------------------------------------------------------------------

def test_ood_scores_known_values():
    z = np.array([[10., 0., 0.], [0., 0., 0.]])
    e = ood_scores(z, 'energy'); assert e[0] < e[1] and e[1] == pytest.approx(-np.log(3))
    m = ood_scores(z, 'msp'); assert m[1] == pytest.approx(2/3) and m[0] < 1e-3
    st = ood_stats(np.array([[1., 0.], [2., 0.], [0., 1.]]), np.array(['a', 'a', 'b']), 'cosine')
    c = ood_scores(None, 'cosine', np.array([[3., 0.], [1., 1.], [-1., 0.]]), st)
    np.testing.assert_allclose(c, [0., 1-np.sqrt(0.5), 1.], atol=1e-6)
    st = ood_stats(np.array([[0., 0.], [2., 2.], [10., 10.]]), np.array(['a', 'a', 'b']), 'mahalanobis')
    mh = ood_scores(None, 'mahalanobis', np.array([[1., 1.], [30., 30.]]), st)
    assert mh[0] == pytest.approx(0.) and mh[1] > 10*mh[0] + 1
    with pytest.raises(ValueError, match='choose one of'): ood_scores(z, 'entropy')
    with pytest.raises(ValueError, match="needs the model's features"): ood_scores(z, 'cosine')

def test_feature_stats_capture():
    "`feature_stats` reads timm's last feature stage (mean and std per channel); models without one use the penultimate features."
    from bloodcell_fastai.models import create_model
    m = create_model('resnet18', 3).eval()
    assert stats_module(m) is m.layer4
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), capture_features(m, 'feature_stats') as f: m(x)
    with torch.no_grad(): fmap = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(x))))))))
    np.testing.assert_allclose(f[0].numpy(), torch.cat([fmap.mean((2, 3)), fmap.std((2, 3), correction=0)], 1).numpy(), atol=1e-5)
    assert pooled_stats(torch.rand(2, 5, 7)).shape == (2, 14) # ViT tokens: (n, tokens, c)
    with torch.no_grad(), capture_features(m, 'energy') as f: m(x)
    assert f == [] # logit scores need no features
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert stats_module(mlp) is None
    with torch.no_grad(), capture_features(mlp, 'feature_stats') as f: mlp(torch.rand(3, 12))
    assert f[0].shape == (3, 4) # the input of the last linear layer

def test_ood_separates_pbc_from_cnmc(run, cnmc_files):
    sp = pd.read_csv(run/'split.csv')
    pbc = sp[sp.split!='train'].file.tolist()
    auc = ood_auroc(run, pbc, cnmc_files)
    assert auc > 0.5, auc # better than chance on a tiny model
    # calibration: the threshold is the 95th percentile of the validation scores
    model, meta = load_safe(run)
    z, s = score_items(model, meta, prepare_items(sp[sp.split=='valid'].reset_index(drop=True), meta))
    assert meta.ood['threshold'] == pytest.approx(np.percentile(s, 95))

def test_predict_ood_and_cell_statuses(run, cnmc_files, tmp_path):
    sp = pd.read_csv(run/'split.csv')
    pbc = sp[sp.split=='test'].file.tolist()[:8]
    Image.new('RGB', (120, 120), (245, 225, 215)).save(tmp_path/'empty_field.png')
    (tmp_path/'broken.bmp').write_bytes(b'BM nothing')
    files = pbc + [str(f) for f in cnmc_files[:8]] + [str(tmp_path/'empty_field.png'), str(tmp_path/'broken.bmp')]
    res = predict(run, files, n_workers=1)
    assert len(res) == len(files) and res.file.tolist() == files
    assert res.status.iloc[-1] == ERROR_STATUS and 'broken.bmp' in res.error.iloc[-1]
    assert res.cell_found.iloc[-2] == False                             # the empty field: no cell, unless the OOD flag says more
    assert res.status.iloc[-2] == (OOD_STATUS if res.ood.iloc[-2] else NO_CELL_STATUS)
    assert res.cell_found.iloc[:16].all()
    ood_pbc, ood_cnmc = res.ood.iloc[:8].astype(float).mean(), res.ood.iloc[8:16].astype(float).mean()
    assert ood_cnmc > ood_pbc and ood_cnmc >= 0.5, (ood_pbc, ood_cnmc)
    assert (res.status.iloc[8:16][res.ood.iloc[8:16].astype(bool)] == OOD_STATUS).all()
    assert set(res.status) <= {'ok', 'refer to expert', OOD_STATUS, NO_CELL_STATUS, 'error'}
    # the same probabilities as the presize path
    model, meta = load_safe(run)
    p = predict_probs(model, meta, prepare_items(pd.DataFrame({'file': pbc}), meta))
    np.testing.assert_allclose(res[[f'prob_{c}' for c in meta.classes]].iloc[:8].values, p, atol=1e-5)
    # TTA changes the probabilities, not the OOD score (taken from the plain pass) nor the cell flag
    tta = predict(run, files[:16], tta=True, n_workers=1)
    np.testing.assert_allclose(tta.ood_score.values, res.ood_score.iloc[:16].values, atol=1e-4)
    assert tta.cell_found.all() and not np.allclose(tta[[f'prob_{c}' for c in meta.classes]].values,
                                                   res[[f'prob_{c}' for c in meta.classes]].iloc[:16].values)

def test_calibrate_ood_other_scores(run, cnmc_files):
    sp = pd.read_csv(run/'split.csv')
    valid = sp[sp.split=='valid'].reset_index(drop=True)
    for score in ('energy', 'msp', 'mahalanobis', 'cosine'):
        ood = calibrate_ood(run, score)
        assert read_meta(run).ood['score'] == score and np.isfinite(ood['threshold'])
        model, meta = load_safe(run)
        z, s = score_items(model, meta, prepare_items(valid, meta)) # every score can be computed again from the meta
        assert s.shape == (len(valid),) and ood['threshold'] == pytest.approx(np.percentile(s, 95))
        assert predict(run, [str(f) for f in cnmc_files[:2]], n_workers=1).ood_score.notna().all()
    with pytest.raises(ValueError, match='choose one of'): calibrate_ood(run, 'entropy')
    calibrate_ood(run) # back to the default the other tests expect


# --- restricted evaluation -----------------------------------------------------------------------------------------

def test_restricted_evaluation_on_five_classes(run, pbc, tmp_path):
    "An 8-class PBC model on a folder with only the five white-cell classes of the issue."
    for c in WHITE:
        (tmp_path/'five'/c).mkdir(parents=True)
        for f in pbc[c][6:10]: shutil.copy(f, tmp_path/'five'/c/f.name)
    rep = evaluate_run(run, data=str(tmp_path/'five'), dataset='folder', restrict_classes=True, n_boot=20)
    assert rep['shared_classes'] == WHITE and rep['n_model_classes'] == 8
    r = rep['restricted']
    assert r['classes'] == WHITE and r['n_images'] == 20
    assert r['accuracy']['value'] >= rep['accuracy']['value'] # restricting can only remove errors
    # the restricted predictions are the renormalised probabilities of the cell-cropped images
    model, meta = load_safe(run)
    df = load_items('folder', tmp_path/'five')
    p = restrict_probs(predict_probs(model, meta, prepare_items(df, meta)), meta.classes, WHITE)
    cm = np.zeros((5, 5), int)
    for t, q in zip(df.label.map(WHITE.index), p.argmax(1)): cm[t, q] += 1
    assert r['confusion_matrix'] == cm.tolist()


# --- the benchmark's shifts ----------------------------------------------------------------------------------------

def test_shift_images(pbc):
    im = load_rgb(pbc['neutrophil'][2])
    b0 = find_cell(im); r0 = max(b0[2]-b0[0], b0[3]-b0[1])/im.width
    z = shift_image(im, 'zoom'); bz = find_cell(z)
    assert max(bz[2]-bz[0], bz[3]-bz[1])/z.width > 0.65 > r0 # the cell now fills the frame
    a = np.asarray(im, dtype=float)
    for k in ('stain', 'blur', 'jpeg', 'downscale'):
        s = shift_image(im, k, item_size=80)
        assert s.size == im.size and s.mode == 'RGB' and np.abs(np.asarray(s, dtype=float) - a).mean() > 1, k
    assert shift_image(im, 'clean') is im
    with pytest.raises(ValueError, match='choose one of'): shift_image(im, 'rotate')

def test_shift_accuracy_table(run, tmp_path):
    sp = pd.read_csv(run/'split.csv')
    sh = make_shifts(sp[sp.split=='test'].head(4), tmp_path/'shifts', item_size=64, n_workers=1)
    assert len(sh) == 4*len(SHIFTS) and sh.file.map(lambda f: Path(f).exists()).all()
    t = shift_accuracy(run, sh)
    assert list(t.index) == list(SHIFTS) and (t.n == 4).all()
    assert t.accuracy.between(0, 1).all() and t.ood_flagged.between(0, 1).all()
    if t.loc['clean', 'accuracy'] > 0: assert t.loc['clean', 'of_clean'] == pytest.approx(1.)
