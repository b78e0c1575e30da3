"A release that installs: the wheel and sdist build, and the wheel, installed into a fresh venv away from the checkout, classifies with the shipped model and finds the app."
import os, subprocess, sys, sysconfig, tarfile, zipfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def dist(tmp_path_factory):
    "`python -m build` (no isolation: the build tools come from the test venv, nothing is downloaded) into a fresh folder."
    out = tmp_path_factory.mktemp('dist')
    r = subprocess.run([sys.executable, '-m', 'build', '--no-isolation', '--outdir', str(out), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out

@pytest.fixture(scope='module')
def venv(dist, tmp_path_factory):
    "A fresh venv holding the wheel only; its dependencies are reached by path from the test venv (whose editable install is not)."
    v = tmp_path_factory.mktemp('venv')/'v'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(v)], check=True)
    site = next((v/'lib').glob('python*/site-packages'))
    (site/'deps.pth').write_text(sysconfig.get_paths()['purelib'] + '\n') # a path line: its own .pth files (the editable finder) are not run
    whl = next(dist.glob('*.whl'))
    with zipfile.ZipFile(whl) as z: z.extractall(site) # what pip does for a pure-Python wheel, without needing pip in the venv
    info = next(site.glob('*.dist-info'))
    ep = (info/'entry_points.txt').read_text()
    assert 'bloodcell = bloodcell_fastai.cli:main' in ep, ep
    return v

def run(v, *args, cwd):
    return subprocess.run([str(v/'bin'/'python'), '-c', 'import sys; from bloodcell_fastai.cli import main; sys.argv[0] = "bloodcell"; sys.exit(main())', *args],
                          capture_output=True, text=True, cwd=cwd, env={k: x for k, x in os.environ.items() if k != 'PYTHONPATH'})

def test_wheel_and_sdist_carry_the_shipped_model_and_the_app(dist):
    names = zipfile.ZipFile(next(dist.glob('*.whl'))).namelist()
    for f in ('model.safetensors', 'model.json', 'README.md', 'bn_source.safetensors'):
        assert f'bloodcell_fastai/shipped/models/pbc_lite1/{f}' in names
    assert 'bloodcell_fastai/shipped/app.ipynb' in names
    sd = tarfile.open(next(dist.glob('*.tar.gz'))).getnames()
    assert any(n.endswith('models/pbc_lite1/model.safetensors') for n in sd) and any(n.endswith('nbs/app.ipynb') for n in sd)

def test_installed_wheel_imports_from_its_own_folder(venv, tmp_path):
    r = subprocess.run([str(venv/'bin'/'python'), '-c', 'import bloodcell_fastai as b; from bloodcell_fastai.export import shipped_folder; from bloodcell_fastai.app import app_notebook; print(b.__file__); print(shipped_folder()); print(app_notebook())'],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lib, ship, app = r.stdout.split()
    assert str(venv) in lib and str(ROOT) not in lib
    assert ship.startswith(str(venv)) and Path(ship, 'pbc_lite1', 'model.safetensors').exists()
    assert app.startswith(str(venv)) and Path(app).exists()

def test_installed_wheel_help_models_and_predict(venv, tmp_path, pbc_sample):
    r = run(venv, '--help', cwd=tmp_path); assert r.returncode == 0 and 'predict' in r.stdout, r.stderr[-1000:]
    r = run(venv, 'models', cwd=tmp_path); assert r.returncode == 0 and 'shipped' in r.stdout, r.stderr[-1000:]
    import shutil
    cells = tmp_path/'cells'; cells.mkdir()
    sample = [pbc_sample[c][0] for c in ('eosinophil', 'lymphocyte', 'platelet')]
    for f in sample: shutil.copy(f, cells/f.name)
    r = run(venv, 'predict', str(cells), '--csv', str(tmp_path/'p.csv'), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-1000:]
    import pandas as pd
    df = pd.read_csv(tmp_path/'p.csv'); assert len(df) == len(sample) and df.error.isna().all()
