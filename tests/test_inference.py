"Prediction from a run folder: safe loading, batched predict with abstention/TTA/temperature, CSV/Excel, ONNX, CLI."
import dataclasses, json, os, shutil, sys, warnings
from pathlib import Path
import numpy as np, pandas as pd
from PIL import Image
import pytest
from bloodcell_fastai.core import DataError, ModelFileError, REFER, OOD_STATUS, ERROR_STATUS
from bloodcell_fastai.data import inspect_file, presize
from bloodcell_fastai.imaging import is_hidden
from bloodcell_fastai.export import (ModelMeta, load_safe, read_meta, load_learner_pickle, export_onnx, OnnxModel, load_onnx,
                                     find_models)
from bloodcell_fastai.inference import *
from bloodcell_fastai.app import voila_command, app_env, upload_message, UPLOAD_FIX
from bloodcell_fastai.cli import bloodcell_predict, command_parser


@pytest.fixture(scope='module')
def run(tiny_run): return tiny_run

@pytest.fixture(scope='module')
def loaded(run): return load_safe(run)

@pytest.fixture(scope='module')
def images(run):
    "The run's held-out test images that really are images, with their labels."
    df = pd.read_csv(run/'split.csv')
    df = df[(df.split=='test') & df.file.map(lambda f: not is_hidden(Path(Path(f).name)) and inspect_file(f)['status']=='ok')]
    return df.reset_index(drop=True)

@pytest.fixture
def inbox(tmp_path, images):
    "A folder with 4 real images and the usual debris: empty, text, truncated, hidden."
    d = tmp_path/'inbox'; d.mkdir()
    for f in images.file[:4]: shutil.copy(f, d/Path(f).name)
    (d/'empty.jpg').write_bytes(b'')
    (d/'notes.txt').write_text('slide 12')
    (d/'truncated.jpg').write_bytes(Path(images.file[0]).read_bytes()[:1500])
    (d/'.DS_Store').write_bytes(b'\0\0\0\1Bud1')
    return d

def copy_run(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns('learner.pkl', 'checkpoints', 'model.onnx'))
    return dest


# --- loading ------------------------------------------------------------------------------------------------

def test_load_safe_rejects_bad_model_files(run, tmp_path):
    with pytest.raises(ModelFileError, match='model.json not found'): load_safe(tmp_path)
    bad = copy_run(run, tmp_path/'trunc')
    (bad/'model.safetensors').write_bytes((run/'model.safetensors').read_bytes()[:5000])
    with pytest.raises(ModelFileError, match='truncated or not a safetensors file'): load_safe(bad)
    other = copy_run(run, tmp_path/'other')
    meta = json.loads((other/'model.json').read_text())
    (other/'model.json').write_text(json.dumps({**meta, 'format': 99}))
    with pytest.raises(ModelFileError, match='format 99, this version reads 1'): load_safe(other)
    (other/'model.json').write_text(json.dumps({'format': 1, 'name': 'someone else'}))
    with pytest.raises(ModelFileError, match='not written by bloodcell_fastai'): load_safe(other)
    (other/'model.json').write_text('{"format": 1, "arch"')
    with pytest.raises(ModelFileError, match='not valid JSON'): load_safe(other)
    wrong = copy_run(run, tmp_path/'wrong')
    (wrong/'model.json').write_text(json.dumps({**meta, 'classes': meta['classes'][:3], 'arch_kwargs': {}}))
    with pytest.raises(ModelFileError, match='does not fit a resnet18 with 3 classes'): load_safe(wrong)

def test_load_safe_unknown_architecture(run, tmp_path):
    r = copy_run(run, tmp_path/'r')
    meta = json.loads((r/'model.json').read_text())
    (r/'model.json').write_text(json.dumps({**meta, 'arch': 'resnet_9000'}))
    with pytest.raises(ModelFileError) as e: load_safe(r)
    msg = str(e.value)
    assert '\n' not in msg and "'resnet_9000'" in msg and 'does not know' in msg and str(r/'model.json') in msg

def test_saved_model_readable_by_others(run):
    assert (run/'model.safetensors').stat().st_mode & 0o044, 'model.safetensors must not be private to its owner'

def test_learner_pickle_needs_trust(run, tmp_path):
    with pytest.raises(ModelFileError, match='can run arbitrary code'): load_learner_pickle(run)
    with pytest.warns(UserWarning, match='runs code from the file'): learn = load_learner_pickle(run, trust=True)
    assert list(learn.dls.vocab) == read_meta(run).classes
    with pytest.raises(ModelFileError, match='learner.pkl not found'): load_learner_pickle(copy_run(run, tmp_path/'r'), trust=True)


# --- prediction ---------------------------------------------------------------------------------------------

def test_predict_folder_lists_bad_files(run, inbox):
    res = predict(run, inbox)
    names = res.file.map(lambda f: Path(f).name).tolist()
    assert '.DS_Store' not in names and len(res) == 7 # hidden files are not inputs
    assert names == sorted(names)
    err = res.set_index(res.file.map(lambda f: Path(f).name))
    assert set(err.index[err.status=='error']) == {'empty.jpg', 'notes.txt', 'truncated.jpg'}
    assert 'is empty (0 bytes)' in err.loc['empty.jpg', 'error']
    assert 'notes.txt is not an image file' in err.loc['notes.txt', 'error']
    assert 'truncated' in err.loc['truncated.jpg', 'error']
    good = res[res.status!='error']
    assert len(good) == 4 and good.error.eq('').all()
    ood = good.ood.astype(bool) if 'ood' in good else False                  # the tiny run has an OOD flag (feature_stats)
    expect = np.where(ood, OOD_STATUS, np.where(good.probability >= res.attrs['threshold'], 'ok', REFER))
    assert good.status.tolist() == expect.tolist()
    probs = good[[f'prob_{c}' for c in res.attrs['classes']]].values
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(good.probability, probs.max(1), atol=1e-6)
    assert list(res.columns[:6]) == ['file', 'label', 'probability', 'top3', 'status', 'error']

def test_predict_reports_broken_links(run, images, tmp_path):
    "A dangling symbolic link and a link to itself are rows with an error, not a crash nor a silently missing file."
    d = tmp_path/'links'; d.mkdir()
    for f in images.file[:2]: shutil.copy(f, d/Path(f).name)
    os.symlink(tmp_path/'gone.jpg', d/'dangling.jpg')
    os.symlink('loop', d/'loop')                                        # a link pointing back to itself
    res = predict(run, d)
    by = res.set_index(res.file.map(lambda f: Path(f).name))
    assert len(res) == 4 and set(by.index[by.status==ERROR_STATUS]) == {'dangling.jpg', 'loop'}
    for name in ('dangling.jpg', 'loop'):
        assert 'broken symbolic link' in by.loc[name, 'error'] and str(d/name) in by.loc[name, 'error']
    errs = res.attrs['errors']
    assert sorted(errs) == sorted(np.flatnonzero(res.status==ERROR_STATUS).tolist())
    assert all(isinstance(e, DataError) and 'broken symbolic link' in e.problem and e.fix for e in errs.values())

def test_predict_errors_are_objects_for_the_app(run, inbox):
    "`attrs['errors']` keeps each unreadable file's `DataError` (file, problem, fix); the app words them for an upload."
    res = predict(run, inbox)
    errs = res.attrs['errors']
    names = {Path(res.file[i]).name: e for i, e in errs.items()}
    assert set(names) == {'empty.jpg', 'notes.txt', 'truncated.jpg'} and all(res.status[i] == ERROR_STATUS for i in errs)
    for i, e in errs.items():
        assert isinstance(e, DataError) and Path(e.file) == Path(res.file[i]) and e.problem and e.fix
        assert res.error[i] == str(e)                                    # the table's text is the error's one line
    assert names['empty.jpg'].problem == 'is empty (0 bytes)' and names['notes.txt'].problem == 'is not an image file'
    assert upload_message(names['notes.txt'], 'slide 12.txt') == f"slide 12.txt is not an image file: {UPLOAD_FIX}"
    assert str(inbox) not in upload_message(names['truncated.jpg'], 'scan.jpg')   # the server's paths are not shown
    # an error without fields: the stored path is replaced by the uploaded name, or the name is put in front
    tmp = inbox/'upload_1.jpg'
    assert upload_message(DataError(f"{tmp} is odd: try again"), 'cell.jpg', tmp) == 'cell.jpg is odd: try again'
    assert upload_message('server busy', 'cell.jpg') == 'cell.jpg: server busy'

def test_predict_matches_the_training_evaluation_path(loaded, images):
    "Decoding in memory gives the probabilities of the presize-cache path that scored the held-out split."
    model, meta = loaded
    ref = predict_probs(model, meta, prepare_items(images, meta))
    got = predict(loaded, images.file.tolist(), bs=5)[[f'prob_{c}' for c in meta.classes]].values
    np.testing.assert_allclose(got, ref, atol=1e-5)

def test_read_cell_is_the_presize_step(loaded, images):
    _, meta = loaded
    cached = presize(images[:2], meta.item_size)
    for f, png in zip(cached.file, cached.image):
        assert np.array_equal(np.asarray(read_cell(f, meta)), np.asarray(Image.open(png).convert('RGB')))

def test_read_cells_returns_error_objects(loaded, images, inbox):
    _, meta = loaded
    ims, errs, found = read_cells([images.file[0], inbox/'empty.jpg', inbox/'notes.txt'], meta, n_workers=1)
    assert ims[0] is not None and ims[1] is None and ims[2] is None and errs[0] is None
    assert all(isinstance(e, DataError) for e in errs[1:]) and errs[1].problem == 'is empty (0 bytes)'
    assert Path(errs[2].file) == inbox/'notes.txt' and found == [None, None, None]      # no cell crop in this model

def test_abstention_threshold(loaded, images):
    fs = images.file[:6].tolist()
    never = predict(loaded, fs, threshold=0.0)
    always = predict(loaded, fs, threshold=1.01)
    flagged = lambda d: np.where(d.ood.astype(bool), OOD_STATUS, '') if 'ood' in d else np.full(len(d), '')
    status = lambda d, s: [f or s for f in flagged(d)]                        # the OOD flag overrides either status
    assert never.status.tolist() == status(never, 'ok') and never.label.isin(loaded[1].classes).all()
    assert (always.label==REFER).all() and always.status.tolist() == status(always, REFER)
    assert (always.top3==never.top3).all() # the expert still sees the model's guesses
    mid = float(np.median(never.probability))
    d = predict(loaded, fs, threshold=mid)
    assert ((d.label!=REFER) == (never.probability >= mid)).all()

def test_decide_top_k():
    d = decide(np.array([[.1,.6,.3],[.5,.1,.4]]), ['a','b','c'], threshold=0.55, k=2)
    assert d.label.tolist() == ['b', REFER] and d.top2.tolist() == ['b 0.600; c 0.300', 'a 0.500; c 0.400']

def test_temperature_and_tta(loaded, images):
    fs = images.file[:6].tolist()
    plain = predict(loaded, fs)
    hot = predict(loaded, fs, temperature=5.)
    assert (hot.probability < plain.probability).all() # flatter
    assert (hot.top3.str.split(' ').str[0] == plain.top3.str.split(' ').str[0]).all() # same ranking
    model, meta = loaded
    cal = predict((model, dataclasses.replace(meta, temperature=5.)), fs) # the model's stored temperature is used by default
    np.testing.assert_allclose(cal.probability, hot.probability)
    t1, t2 = predict(loaded, fs, tta=True), predict(loaded, fs, tta=True, n_workers=0)
    np.testing.assert_array_equal(t1.probability, t2.probability) # deterministic
    assert not np.allclose(t1.probability, plain.probability)

def test_image_paths(tmp_path, inbox):
    with pytest.raises(DataError, match='does not exist'): image_paths(tmp_path/'nowhere')
    (tmp_path/'void').mkdir()
    with pytest.raises(DataError, match='holds no files'): image_paths(tmp_path/'void')
    assert [p.name for p in image_paths(str(inbox/'*.jpg'))] == sorted(p.name for p in inbox.glob('*.jpg'))
    assert image_paths([inbox/'a.jpg']) == [inbox/'a.jpg']


# --- outputs and CLI ----------------------------------------------------------------------------------------

def test_write_predictions(run, inbox, tmp_path):
    res = predict(run, inbox)
    csv, xlsx = write_predictions(res, csv=tmp_path/'o'/'p.csv', xlsx=tmp_path/'o'/'p.xlsx')
    assert pd.read_csv(csv).status.tolist() == res.status.tolist()
    x = pd.read_excel(xlsx)
    assert x.file.tolist() == res.file.tolist() and x.error.fillna('').tolist() == res.error.tolist()
    assert sorted(p.name for p in (tmp_path/'o').iterdir()) == ['p.csv', 'p.xlsx'] # no temporary files left
    with pytest.raises(DataError, match='must end in .xlsx'): write_predictions(res, xlsx=tmp_path/'p.xls')

def test_cli_predict(run, inbox, tmp_path, capsys):
    args = vars(command_parser(bloodcell_predict, 'bloodcell predict').parse_args([str(run), str(inbox), '--csv', 'a.csv', '--tta', '--threshold', '0.7']))
    assert args['tta'] is True and args['threshold'] == 0.7 and args['xlsx'] is None
    df = bloodcell_predict(str(run), str(inbox), csv=str(tmp_path/'p.csv'), xlsx=str(tmp_path/'p.xlsx'), threshold=0.0)
    out = capsys.readouterr().out
    assert '7 file(s): 4 classified, 0 referred to an expert (probability < 0), 3 unreadable' in out
    assert f"wrote {tmp_path/'p.csv'}" in out and f"wrote {tmp_path/'p.xlsx'}" in out
    assert pd.read_csv(tmp_path/'p.csv').label.fillna('').tolist() == df.label.tolist()
    only_bad = tmp_path/'bad'; only_bad.mkdir(); (only_bad/'x.jpg').write_text('no')
    with pytest.raises(DataError, match='none of the 1 file'): bloodcell_predict(str(run), str(only_bad), csv=str(tmp_path/'b.csv'))
    assert pd.read_csv(tmp_path/'b.csv').status.tolist() == ['error'] # the table is still written
    with pytest.raises(ModelFileError, match='not a bloodcell run folder'): bloodcell_predict(str(tmp_path), str(inbox))
    with pytest.raises(DataError, match='between 0 and 1'): bloodcell_predict(str(run), str(inbox), threshold=50)


# --- ONNX and Grad-CAM --------------------------------------------------------------------------------------

def test_onnx_export_and_predictor(run, inbox, tmp_path):
    import onnx
    r = copy_run(run, tmp_path/'r')
    with pytest.raises(ModelFileError, match='export it first'): load_onnx(r)
    fn = export_onnx(r)
    assert fn == r/'model.onnx'
    m = onnx.load(str(fn))
    assert max(o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')) >= 17
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'batch' # dynamic batch
    ref = predict(r, inbox, bs=3)
    with pytest.warns(UserWarning, match="needs the torch model's features: no OOD flag with OnnxModel"):
        got = predict(load_onnx(r), inbox, bs=3) # batches of 3 and 1
    cols = [f'prob_{c}' for c in ref.attrs['classes']]
    np.testing.assert_allclose(got[cols].fillna(0).values, ref[cols].fillna(0).values, atol=1e-4)
    assert got.label.tolist() == ref.label.tolist() and 'ood' in ref and 'ood' not in got
    assert got.status.tolist() == ref.status.where(ref.status!=OOD_STATUS, ref.label.map(lambda l: REFER if l==REFER else 'ok')).tolist()
    (r/'model.onnx').write_bytes(fn.read_bytes()[:4000])
    with pytest.raises(ModelFileError, match='truncated or not an ONNX file'): load_onnx(r)

def test_gradcam(loaded, images):
    model, meta = loaded
    im = read_cell(images.file[0], meta)
    def check(r, size=meta.size):
        heat, rgb = r
        assert heat.shape == rgb.shape[:2] == (size, size)
        assert 0 <= heat.min() and heat.max() <= 1 and heat.max() > 0 and 0 <= rgb.min() and rgb.max() <= 1
    check(gradcam(model, meta, im, target=2))
    h2, _ = gradcam(model, meta, im, target=5)
    assert not np.allclose(gradcam(model, meta, im, target=2)[0], h2)   # the map depends on the class explained
    assert gradcam_overlay(model, meta, im).size == (meta.size, meta.size)
    from bloodcell_fastai.models import create_model
    import torch; torch.manual_seed(0) # a random ViT's map can be all zero for some draws (Grad-CAM keeps positive evidence only)
    vit = create_model('vit_tiny_2blocks', 8, img_size=64).eval()        # the one Grad-CAM does transformers too
    check(gradcam(vit, dataclasses.replace(meta, arch='vit_tiny_2blocks', mean=[0.5]*3, std=[0.5]*3), im, target=1))
    assert gradcam(OnnxModel.__new__(OnnxModel), meta, im) is None      # no gradients in an ONNX session
    assert gradcam_overlay(OnnxModel.__new__(OnnxModel), meta, im) is None


# --- finding models and serving the app ---------------------------------------------------------------------

def test_find_models(run, tmp_path):
    d = tmp_path/'models'; d.mkdir()
    assert len(find_models(d)) == 0 and len(find_models(tmp_path/'absent')) == 0
    copy_run(run, d/'good')
    copy_run(run, d/'group'/'broken')
    (d/'group'/'broken'/'model.json').write_text('{}')
    m = find_models(d).set_index('name')
    assert pd.isna(m.loc['good', 'error']) and m.loc['good', 'test_accuracy'] == pytest.approx(
        json.loads((run/'record.json').read_text())['final_metrics']['test']['accuracy']['value'])
    assert m.loc['good', 'classes'] == read_meta(run).classes
    assert 'has format None, this version reads 1' in m.loc['group/broken', 'error']

def test_list_models_puts_the_shipped_model_first(run, tmp_path, monkeypatch):
    import bloodcell_fastai.export as E
    ship, mine = tmp_path/'shipped', tmp_path/'mine'
    copy_run(run, ship/'pbc_x'); copy_run(run, mine/'own'); copy_run(run, ship/'users_run')
    rec = json.loads((ship/'pbc_x'/'record.json').read_text())
    (ship/'pbc_x'/'record.json').write_text(json.dumps({**rec, 'shipped': {'date': 'today'}})) # what tools/ship_model.py marks
    monkeypatch.setattr(E, 'shipped_folder', lambda: ship)
    monkeypatch.setenv('BLOODCELL_MODELS', str(mine))
    f = E.list_models(mine, tmp_path/'absent')   # the models folder given again is listed once
    assert f[['source', 'name']].values.tolist() == [['shipped', 'pbc_x'], ['models folder', 'own']] # an unmarked run is not shipped
    assert E.default_model() == ship/'pbc_x'
    assert E.list_models(shipped=False).name.tolist() == ['own']
    monkeypatch.setattr(E, 'shipped_folder', lambda: tmp_path/'empty')
    with pytest.raises(ModelFileError, match='holds no shipped model'): E.default_model()

def test_the_project_ships_a_model():
    from bloodcell_fastai.export import default_model, read_meta
    d = default_model()
    meta = read_meta(d)
    assert len(meta.classes) == 8 and meta.weights['source'] == 'package' and meta.temperature and meta.ood
    assert (d/'model.safetensors').stat().st_size < 12e6 and (d/'README.md').exists()

def test_voila_command(tmp_path):
    cmd = voila_command(port=8123, max_upload_mb=20)
    assert cmd[1].endswith('nbs/app.ipynb') and Path(cmd[1]).exists()
    assert '--port=8123' in cmd and '--Voila.ip=127.0.0.1' in cmd and '--no-browser' in cmd
    assert f"--Voila.tornado_settings={{'websocket_max_message_size': {28*2**20}}}" in cmd
    with pytest.raises(DataError, match='not found'): voila_command(tmp_path/'nope.ipynb')
    env = app_env(tmp_path/'m', 20)
    assert env['BLOODCELL_MODELS'] == str((tmp_path/'m').resolve()) and env['BLOODCELL_MAX_UPLOAD_MB'] == '20'
    spec = json.loads((Path(env['JUPYTER_PATH'].split(os.pathsep)[0])/'kernels'/'python3'/'kernel.json').read_text())
    assert spec['argv'][0] == sys.executable # the app's kernel is this interpreter, whatever kernelspec is installed


def test_model_json_keys_unknown_to_this_version_survive_a_rewrite(tiny_run, tmp_path):
    import json, shutil
    from bloodcell_fastai.export import update_meta, read_meta
    r = shutil.copytree(tiny_run, tmp_path/'r')
    raw = json.loads((r/'model.json').read_text()); raw['future_key'] = {'a': 1}
    (r/'model.json').write_text(json.dumps(raw))
    update_meta(r, temperature=1.5)
    assert json.loads((r/'model.json').read_text())['future_key'] == {'a': 1} and read_meta(r).temperature == 1.5
