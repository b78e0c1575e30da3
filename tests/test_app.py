"The Voila app in a real browser: Voila on a free localhost port, Debian's headless Chromium driven by playwright."
import base64, io, json, os, re, signal, socket, subprocess, time
from pathlib import Path
import pandas as pd
import pytest

CHROMIUM = os.environ.get('BLOODCELL_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking']
REPO = Path(__file__).resolve().parents[1]
MAX_MB = 5 # the app's per-file limit in this test; the websocket limit is raised above 10 MiB by voila_command

pytest.importorskip('playwright.sync_api', reason='playwright (Python) is not installed: pip install playwright')
pytest.importorskip('voila', reason='voila is not installed')
if not Path(CHROMIUM).exists():
    pytest.skip(f'{CHROMIUM} not found: install Debian chromium (sudo tools/ensure_chromium.sh)', allow_module_level=True)


def free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def wait_port(port, proc, log, timeout=60):
    "Wait until the server accepts connections; fail with its log if it dies or takes too long."
    t0 = time.time()
    while time.time()-t0 < timeout:
        if proc.poll() is not None: pytest.fail(f'voila exited with {proc.returncode}:\n{log.read_text()[-3000:]}')
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=1): return
        except OSError: time.sleep(0.3)
    pytest.fail(f'voila did not listen on {port} within {timeout}s:\n{log.read_text()[-3000:]}')

def stop(proc):
    "Stop voila (it shuts its kernels down on SIGTERM); kill its process group if it does not."
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)


@pytest.fixture(scope='module')
def run(tiny_run): return tiny_run

@pytest.fixture(scope='module')
def server(run, tmp_path_factory):
    "Voila serving nbs/app.ipynb with the tiny model, started by the same command `bloodcell app` uses."
    from bloodcell_fastai.app import voila_command, app_env
    port, log = free_port(), tmp_path_factory.mktemp('voila')/'voila.log'
    cmd = voila_command(REPO/'nbs'/'app.ipynb', port=port, max_upload_mb=MAX_MB)
    with open(log, 'w') as f:
        proc = subprocess.Popen(cmd, env=app_env(run.parent, MAX_MB), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_port(port, proc, log)
        yield f'http://127.0.0.1:{port}/', proc, log
    finally: stop(proc)

@pytest.fixture(scope='module')
def page(server):
    from playwright.sync_api import sync_playwright
    url, proc, log = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            pg = browser.new_page(viewport={'width':1100, 'height':900})
            pg.set_default_timeout(60_000)
            pg.goto(url, timeout=90_000)
            try: pg.get_by_role('button', name='Classify').wait_for(timeout=120_000)
            except Exception: pytest.fail(f'the app did not render:\n{pg.inner_text("body")[:2000]}\n{log.read_text()[-3000:]}')
            yield pg
        finally: browser.close()


def upload(pg, *files):
    "Pick files in the FileUpload widget's file chooser (ipywidgets 8 has no <input type=file> in the page)."
    with pg.expect_file_chooser(timeout=10_000) as fc:
        pg.locator('.widget-upload').click()
    fc.value.set_files([str(f) for f in files])
    js = "ns => { const e = document.querySelector('.bc-selected'); return !!e && ns.every(n => e.innerText.includes(n)) }"
    pg.wait_for_function(js, arg=[Path(f).name for f in files], timeout=60_000)

def text(loc)->str:
    "Visible text with non-breaking spaces (ipywidgets' dropdown labels) as plain ones."
    return loc.inner_text().replace('\xa0', ' ')

def readable(pbc_sample, cls, n=1)->list:
    "The first `n` sample files of a class that really are images (the shared sample also holds debris)."
    from bloodcell_fastai.data import inspect_file
    from bloodcell_fastai.imaging import is_hidden
    return [f for f in pbc_sample[cls] if not is_hidden(Path(f.name)) and inspect_file(f)['status']=='ok'][:n]

def classify(pg):
    "Press Classify and wait for this click's results (the app numbers its runs in a hidden marker)."
    n = pg.locator('.bc-run').count() and int(pg.locator('.bc-run').get_attribute('data-run'))
    pg.get_by_role('button', name='Classify').click()
    pg.locator(f'.bc-run[data-run="{n+1}"]').wait_for(state='attached', timeout=90_000)


def test_app_classifies_and_reports_bad_input(page, run, pbc_sample, tmp_path):
    from bloodcell_fastai.inference import predict, backend_model
    from bloodcell_fastai.export import default_model
    pg = page
    assert 'Blood-cell classifier' in text(pg.locator('body'))
    assert 'tiny' in text(pg.locator('body')) # the dropdown lists the models with their test accuracy
    assert 'test accuracy' in text(pg.locator('select'))
    first = text(pg.locator('select option').first)
    assert first.startswith('pbc_lite1'), first # the shipped model comes first and is selected

    # one real PBC image, classified by the shipped model: the page shows what `predict` says, class and probability
    img, = readable(pbc_sample, 'neutrophil')
    upload(pg, img); classify(pg)
    want = predict(backend_model(default_model()), [img], threshold=0.5, tta=True).iloc[0] # the app's TTA switch is on by default (seeded)
    best = want['top3'].split(';')[0].rsplit(' ', 1)[0]
    got = text(pg.locator('.bc-ok, .bc-warn').first)
    assert img.name in got and best in got, got
    assert f"probability {want['probability']:.1%}" in got, got
    if want['status']!='ok': assert want['status'] in got, got # 'refer to expert' or 'unlike the training data', with why
    assert re.search(r'\d+\.\d%', text(pg.locator('body')))
    assert pg.locator('img').count() >= 2 # the input and its Grad-CAM overlay

    # a non-image: a clear message naming the file, and the server keeps serving
    txt = tmp_path/'notes.txt'; txt.write_text('slide 12, patient 3\n')
    upload(pg, txt); classify(pg)
    err = text(pg.locator('.bc-error').first)
    assert 'notes.txt is not an image file' in err and 'upload an image file' in err, err

    # a file above the upload limit (and above tornado's default 10 MiB websocket message): refused with a message
    big = tmp_path/'huge.jpg'; big.write_bytes(os.urandom(12*2**20))
    upload(pg, big); classify(pg)
    err = text(pg.locator('.bc-error').first)
    assert 'huge.jpg is 12.6 MB, above the 5 MB limit' in err, err

    # several images, one of them corrupt: cards, a table and CSV/Excel downloads with one row per file
    bad = tmp_path/'truncated.jpg'; bad.write_bytes(img.read_bytes()[:1500])
    files = [*readable(pbc_sample, 'eosinophil'), *readable(pbc_sample, 'platelet'), bad]
    upload(pg, *files); classify(pg)
    body = text(pg.locator('body'))
    assert 'All images' in body and 'truncated.jpg' in body
    assert re.search(r'3 file\(s\): \d+ classified, \d+ referred to an expert \(probability < 0\.5\), 1 unreadable', body), body[-800:]
    href = pg.get_by_text('Download CSV').get_attribute('href')
    df = pd.read_csv(io.BytesIO(base64.b64decode(href.split(',', 1)[1])))
    assert df.file.tolist() == [f.name for f in files]
    assert df.status.tolist()[2] == 'error' and set(df.status[:2]) <= {'ok', 'refer to expert', 'unlike the training data'}
    xl = pg.get_by_text('Download Excel').get_attribute('href')
    assert pd.read_excel(io.BytesIO(base64.b64decode(xl.split(',', 1)[1]))).file.tolist() == df.file.tolist()

    # adaptation is offered only for enough images from one lab, and says what it did
    box = pg.get_by_role('checkbox', name=re.compile('Adapt to these images'))
    assert box.is_disabled()
    many = [f for c in pbc_sample for f in readable(pbc_sample, c, 12)][:40]
    assert len(many) >= 32
    upload(pg, *many)
    pg.wait_for_function("() => { const b = [...document.querySelectorAll('input[type=checkbox]')].find(e => e.parentElement.innerText.includes('Adapt')); return b && !b.disabled }", timeout=30_000)
    box.check(); classify(pg)
    body = text(pg.locator('body'))
    assert f'Adapted the model to {len(many)} uploaded image(s)' in body, body[-800:]
    assert re.search(rf'{len(many)} file\(s\): \d+ classified', body)

    shot = tmp_path/'app.png'
    pg.set_viewport_size({'width':1100, 'height':2000}) # Voila scrolls inside its own container: make it all visible
    pg.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f'screenshot: {shot}')
