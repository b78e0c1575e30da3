"The GitHub workflows, the README and the notebooks' Colab cells say the same as the Makefile: one way to test, one install command."
import json, re, configparser
from pathlib import Path
import yaml

ROOT = Path(__file__).resolve().parents[1]
def workflow(name): return yaml.safe_load((ROOT/'.github'/'workflows'/name).read_text())
def runs(wf): return [s['run'] for job in wf['jobs'].values() for s in job['steps'] if 'run' in s]
def make_prereqs(target):
    m = re.search(rf'^{target}:(.*)$', (ROOT/'Makefile').read_text(), re.M)
    assert m, f'Makefile has no {target} target'
    return m.group(1).split()

def test_test_workflow_runs_make_test_on_push_and_pull_request():
    wf = workflow('test.yaml')
    on = wf.get('on', wf.get(True)) # YAML 1.1 reads a bare `on` as True
    assert {'push', 'pull_request'} <= set(on)
    assert 'make test' in runs(wf)
    assert {'sync-check', 'clean-check', 'layers-check', 'nbtest', 'pytest', 'docs-check'} <= set(make_prereqs('test'))

def test_workflows_install_torch_from_the_cpu_index_only_through_the_makefile_pins():
    for name in ('test.yaml', 'deploy.yaml'):
        wf = workflow(name)
        assert not any('pip install' in r for r in runs(wf)), f'{name} installs on its own instead of through make'
        assert all(job['env']['PIP_EXTRA_INDEX_URL'].endswith('/whl/cpu') for job in wf['jobs'].values())
    assert 'torch>=2.1,<=2.14.1' in (ROOT/'Makefile').read_text()

def test_deploy_workflow_renders_with_nbdev_docs_and_publishes_the_doc_path():
    wf = workflow('deploy.yaml')
    assert 'make venv' in runs(wf) and '.venv/bin/nbdev_docs' in runs(wf)
    steps = [s for s in wf['jobs']['deploy']['steps'] if 'quarto' in s.get('uses', '')]
    assert steps, 'deploy.yaml does not install Quarto'
    cfg = configparser.ConfigParser(); cfg.read(ROOT/'settings.ini')
    pub = [s['with']['publish_dir'] for s in wf['jobs']['deploy']['steps'] if 'gh-pages' in s.get('uses', '')]
    assert pub == ['./' + cfg['DEFAULT']['doc_path']]

def test_colab_cells_install_what_the_readme_says():
    cmd = re.search(r'^pip install (git\+\S+)$', (ROOT/'README.md').read_text(), re.M)
    assert cmd, 'README gives no `pip install git+...` command'
    missing = []
    for nb in sorted((ROOT/'nbs').glob('[0-9]*.ipynb')):
        code = [''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
        cell = next((s for s in code if 'google.colab' in s), None)
        if cell is None or f"'{cmd.group(1)}'" not in cell or code.index(cell) > 1: missing.append(nb.name)
    assert not missing, f'no Colab install cell (first code cell after default_exp) with the README command in {missing}'

def test_binder_opens_the_app_with_the_shipped_model():
    badge = re.search(r'mybinder\.org/v2/gh/\S+?\?urlpath=(\S+?)\)', (ROOT/'README.md').read_text())
    assert badge and badge.group(1) == 'voila%2Frender%2Fnbs%2Fapp.ipynb' # no leading slash: Binder's voila/render takes a relative path
    assert (ROOT/'nbs'/'app.ipynb').exists()
    assert 'pip install --no-deps -e .' in (ROOT/'binder'/'postBuild').read_text()
    reqs = dict(l.split('==') for l in (ROOT/'binder'/'requirements.txt').read_text().splitlines() if '==' in l)
    assert reqs['torch'].split('+')[0] == '2.14.1' and reqs['fastai'].startswith('2.8.') and int(reqs['fastcore'].split('.')[0]) < 2
    # Voila runs the notebook in its own folder: from there, with no $BLOODCELL_MODELS, the app's first model is the shipped one
    import subprocess, sys, os
    code = "from bloodcell_fastai.export import list_models, models_folder; m = list_models(models_folder()); print(m.source.iloc[0], m.path.iloc[0], m.error.iloc[0])"
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT/'nbs', capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != 'BLOODCELL_MODELS'})
    assert r.returncode == 0, r.stderr[-1000:]
    source, path, err = r.stdout.split()
    assert source == 'shipped' and path.endswith('pbc_lite1') and err in ('nan', 'None'), r.stdout

def test_make_test_draws_a_sample_when_there_is_no_data_folder(tmp_path):
    "With $BLOODCELL_DATA empty (a fork's CI with no repository variable), the tests run on a drawn sample and say so."
    import subprocess, os
    env = {**os.environ, 'BLOODCELL_DATA': ''} # defined but empty: neither it nor ../shared/data is used
    r = subprocess.run(['make', '-s', 'data-check', f'SAMPLE_DATA={tmp_path/"s"}'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'using the synthetic sample' in r.stdout and 'tests that need the real data skip' in r.stdout
    assert (tmp_path/'s'/'SAMPLE.md').exists() and {'pbc', 'cnmc', 'allidb2', 'otherlab'} <= {p.name for p in (tmp_path/'s').iterdir()}
    r = subprocess.run(['make', '-s', 'data-check'], cwd=ROOT, env={**env, 'BLOODCELL_DATA': str(tmp_path/'nowhere')}, capture_output=True, text=True)
    assert r.returncode == 2 and 'must hold pbc/, cnmc/ and allidb2/' in r.stdout, r.stdout + r.stderr

def test_every_notebook_says_who_needs_it():
    "The docs' pages open with what the notebook is for (its description) and who needs it."
    missing = []
    for nb in sorted((ROOT/'nbs').glob('[0-9]*.ipynb')):
        md = next(''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'markdown')
        if not (md.startswith('# ') and '\n> ' in md and 'need it' in md): missing.append(nb.name)
    assert not missing, f'title cell without a description or a "who needs it" sentence: {missing}'
