"Ensembles of run folders: collecting members' probabilities, the ensemble folder, prediction, clear errors, the CLI."
import json, shutil
from pathlib import Path
import numpy as np, pandas as pd, pytest
from bloodcell_fastai.core import DataError
from bloodcell_fastai.export import load_safe, read_meta, update_meta
from bloodcell_fastai.inference import predict_probs, prepare_items
from bloodcell_fastai.metrics import encode_targets
from bloodcell_fastai.ensemble import *
from bloodcell_fastai.cli import bloodcell_ensemble, command_parser

@pytest.fixture(scope='module')
def runs(data_root, tmp_path_factory):
    "Three tiny real runs on one split: CNN from scratch at 64 and 48 px, LeNet-5 at 64 px with temperature 2."
    from bloodcell_fastai.train import train
    root = tmp_path_factory.mktemp('ens')
    opts = dict(dataset='pbc', sample=10, bs=16, epochs=1, lr=3e-3, num_workers=0, seed=42)
    rs = [train(root/'cnn64', arch='cnn_scratch', size=64, **opts), train(root/'cnn48', arch='cnn_scratch', size=48, **opts),
          train(root/'lenet64', arch='lenet5', size=64, **opts)]
    update_meta(rs[2], temperature=2.0)
    return rs

@pytest.fixture(scope='module')
def ens_dir(runs):
    d = runs[0].parent/'ensembles'/'grid'
    ensemble_runs(runs, d, method='grid', fitness='accuracy', step=0.1, n_boot=50)
    return d

def test_members_predict_with_their_own_meta(runs):
    _, test, classes = ensemble_data(runs)
    probs = members_probs(runs, test)
    assert [p.shape for p in probs] == [(len(test), len(classes))] * 3
    model, meta = load_safe(runs[2])
    assert meta.temperature == 2.0
    np.testing.assert_allclose(probs[2], predict_probs(model, meta, prepare_items(test, meta)), atol=1e-6)
    model1, meta1 = load_safe(runs[1])
    assert meta1.size == 48

def test_ensemble_folder_round_trip_and_predict(runs, ens_dir):
    raw = json.loads((ens_dir/'ensemble.json').read_text())
    assert raw['format'] == 1 and raw['method'] == 'grid' and raw['fitness'] == 'accuracy' and raw['params']['step'] == 0.1
    assert raw['members'] == ['../../cnn64', '../../cnn48', '../../lenet64']   # relative to the ensemble folder
    assert sum(raw['weights']) == pytest.approx(1) and raw['classes'] == read_meta(runs[0]).classes
    ens = load_ensemble(ens_dir)
    assert ens.members == [str(r.resolve()) for r in runs]
    _, test, classes = ensemble_data(runs)
    p = predict_ensemble(ens_dir, test)
    np.testing.assert_allclose(p, sum(w * q for w, q in zip(ens.weights, members_probs(runs, test))), atol=1e-6)
    m = json.loads((ens_dir/'metrics.json').read_text())
    assert set(m['members']) == {'cnn64', 'cnn48', 'lenet64'} and m['n_test'] == len(test)
    assert m['ensemble']['accuracy']['value'] == pytest.approx((p.argmax(1) == encode_targets(test.label, classes)).mean())
    assert m['ensemble']['accuracy']['ci_low'] <= m['ensemble']['accuracy']['value'] <= m['ensemble']['accuracy']['ci_high']
    tab = pd.read_csv(ens_dir/'metrics.csv', index_col=0)
    assert list(tab.index) == ['cnn64', 'cnn48', 'lenet64', 'ensemble'] and 'accuracy_low' in tab
    grid = pd.read_csv(ens_dir/'search.csv')
    assert len(grid) == 66 and list(grid.columns) == ['cnn64', 'cnn48', 'lenet64', 'score']   # step 0.1, 3 members
    assert grid.score.max() == pytest.approx(ens.score)
    assert not list(ens_dir.glob('.*tmp*'))

def test_ensemble_folder_moves_with_its_runs(runs, ens_dir, tmp_path):
    moved = tmp_path/'moved'
    for r in runs: shutil.copytree(r, moved/r.name)
    shutil.copytree(ens_dir, moved/'ensembles'/'grid')
    ens = load_ensemble(moved/'ensembles'/'grid')
    assert all(m.startswith(str(moved.resolve())) for m in ens.members)
    shutil.rmtree(moved/'cnn48')
    with pytest.raises(DataError, match=r'cnn48 \(listed in .*ensemble\.json\) not found'): load_ensemble(moved/'ensembles'/'grid')

def test_zero_weight_members_are_not_run(runs, tmp_path):
    ens = Ensemble([str(r) for r in runs], [0.5, 0.5, 0.0], read_meta(runs[0]).classes)
    _, test, _ = ensemble_data(runs)
    shutil.copytree(runs[2], tmp_path/'gone'); ens.members[2] = str(tmp_path/'gone')
    (tmp_path/'gone'/'model.safetensors').unlink()   # would fail to load if it were run
    p = predict_ensemble(ens, test)
    np.testing.assert_allclose(p, average_probs(members_probs(runs[:2], test)), atol=1e-6)

def test_ga_with_class_fitness(runs, tmp_path):
    ens = ensemble_runs(runs, tmp_path/'ga', method='ga', fitness='precision:eosinophil', population=6, generations=3, n_boot=0)
    raw = json.loads((tmp_path/'ga'/'ensemble.json').read_text())
    assert raw['fitness'] == 'precision:eosinophil' and raw['params']['population'] == 6 and raw['params']['seed'] == 42   # one seed default, the CLI's and the library's
    assert len(pd.read_csv(tmp_path/'ga'/'search.csv')) == 4   # best score per generation: initial + 3
    assert ens.score == pytest.approx(json.loads((tmp_path/'ga'/'metrics.json').read_text())['valid_fitness']['ensemble'])

def test_mismatched_split_is_a_clear_error(runs, tmp_path):
    other = shutil.copytree(runs[1], tmp_path/'other')
    sp = pd.read_csv(other/'split.csv'); sp.loc[3, 'split'] = 'test' if sp.split[3] != 'test' else 'train'
    sp.to_csv(other/'split.csv', index=False)
    with pytest.raises(DataError) as e: ensemble_runs([runs[0], other], tmp_path/'bad')
    msg = str(e.value)
    assert '\n' not in msg and 'other/split.csv' in msg and 'same dataset, sample, seed' in msg
    assert not (tmp_path/'bad').exists()

def test_mismatched_classes_is_a_clear_error(runs, tmp_path):
    other = shutil.copytree(runs[1], tmp_path/'other')
    meta = json.loads((other/'model.json').read_text()); meta['classes'] = meta['classes'][::-1]
    (other/'model.json').write_text(json.dumps(meta))
    with pytest.raises(DataError, match='must predict the same classes in the same order'): ensemble_runs([runs[0], other], tmp_path/'bad')

def test_bad_search_or_fitness_fail_early(runs, tmp_path):
    with pytest.raises(ValueError, match="unknown search 'best'"): ensemble_runs(runs, tmp_path/'x', method='best')
    with pytest.raises(ValueError): ensemble_runs(runs, tmp_path/'x', fitness='precision:blast')
    assert not (tmp_path/'x').exists()

def test_not_an_ensemble_folder(tmp_path):
    with pytest.raises(DataError, match='is not an ensemble folder'): load_ensemble(tmp_path)

def test_cli_ensemble(runs, tmp_path, capsys):
    args = vars(command_parser(bloodcell_ensemble, 'bloodcell ensemble').parse_args(['a', 'b', '--search', 'ga', '--fitness', 'precision:hem', '--out', 'o']))
    assert args['run_dirs'] == ['a', 'b'] and args['search'] == 'ga' and args['fitness'] == 'precision:hem'
    ens = bloodcell_ensemble([str(r) for r in runs], search='average', out=str(tmp_path/'avg'), n_boot=20)
    assert ens.weights == pytest.approx([1 / 3] * 3) and ens.method == 'average'
    out = capsys.readouterr().out
    assert 'average weights' in out and 'ensemble' in out
    for f in ('ensemble.json', 'metrics.json', 'metrics.csv'): assert f"wrote {tmp_path/'avg'/f}" in out
    assert not (tmp_path/'avg'/'search.csv').exists()

def test_cli_ensemble_published_ga(runs, tmp_path):
    "--ga-published runs the published GA: 8 restarts of 100 solutions over 50 generations, recorded in the ensemble."
    ens = bloodcell_ensemble([str(r) for r in runs], search='ga', ga_published=True, out=str(tmp_path/'ga'), n_boot=20)
    assert ens.params['population'] == 100 and ens.params['generations'] == 50 and ens.params['restarts'] == 8
    assert pd.read_csv(tmp_path/'ga'/'search.csv').restart.nunique() == 8
