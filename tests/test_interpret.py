"Interpretation: confusion/top losses, CAMs, feature maps, error overlap, label issues, calibration, the CLI."
import json, shutil
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from bloodcell_fastai.core import DataError, ModelFileError
from bloodcell_fastai.data import audit
from bloodcell_fastai.export import load_safe, read_meta, update_meta, labelled_items, same_split
from bloodcell_fastai.inference import predict_probs, predict_logits, prepare_items, model_inputs
from bloodcell_fastai.metrics import simulate_probs
from bloodcell_fastai.models import create_model
from bloodcell_fastai.cams import cam_target_layer, class_cams, token_reshape, denorm, cam_overlay
from bloodcell_fastai.calibrate import softmax_t, fit_temperature, calibration_summary, calibrate_run
from bloodcell_fastai.interpret import *
from bloodcell_fastai.cli import bloodcell_interpret, command_parser

CLASSES = ['basophil', 'eosinophil', 'erythroblast', 'ig', 'lymphocyte', 'monocyte', 'neutrophil', 'platelet']

@pytest.fixture(scope='module')
def run(data_root, tmp_path_factory):
    "One tiny real run (CNN from scratch, 10 PBC images per class, 64 px, one epoch), shared by the module."
    from bloodcell_fastai.train import train
    return train(tmp_path_factory.mktemp('interp')/'run', dataset='pbc', sample=10, size=64, bs=16, epochs=1, lr=3e-3,
                 arch='cnn_scratch', num_workers=0)

@pytest.fixture(scope='module')
def interp(run): return CellInterpretation.from_run(run)

def test_interpretation_matches_predict_probs(run, interp):
    model, meta = load_safe(run)
    test = prepare_items(labelled_items(run), meta)
    assert (interp.items.file == test.file).all() and (interp.items.label == test.label).all()
    assert len(interp.probs) == len(test) == (pd.read_csv(run/'split.csv').split == 'test').sum()
    np.testing.assert_allclose(interp.probs, predict_probs(model, meta, test), atol=1e-5)
    np.testing.assert_allclose(softmax_t(predict_logits(model, meta, test), 2.0), predict_probs(model, meta, test, temperature=2.0), atol=1e-5)
    again = CellInterpretation.from_run(run, logits=interp.logits * 2)  # logits already computed are used as given
    np.testing.assert_allclose(again.probs, softmax_t(interp.logits * 2), atol=1e-12)
    assert (again.targs == interp.targs).all() and len(again.losses) == len(test)

def test_confusion_and_top_losses(interp):
    cm, cmn = interp.confusion_table(), interp.confusion_table(normalize=True)
    assert cm.values.sum() == len(interp.targs) and list(cm.index) == CLASSES
    assert np.trace(cm.values) == (interp.probs.argmax(1) == interp.targs).sum()
    np.testing.assert_allclose(cmn.sum(1)[cm.sum(1) > 0], 1)
    for a, p, n in interp.most_confused_table().itertuples(index=False): assert a != p and cm.loc[a, p] == n
    top = interp.top_losses_table(5)
    assert len(top) == 5 and top.loss.is_monotonic_decreasing
    np.testing.assert_allclose(top.loss, -np.log(top.p_label), rtol=1e-4)   # temperature 1: loss is -log p(label)
    assert (top.prediction.values == np.array(CLASSES)[interp.probs[top.index].argmax(1)]).all()

def test_cam_target_layer_per_family():
    m = create_model('resnet18', 8); assert cam_target_layer(m, 'resnet18') is m.layer4
    m = create_model('resnet50_chopped', 8); assert cam_target_layer(m, 'resnet50_chopped') is m.layer3
    m = create_model('vit_tiny_2blocks', 8, img_size=64); assert cam_target_layer(m, 'vit_tiny_2blocks') is m.blocks[-1].norm1
    m = create_model('lenet5', 8); assert cam_target_layer(m, 'lenet5') is m.conv2[0]

@pytest.mark.parametrize('arch', ['resnet18', 'vit_tiny_2blocks'])
def test_cams_have_image_shape_and_differ_between_classes(arch):
    torch.manual_seed(0)
    model = create_model(arch, 8, img_size=64).eval()
    xb = torch.randn(2, 3, 64, 64)
    maps = np.stack([class_cams(model, arch, xb, c) for c in range(4)])
    assert maps.shape == (4, 2, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    assert np.ptp(maps, axis=0).max() > 0.1   # Grad-CAM depends on the class
    pp = class_cams(model, arch, xb, 0, 'gradcam++')
    assert pp.shape == (2, 64, 64)
    np.testing.assert_allclose(class_cams(model, arch, xb, 0, 'eigencam'), class_cams(model, arch, xb, 3, 'eigencam'))
    with pytest.raises(ValueError, match='Unknown CAM method'): class_cams(model, arch, xb, 0, 'nope')
    from pytorch_grad_cam import GradCAM   # stopping autograd at the target layer changes nothing but the speed
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with GradCAM(model, [cam_target_layer(model, arch)], reshape_transform=token_reshape(model) if 'vit' in arch else None) as cam:
        np.testing.assert_allclose(cam(xb, [ClassifierOutputTarget(2)] * 2), maps[2], atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())

def test_cam_figures(run, interp):
    model, meta = load_safe(run)
    rows = interp.items.head(2)
    fig = plot_class_cams(model, meta, rows, classes=CLASSES[:3])
    assert len(fig.axes) == 2 and all(a.images[0].get_array().shape == (64, 4 * 66 - 2, 3) for a in fig.axes)   # image + 3 classes
    assert [t.get_text().split()[0] for t in fig.axes[0].get_xticklabels()] == ['image'] + CLASSES[:3]
    fig = plot_top_loss_cams(interp, k=2)
    assert len(fig.axes) == 2 and fig.axes[0].images[0].get_array().shape == (64, 5 * 66 - 2, 3)
    img = denorm(model_inputs(rows.head(1), meta), meta.mean, meta.std)
    assert img.shape == (1, 64, 64, 3) and 0 <= img.min() and img.max() <= 1
    assert cam_overlay(img[0], np.zeros((64, 64), np.float32)).dtype == np.uint8

def test_activations_grid_has_layer_channels(run, interp):
    model, meta = load_safe(run)
    convs = conv_layers(model)
    x = model_inputs(interp.items.head(1), meta)[0]
    for _, layer in (convs[0], convs[-1]):
        a = layer_activations(model, x, layer)
        assert a.shape[0] == layer.out_channels
        n, (h, w) = min(len(a), 64), a.shape[1:]
        assert activation_grid(a).shape == (-(-n // 8) * (h + 1) + 1, 8 * (w + 1) + 1)
    assert activation_grid(torch.ones(3, 5, 5), ncols=8).shape == (7, 19)   # 3 maps: one row of 3 tiles

def test_error_overlap_counts_exact():
    t = np.array([0, 1, 2, 0, 1, 2, 2])
    preds = {'a': [0, 1, 2, 1, 0, 0, 2], 'b': [0, 1, 0, 1, 0, 2, 2], 'c': [0, 0, 0, 0, 0, 0, 2]}
    tab = error_overlap(preds, t)
    assert tab.n_wrong.tolist() == [0, 1, 2, 2, 3, 2, 0]
    assert tab.only_right.tolist() == ['', '', 'a', 'c', '', 'b', '']
    c = overlap_counts(tab)
    assert c.index.tolist() == [0, 1, 2, 3] and c.images.tolist() == [2, 1, 3, 1]
    np.testing.assert_allclose(c.share.sum(), 1)
    names = error_overlap({'x': ['a', 'b'], 'y': ['b', 'b']}, np.array(['a', 'a']))
    assert names.n_wrong.tolist() == [1, 2] and names.only_right.tolist() == ['x', '']

def test_label_issues_finds_planted_flips():
    t = np.random.default_rng(0).integers(0, 4, 300)
    p = simulate_probs(t, 4, margin=3.0, seed=1)
    given = t.copy(); flipped = [3, 50, 120]; given[flipped] = (t[flipped] + 2) % 4
    li = label_issues(p, given, list('abcd'), pd.DataFrame({'file': [f'f{i}.jpg' for i in range(300)]}))
    assert set(flipped) <= set(li.index[:6])
    assert li.loc[3, 'file'] == 'f3.jpg' and li.loc[3, 'label'] == 'abcd'[given[3]] and li.loc[3, 'suggested'] == 'abcd'[t[3]]
    assert len(label_issues(simulate_probs(t, 4, margin=6.0, seed=1), t, list('abcd'))) <= 3   # clean labels: (almost) nothing

def test_duplicate_conflicts_match_audit(pbc_root, tmp_path):
    other_eo = next(f for f in sorted((pbc_root/'eosinophil').glob('*.jpg')) if f.name != 'EO_225902.jpg')
    for rel, src in (('eosinophil/EO_225902.jpg', None), ('neutrophil/BNE_191112.jpg', None), ('eosinophil/other.jpg', other_eo)):
        (tmp_path/rel.split('/')[0]).mkdir(exist_ok=True); shutil.copy(src or pbc_root/rel, tmp_path/rel)
    shutil.copy(tmp_path/'neutrophil/BNE_191112.jpg', tmp_path/'neutrophil/copy_same_label.jpg')   # a copy, same label: fine
    from bloodcell_fastai.data import folder_items
    dc = duplicate_conflicts(folder_items(tmp_path))
    assert sorted(Path(f).name for f in dc.file) == ['BNE_191112.jpg', 'EO_225902.jpg', 'copy_same_label.jpg']
    assert set(dc.other_labels) == {'neutrophil', 'eosinophil'}
    assert [sorted(Path(f).name for f in g) for g in audit(tmp_path)['conflicting_duplicates']] == [sorted(Path(f).name for f in dc.file)]

def test_temperature_scaling_lowers_ece():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 3000)
    logits = 4 * 1.5 * (1.5 * np.eye(5)[y] + rng.standard_normal((3000, 5)))   # calibrated logits x 4: over-confident
    T = fit_temperature(logits, y)
    s = calibration_summary(logits, y, T)
    assert 3.5 < T < 4.5
    assert s['ece_after'] < s['ece_before'] / 3 and s['nll_after'] < s['nll_before']
    assert (softmax_t(logits, T).argmax(1) == logits.argmax(1)).all()   # predictions unchanged
    with pytest.raises(DataError): fit_temperature(np.zeros((0, 5)), [])

def test_calibrate_run_stores_temperature(run, tmp_path):
    r = shutil.copytree(run, tmp_path/'run')
    res = calibrate_run(r)
    meta = read_meta(r)
    assert meta.temperature == pytest.approx(res['temperature']) and meta.calibration['fitted_on'] == 'valid'
    assert res['valid']['nll_after'] <= res['valid']['nll_before'] + 1e-9
    model, meta = load_safe(r)
    test = prepare_items(labelled_items(r), meta)
    np.testing.assert_allclose(predict_probs(model, meta, test), softmax_t(predict_logits(model, meta, test), res['temperature']), atol=1e-5)
    assert update_meta(r, temperature=2.0).temperature == 2.0 and read_meta(r).temperature == 2.0   # the one writer of model.json
    assert read_meta(r).calibration == meta.calibration and read_meta(r).classes == meta.classes     # the rest is kept
    with pytest.raises(AttributeError, match="no field 'temprature'"): update_meta(r, temprature=2.0)
    with pytest.raises(AttributeError, match="no field 'item_size'"): update_meta(r, item_size=99)   # a derived property
    assert not list(r.glob('.model.json.tmp*'))

def test_update_meta_refuses_a_non_positive_temperature(run, tmp_path):
    r = shutil.copytree(run, tmp_path/'run')
    with pytest.raises(ValueError, match='positive'): update_meta(r, temperature=-1.0)
    assert read_meta(r).temperature == 1.0

def test_same_split_and_clear_error(run, tmp_path):
    other = shutil.copytree(run, tmp_path/'other')
    assert len(same_split([run, other])) == len(pd.read_csv(run/'split.csv'))
    df = pd.read_csv(other/'split.csv'); df.loc[0, 'split'] = 'train' if df.split[0] != 'train' else 'test'
    df.to_csv(other/'split.csv', index=False)
    with pytest.raises(DataError, match=r'split\.csv .*differ.*same dataset, sample, seed'): same_split([run, other])

def test_labelled_items_errors_and_raw_items(run, tmp_path):
    for c, f in (('blast', 0), ('basophil', 1)):
        (tmp_path/c).mkdir(); shutil.copy(pd.read_csv(run/'split.csv').file[f], tmp_path/c/'x.jpg')
    with pytest.raises(DataError, match='not known to the model: blast'): labelled_items(run, tmp_path)
    with pytest.raises(ModelFileError, match='not a bloodcell run folder'): labelled_items(tmp_path)
    shutil.rmtree(tmp_path/'blast'); shutil.copytree(tmp_path/'basophil', tmp_path/'Eosinophil')
    df = labelled_items(run, tmp_path)                                   # raw, class-matched items: nothing presized yet
    assert sorted(df.label) == ['basophil', 'eosinophil'] and 'image' not in df
    _, meta = load_safe(run)
    assert prepare_items(df, meta).image.map(lambda f: Path(f).exists()).all()

def test_cli_interpret_writes_figures_and_tables(run, tmp_path, capsys):
    args = vars(command_parser(bloodcell_interpret, 'bloodcell interpret').parse_args(
        [str(run), '--out', str(tmp_path/'o'), '--n-top-losses', '4', '--compare', str(run), '--save_temperature']))
    assert args['compare'] == [str(run)] and args['save_temperature'] is True and args['n_top_losses'] == 4
    with pytest.raises(ValueError, match="Unknown CAM method 'gradcum'"): bloodcell_interpret(str(run), out=str(tmp_path/'x'), cam='gradcum')
    assert not (tmp_path/'x').exists()
    r = shutil.copytree(run, tmp_path/'run')
    written = bloodcell_interpret(str(r), out=str(tmp_path/'o'), n_top_losses=4, compare=[str(run)])
    names = {p.name for p in written}
    assert {'predictions.csv', 'confusion_matrix.png', 'confusion_matrix_normalised.csv', 'most_confused.csv', 'top_losses.png',
            'cams_top_losses.png', 'cams_per_class.png', 'activations_first.png', 'activations_last.png', 'reliability.png',
            'calibration.json', 'label_issues.csv', 'error_overlap.csv', 'error_overlap_counts.csv'} <= names
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    out = capsys.readouterr().out
    assert all(f"wrote {p}" in out for p in written)
    preds = pd.read_csv(tmp_path/'o'/'predictions.csv')
    acc = (preds.label == preds.prediction).mean()
    assert f"test split: accuracy {acc:.4f}; temperature " in out        # interpret_run's (files, accuracy, temperature)
    assert len(pd.read_csv(tmp_path/'o'/'top_losses.csv')) == 4
    cal = json.loads((tmp_path/'o'/'calibration.json').read_text())
    assert cal['saved'] is False and read_meta(r).temperature == 1.0   # interpret does not touch the run by default
    counts = pd.read_csv(tmp_path/'o'/'error_overlap_counts.csv')
    assert counts.images.sum() == len(pd.read_csv(tmp_path/'o'/'predictions.csv'))
    assert counts.images[1] == 0   # a run compared with itself: never exactly one of two wrong
