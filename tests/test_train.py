"""Training recipes, records, safe export and evaluation on tiny runs of real PBC images (3 classes x 12, 32-48 px)."""
import json, shutil
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from fastai.vision.all import Callback, CancelFitException
from bloodcell_fastai.core import DataError, ConfigError
from bloodcell_fastai.data import folder_items
from bloodcell_fastai.models import create_model, trainable_groups, count_groups
from bloodcell_fastai.train import *
from bloodcell_fastai.train import run_items, run_learner, run_dataloaders, run_stages
from bloodcell_fastai.export import load_safe
from bloodcell_fastai.evaluate import evaluate_run
from bloodcell_fastai.inference import predict_probs, prepare_items
from bloodcell_fastai.core import ModelFileError

FOLDER_RUN = dict(dataset='folder', size=32, bs=8, lr=2e-3, num_workers=0, valid_pct=0.25, test_pct=0.25, precision='fp32')


@pytest.fixture(scope='module')
def tree(tmp_path_factory, pbc_sample):
    root = tmp_path_factory.mktemp('tree')/'pbc'
    for c in ['basophil','eosinophil','lymphocyte']:
        (root/c).mkdir(parents=True)
        for f in pbc_sample[c]: shutil.copy(f, root/c/f.name)
    return root

@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    "A stand-in for pretrained weights: a 1000-class LeNet-5 checkpoint written by the test (no BN: stable tiny runs)."
    from safetensors.torch import save_file
    f = tmp_path_factory.mktemp('w')/'lenet5_in1k.safetensors'
    save_file({k: v.contiguous() for k, v in create_model('lenet5', 1000).state_dict().items()}, str(f))
    return f

@pytest.fixture(scope='module')
def run(tree, tmp_path_factory):
    return train(tmp_path_factory.mktemp('runs')/'r', data=str(tree), arch='resnet18', epochs=3, label_smoothing=0.1,
                 export_pickle=True, **FOLDER_RUN)


def train_set_loss(learn):
    "Loss on the training images through the deterministic validation pipeline (no augmentation noise)."
    df = learn.dls.items_df
    dl = learn.dls.test_dl(df[df.split=='train'].reset_index(drop=True), rm_type_tfms=0, with_labels=True)
    with learn.no_bar(), learn.no_logging(): return learn.validate(dl=dl)[0]


class GroupSpy(Callback):
    "Record which parameter groups train in each fit."
    def __init__(self): self.seen = []
    def before_fit(self): self.seen.append(trainable_groups(self.learn))


def test_record_and_run_folder(run):
    names = {p.name for p in run.iterdir()}
    assert {'record.json','split.csv','model.safetensors','model.json','history.csv','learner.pkl'} <= names
    rec = json.loads((run/'record.json').read_text())
    assert rec['status'] == 'done' and rec['seed'] == 42 and rec['config']['arch'] == 'resnet18'
    assert len(rec['split_csv_md5']) == 32
    for k in ('torch','fastai','timm','python','device'): assert rec['env'][k]
    assert len(rec['history']) == 3 and rec['timings']['train_seconds'] > 0
    t = rec['final_metrics']['test']
    for k in ('accuracy','balanced_accuracy','cohen_kappa','error_rate','f1_macro','f1_weighted','roc_auc','ece'):
        assert set(t[k]) == {'value','ci_low','ci_high'}
    assert t['n_images'] == rec['n_images']['test'] > 0
    hist = pd.read_csv(run/'history.csv')                                   # one row per epoch, real losses (that it learns:
    assert len(hist) == 3 and np.isfinite(hist[['train_loss','valid_loss']]).all().all() # test_recipes_train_the_right_groups)


def test_safe_export_roundtrip_same_predictions(run):
    from fastai.learner import load_learner
    model, meta = load_safe(run)
    assert meta.classes == ['basophil','eosinophil','lymphocyte'] and meta.size == 32
    df = pd.read_csv(run/'split.csv').query("split=='test'")
    items = prepare_items(df, meta)
    p1 = predict_probs(model, meta, items)
    learn = load_learner(run/'learner.pkl')                             # the trusted pickle, for comparison
    learn.model.eval()
    p2 = predict_probs(learn.model.float(), meta, items)
    assert np.allclose(p1, p2, atol=1e-5)
    assert type(learn.loss_func).__name__ == 'LabelSmoothingCrossEntropyFlat'   # label smoothing survives export
    assert np.allclose(p1.sum(1), 1, atol=1e-5)


def test_bad_model_files(run, tmp_path):
    bad = tmp_path/'bad'; shutil.copytree(run, bad)
    (bad/'model.safetensors').write_bytes((run/'model.safetensors').read_bytes()[:1000])
    with pytest.raises(ModelFileError, match='truncated'): load_safe(bad)
    (bad/'model.json').write_text('{"format": 99}')
    with pytest.raises(ModelFileError, match='format 99'): load_safe(bad)
    with pytest.raises(ModelFileError, match='not a bloodcell run folder'): load_safe(tmp_path)


def test_evaluate_subset_classes_case_insensitive(run, tree, tmp_path):
    sub = tmp_path/'other_lab'
    for c, new in [('basophil','Basophil'), ('lymphocyte','LYMPHOCYTE')]:
        shutil.copytree(tree/c, sub/new)
    rep = evaluate_run(run, data=sub, n_boot=50)
    assert rep['n_images'] == 24 and rep['shared_classes'] == ['basophil','lymphocyte']
    assert set(rep['per_class']) == {'basophil','lymphocyte'}
    assert np.array(rep['confusion_matrix']).shape == (3, 3)             # shared classes + predicted 'other'
    rep2 = evaluate_run(run, data=sub, n_boot=50, restrict_classes=True)
    assert rep2['restricted']['accuracy']['value'] >= rep2['accuracy']['value']
    (sub/'Megakaryocyte').mkdir(); shutil.copy(next((tree/'basophil').glob('*.jpg')), sub/'Megakaryocyte'/'m.jpg')
    with pytest.raises(DataError, match='not known to the model: Megakaryocyte'): evaluate_run(run, data=sub)


def test_evaluate_cli_json(run, tmp_path):
    from bloodcell_fastai.cli import main
    main(['evaluate', str(run), '--json', str(tmp_path/'m.json'), '--n-boot', '50'])
    m = json.loads((tmp_path/'m.json').read_text())
    for k in ('accuracy','balanced_accuracy','cohen_kappa','error_rate','f1_macro','f1_weighted','roc_auc','ece',
              'per_class','classes','confusion_matrix','n_images'): assert k in m


@pytest.mark.parametrize('recipe', ['fine_tune', 'gradual', 'all_at_once'])
def test_recipes_train_the_right_groups(recipe, tree, ckpt, tmp_path):
    cfg = train_config(**{**FOLDER_RUN, 'data': str(tree), 'arch': 'lenet5', 'weights': str(ckpt), 'recipe': recipe,
                          'epochs': 6, 'freeze_epochs': 2, 'lr': 2e-2, 'bs': 4})
    df = run_items(cfg)
    learn = run_learner(run_dataloaders(df, cfg), cfg)
    n = count_groups(learn)
    assert n == 4                                                       # conv1, conv2, fc, head
    before = train_set_loss(learn)
    spy = GroupSpy(); learn.add_cb(spy)
    stages, rows, _ = run_stages(learn, cfg, tmp_path)
    first = spy.seen[0]
    assert first == [False]*(n-1) + [True]                              # the head alone first
    assert spy.seen[-1] == [True]*n                                     # everything at the end
    if recipe == 'gradual':                                             # one more group per stage, head first
        assert [s['freeze_to'] for s in stages] == [-1, -2, -3, None]
        assert spy.seen == [[False]*(n-k) + [True]*k for k in range(1, n+1)]
    else:
        assert len(spy.seen) == 2
    learn.remove_cb(spy)
    assert train_set_loss(learn) < before                               # it fits its training images


def test_mixup_fits_its_training_images(tree, tmp_path):
    "With MixUp on, the model still fits the clean training images (the mixed batches' own loss is too noisy to show it)."
    cfg = train_config(**{**FOLDER_RUN, 'data': str(tree), 'arch': 'lenet5', 'epochs': 10, 'lr': 5e-3, 'bs': 4, 'mixup': 0.4})
    learn = run_learner(run_dataloaders(run_items(cfg), cfg), cfg)
    assert any(type(cb).__name__ == 'MixUp' for cb in learn.cbs)
    before = train_set_loss(learn)
    run_stages(learn, cfg, tmp_path)
    assert train_set_loss(learn) < before
    r = train(tmp_path/'m', data=str(tree), arch='resnet18', epochs=1, mixup=0.4, **FOLDER_RUN)
    assert json.loads((r/'record.json').read_text())['config']['mixup'] == 0.4


class Interrupt(Callback):
    "Simulate a crash after `n` epochs (after the checkpoint of the n-th epoch was written)."
    order = 99
    def __init__(self, n): self.n = n
    def after_epoch(self):
        if self.epoch+1 >= self.n: raise KeyboardInterrupt


def test_resume_after_interruption(tree, tmp_path, monkeypatch):
    import bloodcell_fastai.train as T
    orig_fit = T.Learner.fit_one_cycle
    def crash_fit(self, n, lr=None, cbs=None, **kw):
        return orig_fit(self, n, lr, cbs=(cbs or []) + [Interrupt(2)], **kw)
    monkeypatch.setattr(T.Learner, 'fit_one_cycle', crash_fit)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path/'r', data=str(tree), arch='resnet18', epochs=4, **FOLDER_RUN)
    prog = json.loads((tmp_path/'r'/'checkpoints'/'progress.json').read_text())
    assert prog == {'stage': 0, 'epoch': 1}
    assert json.loads((tmp_path/'r'/'record.json').read_text())['status'] == 'training'
    monkeypatch.setattr(T.Learner, 'fit_one_cycle', orig_fit)
    seen = []
    def spy_fit(self, n, lr=None, cbs=None, start_epoch=0, **kw):
        seen.append(start_epoch); return orig_fit(self, n, lr, cbs=cbs, start_epoch=start_epoch, **kw)
    monkeypatch.setattr(T.Learner, 'fit_one_cycle', spy_fit)
    r = train(tmp_path/'r', resume=True)
    assert seen == [2]                                                  # continued from the third epoch
    rec = json.loads((r/'record.json').read_text())
    assert rec['status'] == 'done' and [h['epoch'] for h in rec['history']] == [0, 1, 2, 3]


def test_cpu_autocast_wraps_forward_not_augmentation():
    from bloodcell_fastai.train import CPUAutocast
    from fastai.test_utils import synth_learner
    seen = {}
    class Probe(Callback):
        order = 5                                                       # before CPUAutocast (10)
        def before_batch(self): seen['aug'] = torch.is_autocast_enabled('cpu')
        def after_pred(self): seen['fwd'] = torch.is_autocast_enabled('cpu')
    class Probe2(Callback):
        order = 20
        def before_batch(self): seen['fwd0'] = torch.is_autocast_enabled('cpu')
        def after_loss(self): seen['after'] = torch.is_autocast_enabled('cpu')
    learn = synth_learner(n_trn=16, cbs=[CPUAutocast(), Probe(), Probe2()])
    learn.fit(1)
    assert seen == {'aug': False, 'fwd0': True, 'fwd': True, 'after': False}
    assert resolve_precision('fp32') == 'fp32' and resolve_precision('bf16') == 'bf16'
    cuda = torch.cuda.is_available()
    assert resolve_precision('auto') == (('bf16' if torch.cuda.is_bf16_supported() else 'fp16') if cuda else 'fp32')


def test_precision_callbacks():
    from fastai.callback.channelslast import ChannelsLast
    from bloodcell_fastai.train import CPUAutocast
    names = lambda cbs: [type(c).__name__ for c in cbs]
    assert names(precision_callbacks('fp32', True, cnn=True)) == ['ChannelsLast']
    assert precision_callbacks('fp32', True, cnn=False) == [] and precision_callbacks('fp32', False, cnn=True) == []
    if not torch.cuda.is_available():
        assert names(precision_callbacks('bf16', False, cnn=True)) == ['CPUAutocast']
        with pytest.raises(ConfigError, match="precision='fp16' needs a GPU"): precision_callbacks('fp16', False, cnn=True)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match='Unknown training option'): train_config(epoch=3)
    with pytest.raises(ConfigError, match='recipe='): train_config(recipe='slow')
    with pytest.raises(ConfigError, match='MixUp or CutMix'): train_config(mixup=0.4, cutmix=1.0)
    with pytest.raises(ConfigError, match='resnet18'): train_config(arch='resnet_18')        # a typo: the suggestion
    assert issubclass(ConfigError, ValueError)
    assert train_config(pretrained=True)['recipe'] == 'fine_tune' and train_config()['recipe'] == 'scratch'
    (tmp_path/'w.safetensors').write_bytes(b'')
    assert train_config(weights=str(tmp_path/'w.safetensors'))['recipe'] == 'fine_tune' # a local checkpoint is a start too
    with pytest.raises(ConfigError, match='w2.pth not found'): train_config(weights=str(tmp_path/'w2.pth'))  # before anything is written
    with pytest.raises(ConfigError, match="dataset='pbc'"): train_config(data='mylab', labels='prefix')        # prefix labels are PBC's
    with pytest.raises(ConfigError, match=r'fraction in \(0, 1\]'): train_config(cell_crop=2)
    assert train_config()['dataset'] == 'pbc' and train_config(data='mylab')['dataset'] == 'folder'
    assert train_config(data='x', dataset='cnmc')['dataset'] == 'cnmc' and TRAIN_DEFAULTS['dataset'] is None


def test_gradual_schedule_exact():
    "freeze_to(-(k+1)) trains the head and the last k body groups; the steps spread the body evenly, ending with everything."
    assert gradual_schedule(6, steps=2) == [-1, -3, None]
    assert gradual_schedule(6) == [-1, -2, -3, -5, None]                   # at most 4 steps by default
    assert gradual_schedule(4) == [-1, -2, -3, None]                       # one step per body group
    assert gradual_schedule(4, steps=1) == gradual_schedule(4, steps=0) == [-1, None]
    assert gradual_schedule(4, steps=9) == gradual_schedule(4)
    assert [s['freeze_to'] for s in recipe_stages(train_config(recipe='gradual', epochs=5), 6, 1e-3)] == [-1, -2, -3, -5, None]


def test_train_cli_hyphenated_options(tree, tmp_path, capsys):
    from bloodcell_fastai.cli import main
    main(['train', '--out', str(tmp_path/'c'), '--data', str(tree), '--dataset', 'folder', '--size', '32', '--epochs', '1',
          '--bs', '8', '--lr', '1e-3', '--label-smoothing', '0.1', '--precision', 'fp32', '--scratch'])
    out = capsys.readouterr().out
    assert 'test accuracy' in out and f"wrote {tmp_path/'c'/'model.safetensors'}" in out
    assert 'out-of-distribution flag: feature_stats score above' in out       # calibrated by default
    with pytest.raises(SystemExit) as e: main(['train', '--data', str(tmp_path/'nope'), '--dataset', 'folder', '--out', str(tmp_path/'d')])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith('bloodcell train: error: ') and 'nope does not exist' in err[0]


def test_train_cli_weights_and_no_ood(tree, ckpt, tmp_path, capsys):
    "`--weights FILE` starts from a local checkpoint (not `--pretrained`, which is ImageNet from the hub); `--no-ood` skips the flag."
    from bloodcell_fastai.cli import main
    from bloodcell_fastai.export import read_meta
    main(['train', '--out', str(tmp_path/'w'), '--data', str(tree), '--arch', 'lenet5', '--weights', str(ckpt), '--no-ood',
          '--size', '32', '--epochs', '1', '--bs', '8', '--lr', '1e-3', '--precision', 'fp32'])
    rec = json.loads((tmp_path/'w'/'record.json').read_text())
    assert rec['config']['weights'] == str(ckpt) and rec['config']['pretrained'] is False
    assert rec['config']['recipe'] == 'fine_tune' and rec['pretrained_source'] == str(ckpt.resolve())
    assert rec['config']['ood_score'] is None and 'ood' not in rec and read_meta(tmp_path/'w').ood is None
    assert 'out-of-distribution' not in capsys.readouterr().out


def test_vit_standin_gradual_mixup_smoothing_export(tree, tmp_path):
    "ViT-Base/Large code paths on a 2-block tiny ViT: real groups, gradual unfreezing, MixUp + label smoothing, safe export."
    from safetensors.torch import save_file
    ck = tmp_path/'vit.safetensors'
    save_file({k: v.contiguous() for k, v in create_model('vit_tiny_2blocks', 1000, img_size=32).state_dict().items()}, str(ck))
    r = train(tmp_path/'vit', data=str(tree), arch='vit_tiny_2blocks', weights=str(ck), recipe='gradual', epochs=2,
              mixup=0.4, label_smoothing=0.1, **FOLDER_RUN)
    rec = json.loads((r/'record.json').read_text())
    assert rec['n_groups'] == 4 and [s['freeze_to'] for s in rec['stages']] == [-1, -2, -3, None]
    model, meta = load_safe(r)
    assert meta.arch == 'vit_tiny_2blocks' and meta.mean == [0.5, 0.5, 0.5]      # the ViT's own normalisation
    df = prepare_items(pd.read_csv(r/'split.csv').query("split=='test'"), meta)
    assert predict_probs(model, meta, df).shape == (len(df), 3)


def test_distributed_two_cpu_processes_gloo(tree, tmp_path):
    "torchrun launches 2 CPU processes (gloo): both ranks train, one run folder and one checkpoint are written."
    import subprocess, sys, os
    exe = Path(sys.executable).parent
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([str(exe/'torchrun'), '--nproc_per_node', '2', '--standalone', '--no-python', str(exe/'bloodcell'),
                        'train', '--out', str(tmp_path/'d'), '--data', str(tree), '--dataset', 'folder', '--size', '32',
                        '--epochs', '2', '--bs', '8', '--lr', '1e-3', '--precision', 'fp32', '--scratch'],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path/'d'/'checkpoints'/f'rank{i}.json').read_text()) for i in (0, 1)]
    assert all(o['world_size'] == 2 and o['train_batches'] > 0 for o in ranks)
    assert len(list((tmp_path/'d'/'checkpoints').glob('*.pth'))) == 1
    rec = json.loads((tmp_path/'d'/'record.json').read_text())
    assert rec['status'] == 'done' and rec['world_size'] == 2
    assert r.stdout.count('test accuracy') == 1                         # only rank 0 reports


def test_published_protocol_sgd_plateau_early_stopping(tree, tmp_path):
    "SGD without momentum at a flat lr, ReduceLROnPlateau and early stopping with a min delta (Foix Romero 2022's protocol)."
    # a gain of 100 in valid_loss never comes: after the first epoch every epoch is a plateau
    cfg = train_config(**{**FOLDER_RUN, 'data': str(tree), 'arch': 'lenet5', 'epochs': 6, 'lr': 0.1, 'opt': 'sgd', 'schedule': 'plateau',
                          'plateau_patience': 1, 'plateau_min_delta': 100., 'patience': 2, 'min_delta': 100.})
    learn = run_learner(run_dataloaders(run_items(cfg), cfg), cfg)
    assert learn.opt_func.func.__name__ == 'SGD' and learn.opt_func.keywords == {'mom': 0.}
    _, rows, _ = run_stages(learn, cfg, tmp_path)
    lrs = [r['lr'] for r in rows]
    assert len(rows) == 3                                                   # stopped early: epoch 0 best, two epochs without the gain
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] < lrs[0] and lrs == sorted(lrs, reverse=True), lrs # cut by 10 on each plateau
    assert all(h['mom'] == 0 for h in learn.opt.hypers)

def test_constant_schedule_keeps_the_lr_flat(tree, tmp_path):
    cfg = train_config(**{**FOLDER_RUN, 'data': str(tree), 'arch': 'lenet5', 'epochs': 3, 'lr': 0.01, 'opt': 'rmsprop', 'schedule': 'constant'})
    learn = run_learner(run_dataloaders(run_items(cfg), cfg), cfg)
    _, rows, _ = run_stages(learn, cfg, tmp_path)
    assert [r['lr'] for r in rows] == pytest.approx([0.01]*3) and learn.opt_func.func.__name__ == 'RMSProp'

@pytest.mark.parametrize('bad,msg', [(dict(opt='lbfgs'), 'choose one of adam, sgd, rmsprop'), (dict(schedule='cosine'), 'choose one of one_cycle, constant, plateau')])
def test_protocol_options_checked(bad, msg):
    with pytest.raises(ConfigError, match=msg): train_config(**bad)

def test_no_augmentation_trains_on_what_prediction_sees(data_root):
    "aug=False (Foix Romero: no augmentation) still resizes to the training size, so training, validation and prediction get the same tensors."
    from bloodcell_fastai.data import load_items, split_items, cell_dataloaders
    from bloodcell_fastai.export import ModelMeta
    from bloodcell_fastai.inference import model_inputs
    df = split_items(load_items('pbc').groupby('label').head(3).reset_index(drop=True), seed=0)
    stats = ([0.5]*3, [0.225]*3)
    dls = cell_dataloaders(df, size=32, bs=4, aug=False, num_workers=0, stats=stats)
    x, _ = dls.train.new(shuffle=False, drop_last=False).one_batch()
    assert x.shape[-2:] == (32, 32)                                   # not the 40-px presize square
    rows = dls.items_df[dls.items_df.split == 'train'].reset_index(drop=True).head(4)
    xi = model_inputs(rows, ModelMeta('resnet18', sorted(df.label.unique()), 32, *stats))
    assert torch.allclose(x.as_subclass(torch.Tensor)[:4].cpu(), xi[:4].cpu(), atol=1e-4)


def test_progressive_resizing_trains_each_stage_at_its_size_and_resumes_at_it(tree, ckpt, tmp_path, monkeypatch):
    "progressive=[24, 2]: the head and first cycle see 24-px batches, the last cycle 32-px ones, also after an interruption inside it."
    import bloodcell_fastai.train as T
    orig_fit, sizes = T.Learner.fit_one_cycle, []
    class SizeSpy(Callback):
        order = 99                                                      # after the epoch's checkpoint
        def __init__(self, crash): self.crash = crash
        def before_batch(self):
            if self.training: sizes.append(self.xb[0].shape[-1])
        def after_epoch(self):
            if self.crash and sizes[-1] == 32: raise KeyboardInterrupt  # a crash in the first 32-px epoch
    spy = lambda crash: lambda self, n, lr=None, cbs=None, **kw: orig_fit(self, n, lr, cbs=(cbs or []) + [SizeSpy(crash)], **kw)
    monkeypatch.setattr(T.Learner, 'fit_one_cycle', spy(True))
    opts = dict(data=str(tree), arch='lenet5', weights=str(ckpt), epochs=4, progressive=[24, 2], ood_score=None, **FOLDER_RUN)
    with pytest.raises(KeyboardInterrupt): train(tmp_path/'r', **opts)
    assert sizes[0] == 24 and sizes[-1] == 32
    monkeypatch.setattr(T.Learner, 'fit_one_cycle', spy(False)); sizes.clear()
    r = train(tmp_path/'r', resume=True)
    rec = json.loads((r/'record.json').read_text())
    assert set(sizes) == {32} and rec['status'] == 'done'               # resumed in the 32-px stage
    assert [(s['name'], s.get('size')) for s in rec['stages']] == [('head', 24), ('all@24', 24), ('all', 32)]
    assert [h['stage'] for h in rec['history']] == ['head', 'all@24', 'all@24', 'all', 'all']
    assert json.loads((r/'model.json').read_text())['size'] == 32
