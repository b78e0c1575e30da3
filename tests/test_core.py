"The shared bottom layer: one-line errors with file/problem/fix, atomic writes, JSON helpers, data and cache folders."
import json, os
from pathlib import Path
import numpy as np, pytest
from bloodcell_fastai.core import *


def test_error_fields_make_one_line():
    e = DataError(file=Path('/d/x.jpg'), problem='is empty (0 bytes)', fix='delete it')
    assert str(e) == '/d/x.jpg is empty (0 bytes): delete it' and (e.file, e.problem, e.fix) == (Path('/d/x.jpg'), 'is empty (0 bytes)', 'delete it')
    assert str(DataError(problem='no images', fix='add some')) == 'no images: add some'
    plain = ModelFileError('model.json not found: train first')
    assert str(plain) == 'model.json not found: train first' and plain.problem is None and plain.file is None
    for cls in (DataError, ModelFileError, ConfigError):
        assert issubclass(cls, BloodcellError) and issubclass(cls, ValueError)   # callers catching ValueError keep working


def test_atomic_write_replaces_whole_files(tmp_path):
    fn = atomic_write(tmp_path/'a'/'b.json', '{"x": 1}')
    assert fn == tmp_path/'a'/'b.json' and json.loads(fn.read_text()) == {'x': 1}
    atomic_write(fn, b'\x00\x01')
    assert fn.read_bytes() == b'\x00\x01' and sorted(p.name for p in fn.parent.iterdir()) == ['b.json']   # no temporary file left


def test_jsonable():
    o = dict(p=Path('a/b'), i=np.int64(3), f=np.float32(0.5), a=np.arange(3))
    assert json.loads(json.dumps(o, default=jsonable)) == dict(p='a/b', i=3, f=0.5, a=[0, 1, 2])
    with pytest.raises(TypeError, match='set is not JSON serialisable'): json.dumps({1, 2}, default=jsonable)


def test_data_root_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('BLOODCELL_DATA', str(tmp_path/'data'))
    assert data_root() == (tmp_path/'data').resolve()
    monkeypatch.delenv('BLOODCELL_DATA')
    assert data_root() is None
    monkeypatch.setenv('BLOODCELL_CACHE', str(tmp_path/'c'))
    d = cache_dir('presize', '64')
    assert d == tmp_path/'c'/'presize'/'64' and d.is_dir()


def test_statuses_are_distinct():
    assert len({REFER, OOD_STATUS, NO_CELL_STATUS, ERROR_STATUS, 'ok'}) == 5 and ERROR_STATUS == 'error'
