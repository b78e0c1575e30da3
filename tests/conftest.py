"""Shared fixtures: sample images from $BLOODCELL_DATA (../shared/data in CI), a private cache per session.

Without a data folder the tests draw a synthetic sample into .cache/sample_data (tools/make_sample.py, marked by its
SAMPLE.md; `make test` does the same) and run on it, except those asking for `real_data_root`, which skip with the reason."""
import os, runpy, shutil
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]

def _data_root():
    p = os.environ.get('BLOODCELL_DATA') or str(REPO.parent/'shared'/'data')
    if Path(p, 'pbc').exists(): return Path(p)
    sample = REPO/'.cache'/'sample_data'
    if not (sample/'SAMPLE.md').exists(): runpy.run_path(str(REPO/'tools'/'make_sample.py'))['make_sample'](sample)
    return sample

@pytest.fixture(scope='session', autouse=True)
def _private_cache(tmp_path_factory):
    "Each test session presizes into its own cache, so tests never depend on an earlier run."
    old = os.environ.get('BLOODCELL_CACHE')
    os.environ['BLOODCELL_CACHE'] = str(tmp_path_factory.mktemp('cache'))
    yield
    if old is None: os.environ.pop('BLOODCELL_CACHE', None)
    else: os.environ['BLOODCELL_CACHE'] = old

@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    "huggingface_hub (and torch.hub) as on an offline machine with an empty cache"
    import huggingface_hub.constants as C
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(C, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(C, 'HF_HUB_CACHE', str(tmp_path/'hub'))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path/'torch'))

@pytest.fixture(scope='session')
def data_root():
    "The sample data folder, exported as $BLOODCELL_DATA for the session (the previous value is restored at its end)."
    r = _data_root()
    old = os.environ.get('BLOODCELL_DATA')
    os.environ['BLOODCELL_DATA'] = str(r)
    yield r
    if old is None: os.environ.pop('BLOODCELL_DATA', None)
    else: os.environ['BLOODCELL_DATA'] = old

@pytest.fixture(scope='session')
def real_data_root(data_root):
    "The data folder, when it holds the real datasets (not the synthetic sample): for tests of real counts and files."
    if (data_root/'SAMPLE.md').exists(): pytest.skip(f'needs the real data, not the synthetic sample in {data_root}: set BLOODCELL_DATA (see README)')
    return data_root

@pytest.fixture(scope='session')
def pbc_root(data_root):
    from bloodcell_fastai.data import class_root
    return class_root(data_root/'pbc')

@pytest.fixture(scope='session')
def pbc_sample(pbc_root):
    "A few real PBC files per class: {class: [paths]}."
    return {d.name: sorted(d.glob('*.jpg'))[:12] for d in sorted(pbc_root.iterdir()) if d.is_dir()}

@pytest.fixture
def pbc_tree(tmp_path, pbc_sample):
    "A small one-folder-per-class copy of real PBC images (3 classes x 12)."
    root = tmp_path/'pbc_small'
    for c in ['basophil','eosinophil','lymphocyte']:
        (root/c).mkdir(parents=True)
        for f in pbc_sample[c]: shutil.copy(f, root/c/f.name)
    return root


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, data_root):
    "One tiny real run per test session, shared by the test modules (`train.tiny_run`: 10 PBC images per class, 64 px, 1 epoch)."
    from bloodcell_fastai.train import tiny_run as _tiny_run
    return _tiny_run(tmp_path_factory.getbasetemp()/'shared_models'/'tiny', export_pickle=True)
