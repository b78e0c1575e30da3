"`tools/check_layers.py`: the library's imports point down the layers (nbs/NN_*.ipynb), and the checker catches what it must."
import ast, importlib.util, subprocess, sys
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tool():
    spec = importlib.util.spec_from_file_location('check_layers', REPO/'tools'/'check_layers.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def imports(tool, src, module='imaging'): return list(tool.project_imports(ast.parse(src), module))


def test_repo_passes_check_layers():
    r = subprocess.run([sys.executable, str(REPO/'tools'/'check_layers.py')], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith('layers OK') and 'FAIL' not in r.stdout


def test_layers_come_from_notebook_names(tool):
    lay = tool.layers()
    assert lay['core'] == 0 and lay['metrics'] == 0 and lay['models'] == 1 and lay['imaging'] == 1
    assert lay['cams'] == 2 and lay['export'] == 3 and lay['inference'] == 4 and lay['cli'] == 9
    assert {p.stem for p in (REPO/'bloodcell_fastai').glob('[!_]*.py')} <= set(lay)   # every module has a layer


def test_project_imports_spellings(tool):
    src = ("import os\nfrom pathlib import Path\nfrom .core import DataError\nfrom . import models\n"
           "from bloodcell_fastai.data import load_items\nimport bloodcell_fastai.export\nfrom bloodcell_fastai import ood\n"
           "from .imaging import load_rgb\n")
    got = imports(tool, src)
    assert [(n, f) for _, n, f in got] == [('core', False), ('models', False), ('data', False), ('export', False), ('ood', False)]
    assert [l for l, *_ in got] == [3, 4, 5, 6, 7]                    # its own module (line 8) and other packages are left out


def test_project_imports_flags_function_level_imports(tool):
    src = "from .core import DataError\ndef f():\n    from .models import get_arch\n    return get_arch\nclass C:\n    def m(self):\n        import bloodcell_fastai.data\n"
    assert [(l, n, f) for l, n, f in imports(tool, src)] == [(1, 'core', False), (3, 'models', True), (7, 'data', True)]


@pytest.fixture
def fake_lib(tool, tmp_path, monkeypatch):
    "A package of three modules in layers 0, 1 and 2; the test writes their sources."
    lib = tmp_path/'bloodcell_fastai'; lib.mkdir()
    monkeypatch.setattr(tool, 'ROOT', tmp_path)
    monkeypatch.setattr(tool, 'layers', lambda nbs=None: dict(low=0, mid=1, high=2))
    def write(**srcs):
        for name, src in srcs.items(): (lib/f'{name}.py').write_text(src)
        return tool.check(lib)
    return write


def test_check_accepts_downward_imports(fake_lib):
    assert fake_lib(low='import os\n', mid='from .low import x\n', high='from .mid import y\nfrom bloodcell_fastai.low import x\n') == []


def test_check_flags_an_upward_import(fake_lib):
    errs = fake_lib(low='import os\n', mid='from .high import z\n', high='from .low import x\n')
    assert errs == ['bloodcell_fastai/mid.py:1: mid (layer 1) imports high (layer 2); imports must point to a lower layer']


def test_check_flags_a_sibling_imported_in_a_function(fake_lib):
    errs = fake_lib(low='import os\n', mid='def f():\n    from .low import x\n    return x\n', high='from .mid import f\n')
    assert len(errs) == 1 and errs[0].startswith('bloodcell_fastai/mid.py:2: imports low inside a function')
    same = fake_lib(mid='import os\ndef g():\n    from . import mid\n', high='def h():\n    import bloodcell_fastai.mid\n')
    assert same == ['bloodcell_fastai/high.py:2: imports mid inside a function; import it at the top (if it is below) or pass a function in']


def test_check_flags_modules_without_a_layer(fake_lib):
    errs = fake_lib(low='from .extra import q\n', mid='', high='', extra='')
    assert errs == ['extra.py: no notebook in nbs/ exports it (cannot tell its layer)',
                    'bloodcell_fastai/low.py:1: imports extra, which no notebook exports']
