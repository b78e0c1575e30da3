"The study runner: configs, training on a given split, skipping finished runs, redoing partial ones, the CLI function."
import json
from pathlib import Path
import numpy as np, pandas as pd
import pytest
import torch
import bloodcell_fastai.study as S
from bloodcell_fastai.data import load_items, split_items, load_split
from bloodcell_fastai.core import atomic_write, ConfigError
from bloodcell_fastai.study import load_study_config, study_runs, train_on_split, run_status, split_key, read_record, run_study, study_results, read_results, StudyError
from bloodcell_fastai.cli import bloodcell_study
from bloodcell_fastai.train import train_config

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
    bloodcell_study(str(fn), out=str(tmp_path/'mini'), export=str(tmp_path/'docs'))   # nothing to train: export only
    assert count_training and len(count_training) == 2 and 'test_probs.csv.gz' in capsys.readouterr().out
    res, hist, probs = S.load_results(tmp_path/'docs')
    assert len(res) == 2 and set(hist.run_id) == set(res.run_id) and 'file' not in probs and len(probs) == res.n_test.sum()


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
    assert (t['centre_crop'], t['norm']) == (352, [0.5, 0.225])            # the published crop and normalisation
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

# too big for a CI step: each is replaced by a small model of its family, which keeps the architecture's own options
STAND_INS = dict(vit_large_patch16_224='vit_tiny_2blocks', vit_base_patch16_224='vit_tiny_patch16_224', mixer_b16_224='vit_tiny_2blocks',
                 convnext_large='convnext_tiny', resnet101='resnet18', resnet152='resnet18')

def shrink(cfg:dict, sample:int=4, pretrained:bool=False)->dict:
    "A published protocol at test scale: a few images per class, 32-80 px, one epoch; random weights unless `pretrained` (pip weights)."
    small = dict(size=32, bs=8, epochs=1, freeze_epochs=1, num_workers=0, precision='fp32', patience=None)
    cfg = json.loads(json.dumps(cfg))
    cfg.update(sample=sample, sizes={k: v for k, v in list(cfg['sizes'].items())[-1:]})   # the smallest subset
    if cfg.get('nest') == 'train': cfg['sizes'] = {k: 8 for k in cfg['sizes']}
    if not pretrained: cfg['pretrained'] = [False]
    cfg['train'] = {**cfg['train'], **small, **({'balance': 8} if cfg['train'].get('balance') else {}), **({'lr': 1e-3} if cfg['train'].get('lr') is None else {})} # no lr_find: 100 steps of VGG16
    at = cfg.setdefault('arch_train', {})
    for big, small_arch in STAND_INS.items():
        if big in cfg['archs']:
            cfg['archs'] = list(dict.fromkeys(small_arch if a == big else a for a in cfg['archs']))
            if big in at: at[small_arch] = at.pop(big)
    for a, t in at.items():
        t.update({k: v for k, v in small.items() if k in t}, **({'size': 80} if a.startswith('inception') else {}), **({'lr': 1e-3} if 'lr' in t and t['lr'] is None else {}))
        if not pretrained: t.pop('pretrained', None)
    cfg['pretrained_train'] = {**cfg.get('pretrained_train', {}), **{o: small[o] for o in ('epochs', 'freeze_epochs') if cfg.get('pretrained_train', {}).get(o)}}
    return cfg

PROTOCOLS = ['ryba_2021', 'ryba_2021_cpu', 'foix_romero_2022', 'foix_romero_2022_cpu', 'foix_romero_2022_probe_cpu', 'foix_romero_2022_small_cpu',
             'cnmc_landi_baldi_cioffo', 'cnmc_landi_baldi_cioffo_allidb2_cpu', 'cnmc_mir_nissa']

@pytest.mark.parametrize('name', PROTOCOLS)
def test_published_protocol_runs_on_a_tiny_subset(name, tmp_path, data_root):
    "Each protocol config trains every one of its runs end to end on a few images (random weights, no hub here; the probe with the pip weights)."
    src = json.loads((STUDIES/f'{name}.json').read_text())
    cfg = shrink(src, pretrained=name.endswith('probe_cpu'))
    run_study(cfg, tmp_path, quiet=True)
    res = read_results(tmp_path)
    assert len(res) == len(study_runs(load_study_config(cfg))) and res.accuracy.between(0, 1).all()
    want = {r['run_id']: train_config(**r['train']) for r in study_runs(load_study_config(cfg))}
    keys = ('split_by', 'centre_crop', 'crop_border', 'colour', 'opt', 'schedule', 'norm', 'head', 'balance', 'recipe')
    for run_id, d in zip(res.run_id, res.run_dir):   # the protocol's preprocessing and recipe reached every run
        c = read_record(tmp_path/d)['config']
        assert {k: c[k] for k in keys} == {k: want[run_id][k] for k in keys}, run_id

def test_cnmc_protocols_are_the_published_ones():
    "Random image split, balancing, border crop, CLAHE for the scratch CNN, MLP heads, VGG16 chopped, pretrained only where published."
    lb, mn = (load_study_config(STUDIES/f'{n}.json') for n in ('cnmc_landi_baldi_cioffo', 'cnmc_mir_nissa'))
    assert lb['split_by'] == mn['split_by'] == 'image' and lb['ratios'] == [3, 1, 1]
    runs = {r['arch']: r for r in study_runs(lb)}
    assert set(runs) == {'cnn_scratch', 'vgg16', 'vgg16_chopped', 'resnet50', 'resnet50_chopped', 'mobilenetv2'}
    assert [runs[a]['pretrained'] for a in runs] == [a != 'cnn_scratch' for a in runs]   # one run per architecture
    assert runs['cnn_scratch']['train']['colour'] == 'clahe' and runs['cnn_scratch']['train']['size'] == 300
    assert runs['resnet50_chopped']['train']['head'] == [512] and runs['vgg16']['train']['epochs'] == 0   # VGG16 frozen: head only
    assert all(r['train']['balance'] == 3198 and r['train']['crop_border'] for r in runs.values())
    m = {r['arch']: r['train'] for r in study_runs(mn)}
    assert m['cnn_scratch']['opt'] == 'sgd' and m['cnn_scratch']['lr'] == 2e-4 and m['inception_v3']['centre_crop'] == 400
    ry = load_study_config(STUDIES/'ryba_2021.json')
    t = {r['arch']: r['train'] for r in study_runs(ry)}
    assert t['resnet18']['recipe'] == 'gradual' and t['vit_large_patch16_224']['label_smoothing'] == 0.1 and t['vit_base_patch16_224']['mixup']

def test_study_split_by_image_mixes_subjects(tmp_path, data_root):
    "split_by='image' reproduces the published C-NMC split: subjects on both sides; 'subject' keeps them apart."
    base = dict(name='c', dataset='cnmc', sizes=dict(all=1.0), ratios=[3, 1, 1], archs=['lenet5'], pretrained=[False], train=dict(size=32))
    by = {s: S.study_splits(load_study_config({**base, 'split_by': s}), tmp_path/s)['all'][0] for s in ('subject', 'image')}
    crossing = lambda d: len(set(d.subject_id[d.split == 'train']) & set(d.subject_id[d.split == 'test']))
    assert crossing(by['subject']) == 0 and crossing(by['image']) > 0
    with pytest.raises(StudyError, match="split_by='patient'"): load_study_config({**base, 'split_by': 'patient'})

def test_gpu_script_refuses_a_machine_without_a_gpu(tmp_path):
    "studies/gpu/run.sh is valid bash and says in one line that it needs a GPU (CI has none); without data it says what to set."
    import subprocess, os
    sh = STUDIES/'gpu'/'run.sh'
    assert subprocess.run(['bash', '-n', sh]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != 'BLOODCELL_DATA'}
    r = subprocess.run(['bash', sh], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and 'set BLOODCELL_DATA' in r.stderr
    if torch.cuda.is_available(): pytest.skip('this machine has a GPU')
    r = subprocess.run(['bash', sh], capture_output=True, text=True, env={**env, 'BLOODCELL_DATA': str(tmp_path), 'PATH': os.path.dirname(os.sys.executable) + os.pathsep + env['PATH']})
    assert r.returncode != 0 and 'no CUDA GPU here' in r.stderr

def test_test_probs_are_cached_until_the_model_changes(tmp_path, data_root):
    "run_test_probs predicts once; a new temperature in model.json (a newer file) makes it predict again."
    import os, time as _t
    from bloodcell_fastai.export import update_meta
    run_study(mini_config(sizes=dict(all=1.0), archs=['lenet5']), tmp_path, quiet=True)
    d = tmp_path/'runs'/'all'/'lenet5-scratch'
    p1 = S.run_test_probs(d)
    assert (d/'test_probs.csv').exists() and len(p1) == read_results(tmp_path).n_test.iloc[0]
    assert np.allclose(p1.iloc[:, 2:].sum(1), 1, atol=1e-4)
    _t.sleep(0.01); update_meta(d, temperature=5.0); os.utime(d/'model.json')
    p2 = S.run_test_probs(d)
    assert not np.allclose(p1.iloc[:, 2:].values, p2.iloc[:, 2:].values)   # softer probabilities at T = 5
    S.clear_run(d); assert not d.exists()                                  # its cache is one of the run's files

def test_load_results_fetches_from_the_repository(tmp_path, monkeypatch):
    "A pip install (Colab) has no studies/: stored results come from the repository on GitHub, offline from the cached copy."
    import bloodcell_fastai.study as st
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path); monkeypatch.setenv('BLOODCELL_CACHE', str(tmp_path/'cache'))
    monkeypatch.setattr(st, '__file__', str(tmp_path/'site-packages'/'bloodcell_fastai'/'study.py')) # not beside a clone
    monkeypatch.setattr(st, 'REPO_RAW', root.as_uri()) # this clone stands in for GitHub
    res, hist, probs = st.load_results('ryba_2021_cpu')
    assert (tmp_path/'cache'/'repo'/'studies'/'results'/'ryba_2021_cpu'/'test_probs.csv.gz').exists()
    pd.testing.assert_frame_equal(res, pd.read_csv(root/'studies'/'results'/'ryba_2021_cpu'/'results.csv'))
    monkeypatch.setattr(st, 'REPO_RAW', 'file:///nonexistent') # offline: the last copy
    assert len(st.load_results('ryba_2021_cpu')[1]) == len(hist)
    with pytest.raises(st.StudyError, match='run from a clone of the repository'): st.load_results('no_such_study')
