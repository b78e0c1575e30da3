"Adaptation without labels (`bloodcell adapt`, `predict --adapt`) and colour normalisation: what they change, and the bad inputs."
import json, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from torch import nn
from bloodcell_fastai.core import ConfigError, DataError
from bloodcell_fastai.export import default_model, load_safe, read_meta
from bloodcell_fastai.adapt import adabn, bn_layers, MIN_ADAPT, BN_SOURCE

CLI = [sys.executable, '-c', 'from bloodcell_fastai.cli import main; main()']

def bloodcell(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)

@pytest.fixture(scope='module')
def unlabelled(tmp_path_factory, data_root):
    "One flat folder of another lab's cells (C-NMC), renamed so nothing in a path says what they are."
    d = tmp_path_factory.mktemp('inbox')
    for i, f in enumerate(sorted((data_root/'cnmc').rglob('*.bmp'))): shutil.copy(f, d/f'cell_{i:03d}.bmp')
    return d

def test_adapt_cli_writes_a_run_that_loads_and_predicts(tmp_path, unlabelled):
    r = bloodcell('adapt', default_model(), unlabelled, '--out', tmp_path/'ad')
    assert r.returncode == 0, r.stderr
    assert f'wrote {tmp_path/"ad"/"model.safetensors"}' in r.stdout and 'aligned' in r.stdout
    rec = json.loads((tmp_path/'ad'/'record.json').read_text())['adapted']
    assert rec['n_images'] == 52 and rec['method'] == 'adabn' and len(rec['files_sha256']) == 64
    assert read_meta(tmp_path/'ad').adapted['images'] == str(unlabelled)
    assert (tmp_path/'ad'/BN_SOURCE).exists() # re-adapting starts from the same source statistics
    src, _ = load_safe(default_model()); new, _ = load_safe(tmp_path/'ad')
    a, b = src.state_dict(), new.state_dict()
    changed = {k for k in a if not torch.equal(a[k].float(), b[k].float())}
    assert changed and all(k.rsplit('.', 1)[-1] in ('running_mean', 'running_var', 'num_batches_tracked') for k in changed)
    p = bloodcell('predict', tmp_path/'ad', unlabelled, '--csv', tmp_path/'p.csv')
    assert p.returncode == 0, p.stderr
    assert (tmp_path/'p.csv').read_text().count('\n') == 53

def test_predict_adapt_on_the_batch(tmp_path, unlabelled):
    r = bloodcell('predict', default_model(), unlabelled, '--adapt', '--csv', tmp_path/'p.csv')
    assert r.returncode == 0, r.stderr
    assert 'adapted to 52 image(s)' in r.stdout
    plain = bloodcell('predict', default_model(), unlabelled, '--csv', tmp_path/'q.csv')
    assert (tmp_path/'p.csv').read_text() != (tmp_path/'q.csv').read_text() # the adapted model decides differently

def test_adapt_bad_inputs_one_line_exit_2(tmp_path, unlabelled, pbc_sample):
    junk = tmp_path/'junk'; junk.mkdir()
    for i in range(40): (junk/f'x{i}.png').write_bytes(b'not an image')
    few = tmp_path/'few'; few.mkdir()
    for f in pbc_sample['basophil'][:5]: shutil.copy(f, few/f.name)
    empty = tmp_path/'empty'; empty.mkdir()
    cases = [(('adapt', default_model(), junk, '--out', tmp_path/'o1'), 'could be read'),
             (('adapt', default_model(), few, '--out', tmp_path/'o2'), f'at least {MIN_ADAPT}'),
             (('adapt', default_model(), empty, '--out', tmp_path/'o3'), 'holds no files'),
             (('adapt', default_model(), unlabelled, '--out', default_model()), 'source run'),
             (('adapt', default_model(), unlabelled, '--out', tmp_path/'o4', '--method', 'magic'), 'choose one of'),
             (('adapt', default_model(), unlabelled), '--out NEW_RUN'),
             (('predict', default_model(), few, '--adapt'), f'at least {MIN_ADAPT}'),
             (('predict', default_model(), unlabelled, '--adapt', '--backend', 'onnx'), 'changes the torch model')]
    for args, msg in cases:
        r = bloodcell(*args)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and msg in err[0], (args, r.stderr)
    assert not (tmp_path/'o1').exists() and not (tmp_path/'o2').exists() # nothing half-written

def test_adabn_needs_batchnorm():
    with pytest.raises(ConfigError, match='no BatchNorm'): adabn(nn.Sequential(nn.Linear(3, 2)), [torch.zeros(4, 3)])

def test_adabn_plain_is_the_target_statistics():
    "Without source statistics, AdaBN's running statistics are the target batches' own."
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    xs = [torch.randn(8, 3, 5, 5)*3 + 2 for _ in range(3)]
    adabn(m, xs)
    h = torch.cat([m[0](x) for x in xs]).detach()
    assert torch.allclose(m[1].running_mean, h.mean((0, 2, 3)), atol=1e-4)
    assert not m.training

def test_colour_normalisation_train_equals_predict(tmp_path, data_root):
    "The square a Reinhard run trained on is the square prediction feeds it, pixel for pixel, and model.json carries the target."
    from PIL import Image
    from bloodcell_fastai.train import tiny_run
    from bloodcell_fastai.data import load_split, presize
    from bloodcell_fastai.inference import read_cell
    run = tiny_run(tmp_path/'r', colour='reinhard')
    meta = read_meta(run)
    assert meta.colour['method'] == 'reinhard' and len(meta.colour['mean']) == 3
    tr = load_split(run/'split.csv').query("split=='train'").head(4)
    cached = presize(tr, meta.item_size, colour=meta.colour).image
    for f, c in zip(tr.file, cached):
        assert np.array_equal(np.asarray(read_cell(f, meta)), np.asarray(Image.open(c).convert('RGB')))
    plain = presize(tr, meta.item_size).image
    assert not np.array_equal(np.asarray(Image.open(plain.iloc[0])), np.asarray(Image.open(cached.iloc[0]))) # it did change the image
    grey = tiny_run(tmp_path/'g', colour='grey')
    a = np.asarray(read_cell(tr.file.iloc[0], read_meta(grey)))
    assert np.array_equal(a[..., 0], a[..., 1])

def test_colour_bad_option():
    from bloodcell_fastai.train import train_config
    with pytest.raises(ConfigError, match='choose one of reinhard, grey'): train_config(colour='macenko')

@pytest.mark.parametrize('args,want', [(['--pretrained'], (0.5, 'reinhard')),
                                       (['--pretrained', '--cell-crop', '0', '--colour', 'none'], (None, None)),
                                       (['--pretrained', '--colour', 'grey', '--epochs', '3'], (0.5, 'grey')),
                                       ([], (0.5, 'reinhard')),
                                       (['--scratch'], (None, None)),
                                       (['--arch', 'resnet18', '--lr', '0.01'], (None, None)),
                                       (['--pretrained', '--arch', 'efficientnet_lite0'], (0.5, 'reinhard'))])
def test_train_cli_recipe_defaults(monkeypatch, tmp_path, args, want):
    "A bare `bloodcell train` (and any `--pretrained`) runs `PRETRAINED_RECIPE` (TIME_TO_ACCURACY's and OTHERLAB's winners); what is given wins; scratch runs keep `TRAIN_DEFAULTS`."
    import bloodcell_fastai.cli as cli
    seen = {}
    def fake_train(out, **kw): seen.update(kw); raise DataError('stop here')
    monkeypatch.setattr(cli, 'train', fake_train)
    with pytest.raises(SystemExit): cli.main(['train', '--out', str(tmp_path/'r'), *args])
    assert (seen['cell_crop'], seen['colour']) == want
    pretrained = '--pretrained' in args or not ('--scratch' in args or '--arch' in args)
    arch = args[args.index('--arch')+1] if '--arch' in args else cli.PRETRAINED_RECIPE['arch'] if pretrained else 'resnet18'
    assert (seen['pretrained'], seen.get('arch', 'resnet18')) == (pretrained, arch)  # scratch without --arch: train_config's default
    given = {a[2:]: float(v) for a, v in zip(args, args[1:]) if a in ('--epochs', '--lr')}
    recipe = {k: cli.PRETRAINED_RECIPE[k] for k in ('size', 'epochs', 'bs', 'lr')} if pretrained else {}
    assert {k: seen[k] for k in ('size', 'epochs', 'bs', 'lr') if k in seen} == {**recipe, **given}  # scratch: train_config fills in TRAIN_DEFAULTS

def test_train_cli_scratch_with_weights_is_refused(tmp_path, capsys):
    from bloodcell_fastai.cli import main
    with pytest.raises(SystemExit) as e: main(['train', '--out', str(tmp_path/'r'), '--scratch', '--pretrained'])
    assert e.value.code != 0 and '--scratch starts from random weights' in capsys.readouterr().err

def test_protocol_preprocessing_train_equals_predict(tmp_path, data_root):
    "A run with the published preprocessing (centre crop, CLAHE, own normalisation, MLP head) records it, and prediction repeats it."
    from PIL import Image
    from bloodcell_fastai.train import tiny_run
    from bloodcell_fastai.data import load_split, presize
    from bloodcell_fastai.inference import read_cell, predict_probs, prepare_items
    run = tiny_run(tmp_path/'p', centre_crop=300, colour='clahe', norm=[0.5, 0.225], head=[16], head_ps=0.3)
    meta = read_meta(run)
    assert (meta.centre_crop, meta.colour['method'], meta.mean, meta.std) == (300, 'clahe', [0.5]*3, [0.225]*3)
    assert meta.arch_kwargs['head'] == [16]
    te = load_split(run/'split.csv').query("split=='test'").head(4)
    cached = presize(te, meta.item_size, colour=meta.colour, centre_crop=meta.centre_crop).image
    for f, c in zip(te.file, cached):
        assert np.array_equal(np.asarray(read_cell(f, meta)), np.asarray(Image.open(c).convert('RGB')))
    model, meta2 = load_safe(run)                                   # the MLP head is rebuilt from model.json
    assert isinstance(model.fc, nn.Sequential) and model.fc[0].out_features == 16 and model.fc[2].p == 0.3
    p = predict_probs(model, meta2, prepare_items(te, meta2))
    assert p.shape == (len(te), len(meta2.classes)) and np.allclose(p.sum(1), 1, atol=1e-5)
    rec = json.loads((run/'record.json').read_text())
    assert rec['final_metrics']['test']['accuracy']['value'] is not None
