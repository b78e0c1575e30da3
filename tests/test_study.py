"The study runner: configs, training on a given split, skipping finished runs, redoing partial ones, the CLI function."
import json
from pathlib import Path
import pandas as pd
import pytest
import torch
import bloodcell_fastai.study as S
from bloodcell_fastai.data import load_items, split_items, load_split
from bloodcell_fastai.core import atomic_write, ConfigError
from bloodcell_fastai.study import load_study_config, study_runs, train_on_split, run_status, split_key, read_record, run_study, study_results, read_results, StudyError
from bloodcell_fastai.cli import bloodcell_study

STUDIES = Path(__file__).resolve().parents[1]/'studies'
torch.set_num_threads(1)  # tiny models; two OpenMP threads spin-wait on a busy shared CPU

def mini_config(**kw):
    "A two-run study: LeNet-5 on two nested subsets of 8 PBC images per class, 32 px, one epoch."
    return {**dict(name='mini', dataset='pbc', sample=8, sizes=dict(all=1.0, half=0.5), archs=['lenet5'],
                   pretrained=[False], train=dict(size=32, bs=16, epochs=1, lr=3e-3, num_workers=0)), **kw}

@pytest.fixture
def count_training(monkeypatch):
    "Count the calls of `train` made by the study module (each is one model trained or resumed)."
    calls = []
    real = S.train
    def counted(run_dir, *args, **kwargs):
        calls.append(Path(run_dir)); return real(run_dir, *args, **kwargs)
    monkeypatch.setattr(S, 'train', counted)
    return calls

def test_shipped_configs_expand_to_the_documented_grids():
    full, quick = load_study_config(STUDIES/'arch_size.json'), load_study_config(STUDIES/'arch_size_quick.json')
    runs = study_runs(full)
    # 10 architectures, LeNet-5 from scratch only: 19 runs per subset, 4 subsets
    assert len(runs) == 4 * 19
    assert not [r for r in runs if r['arch'] == 'lenet5' and r['pretrained']]
    assert {r['subset'] for r in runs} == {'large', 'medium', 'small', 'tiny'}
    assert runs[0]['subset'] == 'tiny'                                   # smallest subset first
    lenet = next(r for r in runs if r['arch'] == 'lenet5')
    assert lenet['train']['size'] == 32
    pre = next(r for r in runs if r['pretrained'])
    assert pre['train']['recipe'] == 'fine_tune' and pre['train']['epochs'] == 6
    assert len(study_runs(quick)) == 2 * 4 and not any(r['pretrained'] for r in study_runs(quick))

@pytest.mark.parametrize('bad, msg', [(dict(archs=['resnet_18']), 'resnet18'), (dict(archs=['lenet5'], train=dict(epoch=2)), 'epoch'),
                                      (dict(archs=['lenet5'], learning_rate=1), 'learning_rate'), (dict(archs=[]), 'no architectures'),
                                      (dict(archs=['lenet5'], ratios=[5, 2]), 'ratios')])
def test_bad_configs_fail_before_training(bad, msg):
    with pytest.raises(ConfigError, match=msg): load_study_config(bad)
    assert issubclass(StudyError, ConfigError) and issubclass(ConfigError, ValueError)

def test_train_on_split_trains_on_exactly_the_given_split(tmp_path, data_root):
    items = load_items('pbc').groupby('label').head(6)
    sp = split_items(items, valid_pct=0.25, test_pct=0.25, seed=7)
    opts = dict(dataset='pbc', arch='lenet5', size=32, bs=16, epochs=1, lr=3e-3, num_workers=0)
    run = train_on_split(tmp_path/'run', sp, **opts)
    assert split_key(load_split(run/'split.csv')) == split_key(sp)
    rec = read_record(run)
    assert rec['status'] == 'done' and rec['n_images'] == sp.split.value_counts().to_dict()
    assert run_status(run, sp, **opts) == 'done'
    assert run_status(run, sp, **{**opts, 'epochs': 2}) == 'stale'

def test_second_invocation_trains_nothing(tmp_path, data_root, count_training):
    cfg, out = mini_config(), tmp_path/'mini'
    plan = run_study(cfg, out, quiet=True)
    assert plan.action.tolist() == ['train', 'train'] and len(count_training) == 2
    before = (out/'results.csv').read_bytes()
    again = run_study(cfg, out, quiet=True)
    assert again.action.tolist() == ['skip', 'skip']
    assert len(count_training) == 2                                      # nothing new trained
    assert (out/'results.csv').read_bytes() == before
    res = study_results(cfg, out)
    assert len(res) == 2 and res.n_train.iloc[0] < res.n_train.iloc[1]
    assert {'accuracy', 'accuracy_low', 'accuracy_high', 'map@5', 'map@100'} <= set(res.columns)

def test_interrupted_run_is_redone_and_others_skipped(tmp_path, data_root, count_training):
    cfg, out = mini_config(), tmp_path/'mini'
    run_study(cfg, out, quiet=True)
    d = out/'runs'/'all'/'lenet5-scratch'
    rec = read_record(d); rec['status'] = 'training'; atomic_write(d/'record.json', json.dumps(rec))
    (d/'model.safetensors').unlink()                                     # died mid-run: no export, no row
    r = read_results(out); atomic_write(out/'results.csv', r[r.run_id != 'all/lenet5-scratch'].to_csv(index=False))
    n = len(count_training)
    plan = run_study(cfg, out, quiet=True)
    assert dict(zip(plan.run_id, plan.action)) == {'half/lenet5-scratch': 'skip', 'all/lenet5-scratch': 'train'}
    assert count_training[n:] == [d]                                     # exactly the partial run was retrained
    assert read_record(d)['status'] == 'done' and (d/'model.safetensors').exists()
    assert len(study_results(cfg, out)) == 2

def test_finished_run_without_row_is_recorded_not_retrained(tmp_path, data_root, count_training):
    cfg, out = mini_config(), tmp_path/'mini'
    run_study(cfg, out, quiet=True)
    r = read_results(out); atomic_write(out/'results.csv', r[r.run_id != 'half/lenet5-scratch'].to_csv(index=False))
    n = len(count_training)
    plan = run_study(cfg, out, quiet=True)
    assert dict(zip(plan.run_id, plan.action))['half/lenet5-scratch'] == 'record'
    assert len(count_training) == n and len(study_results(cfg, out)) == 2

def test_changed_training_options_retrain_and_replace_rows(tmp_path, data_root, count_training):
    cfg, out = mini_config(), tmp_path/'mini'
    run_study(cfg, out, quiet=True)
    keys = set(read_results(out).key)
    changed = mini_config(train=dict(size=32, bs=16, epochs=2, lr=3e-3, num_workers=0))
    assert run_study(changed, out, quiet=True).action.tolist() == ['train', 'train']
    res = read_results(out)
    assert len(res) == 2 and not (set(res.key) & keys)                  # rows replaced, not duplicated
    assert set(res.epochs) == {2}

def test_a_failing_run_is_reported_and_the_grid_goes_on(tmp_path, data_root, monkeypatch):
    real = S.train
    def flaky(run_dir, *args, **kwargs):
        if 'half' in str(run_dir): raise RuntimeError('CUDA out of memory (simulated)')
        return real(run_dir, *args, **kwargs)
    monkeypatch.setattr(S, 'train', flaky)
    out = tmp_path/'mini'
    with pytest.raises(StudyError, match='1 of 2 runs failed'): run_study(mini_config(), out, quiet=True)
    assert 'half/lenet5-scratch' in json.loads((out/'failures.json').read_text())
    assert read_results(out).run_id.tolist() == ['all/lenet5-scratch']

def test_cli_function_dry_run_trains_nothing(tmp_path, data_root, count_training, capsys):
    fn = tmp_path/'mini.json'; fn.write_text(json.dumps(mini_config()))
    plan = bloodcell_study(str(fn), out=str(tmp_path/'mini'), dry_run=True)
    assert plan.action.tolist() == ['train', 'train'] and count_training == []
    assert 'half/lenet5-scratch' in capsys.readouterr().out
    bloodcell_study(str(fn), out=str(tmp_path/'mini'))
    out = capsys.readouterr().out
    assert 'wrote' in out and (tmp_path/'mini'/'accuracy_vs_size.png').exists()
    assert pd.read_csv(tmp_path/'mini'/'table_accuracy.csv').shape[0] == 1


def test_run_key_ignores_options_left_at_their_default():
    "A new training option with a default must not make every earlier study run look different."
    from bloodcell_fastai.study import run_key
    from bloodcell_fastai.train import TRAIN_DEFAULTS
    assert run_key(dict(arch='lenet5', size=32), 'k') == run_key(dict(arch='lenet5', size=32, weights=TRAIN_DEFAULTS['weights']), 'k')
    assert run_key(dict(arch='lenet5', size=32), 'k') != run_key(dict(arch='lenet5', size=48), 'k')


def test_foix_romero_config_is_the_published_protocol():
    "Nested training sets of the published sizes in one split, SGD without momentum, plateau schedule, early stopping, probes on tiny only."
    cfg = load_study_config(STUDIES/'foix_romero_2022.json')
    assert cfg['nest'] == 'train' and cfg['sizes'] == dict(large=8544, medium=4250, small=2100, tiny=200) and cfg['ratios'] == [5, 2, 3]
    runs = study_runs(cfg)
    assert {r['subset'] for r in runs if r['pretrained']} == {'tiny'}
    t = next(r for r in runs if r['arch'] == 'resnet18' and not r['pretrained'])['train']
    assert (t['opt'], t['lr'], t['schedule'], t['colour'], t['aug'], t['bs']) == ('sgd', 0.1, 'plateau', 'grey', False, 64)
    probe = next(r for r in runs if r['pretrained'])['train']
    assert probe['cached_head'] and probe['epochs'] == 0                  # only the new last layer
    for name in ('foix_romero_2022_cpu', 'foix_romero_2022_probe_cpu'): assert study_runs(load_study_config(STUDIES/f'{name}.json'))

def test_train_nested_subsets_share_valid_and_test(tmp_path, data_root):
    cfg = load_study_config(mini_config(sample=12, sizes=dict(all=1.0, few=16), nest='train'))
    splits = S.study_splits(cfg, tmp_path)
    (a, _), (f, _) = splits['all'], splits['few']
    for s in ('valid', 'test'): assert set(a.file[a.split == s]) == set(f.file[f.split == s])
    assert set(f.file[f.split == 'train']) < set(a.file[a.split == 'train']) and abs((f.split == 'train').sum() - 16) <= 8
    with pytest.raises(StudyError, match='the training split holds'): S.study_splits(load_study_config(mini_config(sizes=dict(huge=5000), nest='train')), tmp_path/'h')
    with pytest.raises(StudyError, match="nest='sideways'"): load_study_config(mini_config(nest='sideways'))
